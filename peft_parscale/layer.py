"""The ParScale mechanism (Chen et al., "Parallel Scaling Law for Language Models", arXiv 2505.10475).

A frozen causal LM runs a batch of B sequences as P parallel streams:

1. Replication. The input x is copied P times along the batch, stream-major: row p·B + b is stream p of
   sequence b (`ParScaleStreams.replicate_inputs`, a forward pre-hook on the decoder).
2. Prefix attention. In every attention layer, stream p attends to T learned key/value vectors of its own in
   front of the real keys/values: prefix_k, prefix_v of shape (P, num_key_value_heads, T, head_dim), the shape of
   what the layer caches (`probe.py`). They live in post-rotary space (no rotary embedding is applied to them), every
   query sees them (padding never hides them), and the real tokens keep their positions 0, 1, ...
   (`ParScaleAttention`). In models that look their positions up in a table, which has no negative positions, the
   real tokens start at T instead, as if the prefix had been read at 0..T-1 (`to_stream_inputs`).
3. Aggregation. After the final norm, the P hidden states h_1..h_P of a token are mixed with dynamic weights
       w = softmax(W2 · SiLU(W1 · [h_1 ... h_P] + b1) + b2)        (in float32; [..] in hidden-major order)
       w <- w · (1 - ε) + ε / P                                     (smoothing)
       y = Σ_p w_p h_p                                              (cast back to the model dtype)
   and y goes to the unchanged LM head (`ParScaleStreams.aggregate`, a forward hook on the decoder).

Where the prefix lives. transformers' attention modules call `<cache>.update(k, v, self.layer_idx)` right after
the rotary embedding and use what it returns as the keys/values (the cache argument is `past_key_values`, or
`layer_past` in GPT-NeoX, Falcon and GPT-BigCode). That call is the one place to put the prefix in front of
post-rotary keys without a modeling fork:
- with a cache (generation), the prefix is written once into the cache's first T slots (`cache.py`) and the
  decoder is given a 2D attention mask with T leading ones, so transformers builds the right mask itself; in
  sliding-window layers, whose mask transformers builds without knowing of the prefix, the T prefix columns are then
  marked visible (`prefix_always_visible`): the window limits only the real tokens;
- without one (training, `use_cache=False`; gradient checkpointing also drops the cache inside each layer), each
  attention call gets a stand-in cache whose `update` returns [prefix; k], and T always-visible columns are added
  to the attention mask transformers built for the real tokens (sliding-window masks included).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from transformers import DynamicCache

from .cache import make_prefix_resident, stream_prefix
from .config import ParScaleConfig


def repeat_streams(tensor: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Copy a batch P times, stream-major: row p·B + b of the result is row b of the input."""
    return tensor.repeat(num_streams, *([1] * (tensor.dim() - 1)))


class ParScaleLayer(BaseTunerLayer):
    """Base of both ParScale modules, so that PEFT's bookkeeping (set_adapter, delete_adapter, enabling and
    disabling, dtype casts, trainable flags) walks the aggregator as well as the prefixes."""

    def reference_parameter(self) -> torch.Tensor:
        """A weight of the wrapped part of the model, whose device and dtype new adapter weights take."""
        raise NotImplementedError

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT's version reads `base_layer.weight`; an attention module or a decoder has no single weight.
        device = self.reference_parameter().device if device is None else device
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container:
                entry = container[adapter_name]
                for parameter in [entry] if isinstance(entry, nn.Parameter) else entry.parameters():
                    if not parameter.is_meta:
                        parameter.data = parameter.data.to(device)

    def active_adapter_name(self) -> str | None:
        """The adapter in use, or None when adapters are disabled or none is active."""
        if self.disable_adapters or not self.active_adapters:
            return None
        if len(self.active_adapters) > 1:
            raise ValueError(f"ParScale runs one adapter at a time; active adapters: {self.active_adapters}.")
        return self.active_adapters[0]


class _StandInPrefixCache:
    """Stands in for `past_key_values` when there is no cache: `update` returns [prefix; k] and [prefix; v]."""

    def __init__(self, prefix_k: torch.Tensor, prefix_v: torch.Tensor) -> None:
        self.prefix_k, self.prefix_v = prefix_k, prefix_v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys = torch.cat([stream_prefix(self.prefix_k, key_states), key_states], dim=-2)
        values = torch.cat([stream_prefix(self.prefix_v, value_states), value_states], dim=-2)
        return keys, values


_PREFIX_CAUSAL_BIASES: dict[tuple[int, int], Any] = {}


def prefix_causal_bias(query_length: int, prefix_length: int) -> Any:
    """`causal_lower_right(q, T + q)`, one object per size. torch.compile cannot build it inside a graph but can use
    one built outside: the decoder's pre-hook builds it before the layers run, so that compiled layers only look it up.
    """
    sizes = (query_length, prefix_length + query_length)
    bias = _PREFIX_CAUSAL_BIASES.get(sizes)
    if bias is None:
        if len(_PREFIX_CAUSAL_BIASES) >= 64:  # many sequence lengths: start over rather than grow
            _PREFIX_CAUSAL_BIASES.clear()
        bias = _PREFIX_CAUSAL_BIASES[sizes] = causal_lower_right(*sizes)
    return bias


def visible_columns(mask: torch.Tensor, prefix_length: int) -> torch.Tensor:
    """T key columns that every query sees, in the form of a 4D mask (boolean, or additive with 0 for visible)."""
    return mask.new_full((*mask.shape[:-1], prefix_length), True if mask.dtype == torch.bool else 0.0)


def mask_with_prefix(mask: Any, prefix_length: int, queries: torch.Tensor) -> Any:
    """Add T always-visible key columns in front of an attention mask built for the real tokens only.

    `queries` is the attention module's input (rows, length, hidden): it gives the query length and device.
    """
    if mask is None:
        query_length = queries.shape[1]
        if query_length == 1:
            return None  # sdpa then attends to every key, prefix included
        # sdpa's mask-free causal path is top-left aligned; with the prefix in front it must be bottom-right. Saying
        # so with a `causal_lower_right` bias instead of a materialised mask lets sdpa keep its flash kernel on CUDA
        # (any explicit mask limits it to the memory-efficient or math kernels); elsewhere sdpa materialises it.
        # The bias skips autocast's casts (its `__torch_function__` runs first): a float32 model under bfloat16
        # autocast would give sdpa float32 queries/keys and bfloat16 values, so there the mask is materialised.
        device_type = queries.device.type
        if not torch.is_autocast_enabled(device_type) or queries.dtype == torch.get_autocast_dtype(device_type):
            return prefix_causal_bias(query_length, prefix_length)
        visible = torch.ones(query_length, prefix_length + query_length, dtype=torch.bool, device=queries.device)
        return visible.tril(diagonal=prefix_length)[None, None]
    if isinstance(mask, BlockMask):  # flex attention
        query_length, key_length = mask.seq_lengths
        real_tokens = mask.mask_mod

        def prefix_or_real(batch, head, query, key):
            return (key < prefix_length) | real_tokens(batch, head, query, (key - prefix_length).clamp(min=0))

        return create_block_mask(
            prefix_or_real,
            B=mask.kv_num_blocks.shape[0],
            H=None,
            Q_LEN=query_length,
            KV_LEN=prefix_length + key_length,
            device=mask.kv_num_blocks.device,
        )
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise NotImplementedError(
            f"ParScale without a KV cache needs a 4D attention mask (eager, sdpa or flex), got {type(mask).__name__}."
        )
    return torch.cat([visible_columns(mask, prefix_length), mask], dim=-1)


class ParScaleAttention(nn.Module, ParScaleLayer):
    """Wraps one attention module and gives each of the P streams its own T prefix keys/values.

    prefix_k / prefix_v: (P, num_key_value_heads, T, head_dim) and (P, num_key_value_heads, T, value_head_dim) per
    adapter: the shapes of the keys and values the layer caches. `cache_argument` is the name of the wrapped
    module's cache argument (`past_key_values`, or `layer_past` in GPT-NeoX, Falcon and GPT-BigCode); `sliding_window`
    says whether it is a sliding-window layer.
    """

    adapter_layer_names = ("parscale_prefix_k", "parscale_prefix_v")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: ParScaleConfig,
        num_key_value_heads: int,
        head_dim: int,
        value_head_dim: int,
        cache_argument: str = "past_key_values",
        sliding_window: bool = False,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parscale_prefix_k = nn.ParameterDict()
        self.parscale_prefix_v = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters = []
        self.cache_argument = cache_argument
        self.sliding_window = sliding_window
        # The wrapped forward's named arguments, to read positional ones by name.
        self._argument_names = [
            name
            for name, parameter in inspect.signature(base_layer.forward).parameters.items()
            if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
        ]
        self.update_layer(adapter_name, config, num_key_value_heads, head_dim, value_head_dim)
        self._active_adapter = adapter_name

    def reference_parameter(self) -> torch.Tensor:
        return next(self.base_layer.parameters())

    def update_layer(
        self, adapter_name: str, config: ParScaleConfig, num_key_value_heads: int, head_dim: int, value_head_dim: int
    ) -> None:
        reference = self.reference_parameter()
        for prefixes, size in ((self.parscale_prefix_k, head_dim), (self.parscale_prefix_v, value_head_dim)):
            shape = (config.P, num_key_value_heads, config.prefix_length, size)
            prefix = torch.empty(shape, device=reference.device, dtype=torch.float32)
            nn.init.normal_(prefix, std=config.init_std)
            prefixes[adapter_name] = nn.Parameter(prefix.to(reference.dtype))

    def prefix(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parscale_prefix_k[adapter_name], self.parscale_prefix_v[adapter_name]

    def forward(self, *args: Any, **kwargs: Any):
        adapter_name = self.active_adapter_name()
        if adapter_name is None:
            return self.base_layer(*args, **kwargs)
        if args and len(args) <= len(self._argument_names):
            kwargs = {**dict(zip(self._argument_names, args)), **kwargs}
            args = ()
        prefix_k, prefix_v = self.prefix(adapter_name)
        if kwargs.get(self.cache_argument) is None:
            # No cache here (see the module docstring): put the prefix in front of this call's keys/values.
            hidden_states = args[0] if args else kwargs[self._argument_names[0]]
            kwargs[self.cache_argument] = _StandInPrefixCache(prefix_k, prefix_v)
            kwargs["attention_mask"] = mask_with_prefix(kwargs.get("attention_mask"), prefix_k.shape[2], hidden_states)
        elif self.sliding_window:
            # The prefix sits in the cache's first T slots, where transformers' sliding-window mask (which knows
            # nothing of it) may hide it: it stays visible to every query, and the window limits the real tokens only.
            kwargs["attention_mask"] = prefix_always_visible(kwargs.get("attention_mask"), prefix_k.shape[2])
        return self.base_layer(*args, **kwargs)


def prefix_always_visible(mask: Any, prefix_length: int) -> Any:
    """Mark the first T key columns of a mask built with the prefix in the cache (2D mask with T leading ones) visible
    to every query. A sliding-window mask built by transformers hides them once a query is a window away from them."""
    if mask is None:
        return None  # no mask: every key is visible (sdpa skips the mask only when that is right)
    if isinstance(mask, BlockMask):
        query_length, key_length = mask.seq_lengths
        mask_mod = mask.mask_mod

        def prefix_or_mask(batch, head, query, key):
            return (key < prefix_length) | mask_mod(batch, head, query, key)

        return create_block_mask(
            prefix_or_mask,
            B=mask.kv_num_blocks.shape[0],
            H=None,
            Q_LEN=query_length,
            KV_LEN=key_length,
            device=mask.kv_num_blocks.device,
        )
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise NotImplementedError(
            f"ParScale's sliding-window layers need a 4D attention mask, got {type(mask).__name__}."
        )
    return torch.cat([visible_columns(mask, prefix_length), mask[..., prefix_length:]], dim=-1)


class ParScaleStreams(nn.Module, ParScaleLayer):
    """Replicates the decoder's inputs into P streams and aggregates its output back to one; holds the aggregator.

    Attached to the decoder as `streams` and driven by two forward hooks on it, so the decoder's output is already
    aggregated to B rows: callers that take `last_hidden_state` and apply the LM head themselves (TRL does) get
    ParScale outputs too.
    """

    adapter_layer_names = ("parscale_aggregator",)
    other_param_names = ("num_streams", "prefix_length", "smoothing")

    def __init__(self, decoder: nn.Module, hidden_size: int, adapter_name: str, config: ParScaleConfig) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.parscale_aggregator = nn.ModuleDict()
        self.num_streams: dict[str, int] = {}
        self.prefix_length: dict[str, int] = {}
        self.smoothing: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        # Plain attributes, not submodules: the decoder owns these modules.
        object.__setattr__(self, "_decoder", decoder)
        object.__setattr__(self, "_attention_layers", [])
        self.original_masks_for_generate = None  # set by ParScaleModel
        # Set by ParScaleModel: the length of the table the model looks its positions up in (GPT-2, CodeGen, GPT-J),
        # or None. With a table the real tokens start at position T, and text prefixes are read at 0..T-1 (`prefix_init.py`).
        self.position_table: int | None = None
        self.update_layer(adapter_name, config)
        self._active_adapter = adapter_name
        self._decoder_arg_names = list(inspect.signature(decoder.forward).parameters)
        decoder.register_forward_pre_hook(self.replicate_inputs, with_kwargs=True)
        decoder.register_forward_hook(self.aggregate_outputs)

    @property
    def weight(self) -> torch.Tensor:
        # PEFT's `BaseTunerLayer.weight` would look for it on this module itself, recursing forever.
        raise AttributeError("ParScaleStreams wraps no layer with a single weight")

    def reference_parameter(self) -> torch.Tensor:
        return next(self._decoder.parameters())

    def update_layer(self, adapter_name: str, config: ParScaleConfig) -> None:
        reference = self.reference_parameter()
        self.num_streams[adapter_name] = config.P
        self.prefix_length[adapter_name] = config.prefix_length
        self.smoothing[adapter_name] = config.smoothing
        if config.P == 1:
            return  # a single stream needs no aggregation: w = 1
        hidden_size, num_streams = self.hidden_size, config.P
        place = {"device": reference.device, "dtype": reference.dtype}
        aggregator = nn.Sequential(
            nn.Linear(num_streams * hidden_size, hidden_size, **place),
            nn.SiLU(),
            nn.Linear(hidden_size, num_streams, **place),
        )
        nn.init.normal_(aggregator[0].weight, std=config.init_std)
        nn.init.zeros_(aggregator[0].bias)
        # Zero output layer: a fresh adapter weighs its streams uniformly, w = 1/P.
        nn.init.zeros_(aggregator[2].weight)
        nn.init.zeros_(aggregator[2].bias)
        self.parscale_aggregator[adapter_name] = aggregator

    @property
    def decoder(self) -> nn.Module:
        """The decoder these streams are attached to."""
        return self._decoder

    def attention_layers(self) -> list[ParScaleAttention]:
        """The wrapped attention modules of the decoder, in layer order."""
        if not self._attention_layers:  # found once: the wrapped attention modules stay the same objects
            self._attention_layers = [m for m in self._decoder.modules() if isinstance(m, ParScaleAttention)]
        return self._attention_layers

    def attention_prefixes(self, adapter_name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(prefix_k, prefix_v) of every attention layer, in layer order."""
        return [layer.prefix(adapter_name) for layer in self.attention_layers()]

    def first_position(self, adapter_name: str) -> int:
        """The real tokens' first position: 0, or T in a model with a position table (it has no negative positions
        for the prefix, which takes 0..T-1)."""
        return 0 if self.position_table is None else self.prefix_length[adapter_name]

    def replicate_inputs(self, decoder: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook: B sequences in, P·B stream rows to the decoder."""
        adapter_name = self.active_adapter_name()
        if adapter_name is None:
            return None
        kwargs = {**dict(zip(self._decoder_arg_names, args)), **kwargs}
        num_streams, prefix_length = self.num_streams[adapter_name], self.prefix_length[adapter_name]
        cache = kwargs.get("past_key_values")
        use_cache = kwargs.get("use_cache")
        use_cache = decoder.config.use_cache if use_cache is None else use_cache
        checkpointing = decoder.training and any(
            getattr(module, "gradient_checkpointing", False) for module in decoder.modules()
        )
        # A cache passed in (generate's) is kept and filled; in training none is made unless asked for, and gradient
        # checkpointing drops it inside the layers anyway, so the prefix must come from the layers then.
        keep_cache = not checkpointing and (cache is not None or (use_cache and not decoder.training))
        if keep_cache:
            cache = DynamicCache(config=decoder.config) if cache is None else cache
            make_prefix_resident(cache, self.attention_prefixes(adapter_name))
            check_mask_fits_cache(kwargs, cache, prefix_length)
        elif not torch.compiler.is_compiling():
            prefix_causal_bias(decoder_inputs(kwargs).shape[1], prefix_length)  # for compiled layers (see there)
        kwargs["past_key_values"], kwargs["use_cache"] = (cache, True) if keep_cache else (None, False)
        first_position = self.first_position(adapter_name)
        kwargs = to_stream_inputs(kwargs, num_streams, prefix_length if keep_cache else None, first_position)
        if self.position_table is not None and not torch.compiler.is_compiling():
            check_positions_fit(kwargs["position_ids"], self.position_table, first_position)
        return (), kwargs

    def masks_for_generate(self, **kwargs: Any) -> Any:
        """`create_masks_for_generate` for the streams: generate calls it with a static cache, before the forward."""
        adapter_name = self.active_adapter_name()
        if adapter_name is not None and kwargs.get("past_key_values") is not None:
            make_prefix_resident(kwargs["past_key_values"], self.attention_prefixes(adapter_name))
            kwargs = to_stream_inputs(
                kwargs,
                self.num_streams[adapter_name],
                self.prefix_length[adapter_name],
                self.first_position(adapter_name),
            )
        return self.original_masks_for_generate(**kwargs)

    def aggregate_outputs(self, decoder: nn.Module, args: tuple, output: Any) -> Any:
        """Forward hook: P·B stream rows of `last_hidden_state` back to B."""
        adapter_name = self.active_adapter_name()
        if adapter_name is None:
            return None
        if isinstance(output, tuple):
            return (self.aggregate(output[0], adapter_name), *output[1:])
        output.last_hidden_state = self.aggregate(output.last_hidden_state, adapter_name)
        return output

    def aggregate(self, hidden_states: torch.Tensor, adapter_name: str) -> torch.Tensor:
        """y = Σ_p w_p h_p with w = softmax(aggregator([h_1 ... h_P])) smoothed; (P·B, S, H) -> (B, S, H)."""
        num_streams = self.num_streams[adapter_name]
        if num_streams == 1:
            return hidden_states
        rows, length, hidden_size = hidden_states.shape
        h = hidden_states.view(num_streams, rows // num_streams, length, hidden_size)  # h[p] = h_p
        # [h_1 ... h_P] in hidden-major order (element h·P + p), as the released checkpoints were trained.
        concatenated = h.permute(1, 2, 3, 0).reshape(rows // num_streams, length, hidden_size * num_streams)
        aggregator = self.parscale_aggregator[adapter_name]
        logits = aggregator(concatenated.to(aggregator[0].weight.dtype))
        compute_dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # at least float32
        weights = torch.softmax(logits.to(compute_dtype), dim=-1)
        epsilon = self.smoothing[adapter_name]
        weights = weights * (1.0 - epsilon) + epsilon / num_streams
        mixed = torch.einsum("bsp,pbsh->bsh", weights, h.to(compute_dtype))
        return mixed.to(hidden_states.dtype)


def decoder_inputs(kwargs: dict) -> torch.Tensor:
    """The decoder's input tensor: `input_ids`, or `inputs_embeds` when those are given instead."""
    return kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]


def check_mask_fits_cache(kwargs: dict, cache: Any, prefix_length: int) -> None:
    """Raise `ValueError` if a 2D attention mask does not cover exactly the cached and the new tokens.

    That happens when `generate` continues from a cache returned by an earlier call: it slices the new inputs by the
    cache length, which counts the prefix slots, and would silently feed the wrong tokens.
    """
    mask = kwargs.get("attention_mask")
    if getattr(cache, "is_compileable", False):
        return  # static caches: generate's 4D masks are built for the streams; the fast path's 2D mask spans the cache
    cached = cache.get_seq_length()
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and isinstance(cached, int)):
        return
    cached_tokens, new_tokens = cached - prefix_length, decoder_inputs(kwargs).shape[1]
    if mask.shape[-1] != cached_tokens + new_tokens:
        raise ValueError(
            f"The attention mask covers {mask.shape[-1]} tokens, but the ParScale cache holds {cached_tokens} and "
            f"{new_tokens} new ones were passed. Continuing generation from a cache returned by an earlier call is "
            "not supported: generate again from the full prompt."
        )


def check_positions_fit(position_ids: torch.Tensor, table: int, first_position: int) -> None:
    """Raise `ValueError` if a real token's position (after the shift to `first_position`) is past a position table."""
    last = int(position_ids.max())
    if last >= table:
        raise ValueError(
            f"This model looks its positions up in a table of {table}. With ParScale its real tokens start at position "
            f"{first_position} (the prefix takes 0..{first_position - 1}), so at most {table - first_position} fit: "
            f"position {last - first_position} was asked for."
        )


def to_stream_inputs(kwargs: dict, num_streams: int, prefix_length: int | None, first_position: int = 0) -> dict:
    """Replicate the decoder inputs into streams; with a resident prefix (`prefix_length` given), also prepend T
    visible slots to the 2D attention mask and give the real tokens their positions explicitly. With a
    `first_position` (models with a position table), every real token's position is shifted by it, so it is given
    explicitly too.

    4D masks (or a dict of them) are passed through: only `generate` makes those, through
    `ParScaleModel`'s `create_masks_for_generate`, which calls this function first.
    """
    kwargs = dict(kwargs)
    inputs = decoder_inputs(kwargs)
    batch_size, query_length = inputs.shape[:2]
    for name in ("input_ids", "inputs_embeds", "token_type_ids"):  # token types: GPT-2, GPT-BigCode
        if kwargs.get(name) is not None and kwargs[name].shape[0] == batch_size:
            kwargs[name] = repeat_streams(kwargs[name], num_streams)
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and position_ids.shape[0] == batch_size:
        kwargs["position_ids"] = repeat_streams(position_ids, num_streams)
    mask = kwargs.get("attention_mask")
    for prepared in mask.values() if isinstance(mask, dict) else [mask]:
        # Only generate's static-cache masks, built for the streams and the resident prefix, may arrive prepared.
        is_4d = isinstance(prepared, torch.Tensor) and prepared.dim() == 4
        if is_4d and (prefix_length is None or prepared.shape[0] != num_streams * batch_size):
            raise ValueError("ParScale does not support custom 4D attention masks: pass a 2D padding mask.")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        mask = repeat_streams(mask, num_streams)
        if prefix_length is not None:
            mask = torch.cat([mask.new_ones(mask.shape[0], prefix_length), mask], dim=-1)
        kwargs["attention_mask"] = mask
    if position_ids is None and (prefix_length is not None or first_position):
        # The cache counts the prefix's T slots; the real tokens' positions still start at 0 (or `first_position`).
        cached = 0 if prefix_length is None else int(kwargs["past_key_values"].get_seq_length()) - prefix_length
        kwargs["position_ids"] = torch.arange(cached, cached + query_length, device=inputs.device)[None]
    if first_position:
        kwargs["position_ids"] = kwargs["position_ids"] + first_position
    return kwargs
