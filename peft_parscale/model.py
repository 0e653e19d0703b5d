"""`ParScaleModel`: the PEFT tuner that puts ParScale on a transformers causal LM (see `layer.py` for the mechanism)."""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import load_file
from torch import nn
from transformers.masking_utils import create_masks_for_generate

from .config import VALUE_HEAD_DIM, ParScaleConfig, full_base_shape
from .init import config_token_ids, init_prefixes_from_token_ids
from .layer import ParScaleAttention, ParScaleLayer, ParScaleStreams
from .probe import Probe, probe_decoder

SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
# How transformers' attention modules hand their post-rotary keys/values to the KV cache and attend to what it returns:
# `<cache>.update(<keys>, <values>, self.layer_idx[, ...])`, on one line. ParScale's prefix goes in at that call.
_CACHE_UPDATE = re.compile(r"\.update\(.*\bself\.layer_idx\b")
# The names transformers gives an attention module's cache argument, for a forward without type annotations.
_CACHE_ARGUMENT_NAMES = ("past_key_values", "layer_past", "past_key_value")


@dataclass(frozen=True)
class Architecture:
    """Where ParScale attaches in a model, and the dimensions its tensors depend on.

    decoder_name: the decoder (`get_decoder()`), e.g. `model` or `transformer`.
    attention_names: each layer's attention module, in layer order, e.g. `transformer.h.0.attn`.
    shape: the dimensions the adapter's tensors depend on (`BASE_SHAPE_FIELDS`, and `VALUE_HEAD_DIM` where the cached
        values differ in size from the keys).
    cache_arguments: per attention module, the name of its cache argument (`past_key_values`, `layer_past`).
    sliding_layers: per attention module, whether it is a sliding-window layer.
    position_table: the length of the table the model looks its positions up in (learned, as in GPT-2, or fixed
        rotary angles, as in CodeGen and GPT-J), which has no negative positions; None where positions are computed.
    """

    decoder_name: str
    attention_names: tuple[str, ...]
    shape: dict[str, int]
    cache_arguments: tuple[str, ...] = ()
    sliding_layers: tuple[bool, ...] = ()
    position_table: int | None = None


def _writes_keys_to_cache(module: nn.Module) -> bool:
    """Whether `module` is an attention module that passes its keys/values through the cache's `update` with its
    own layer index (read from the source of its class's `forward`)."""
    return isinstance(getattr(module, "layer_idx", None), int) and _forward_updates_cache(type(module))


@functools.cache
def _forward_updates_cache(module_class: type) -> bool:
    # Once per class: every module of a model is checked, and reading a source file costs about a millisecond.
    try:
        source = inspect.getsource(module_class.forward)
    except (OSError, TypeError, AttributeError):  # no module, or no source to check
        return False
    return _CACHE_UPDATE.search(source) is not None


def _attention_modules(layer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name within `layer`, module) of each attention module of one decoder layer; a wrapped module is named by its
    `ParScaleAttention` wrapper."""
    found, wrapped = [], []
    for name, module in layer.named_modules():
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue  # inside a wrapper: the wrapped module was checked through it
        base = module
        if isinstance(module, ParScaleAttention):
            wrapped.append(name)
            base = module.get_base_layer()
        if _writes_keys_to_cache(base):
            found.append((name, base))
    return found


def _cache_argument(parameters: Mapping[str, inspect.Parameter]) -> str | None:
    """The name of the argument through which an attention module's forward (its `parameters`) receives the KV cache:
    the one annotated as a `Cache`, else the name transformers uses for it."""
    for name, parameter in parameters.items():
        annotation = parameter.annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "") or str(annotation)
        if re.search(r"\bCache\b", str(text)):
            return name
    return next((name for name in _CACHE_ARGUMENT_NAMES if name in parameters), None)


def _cached_shape(model_name: str, probe: Probe) -> dict[str, int]:
    """The prefix's dimensions (`BASE_SHAPE_FIELDS` but the layer count and hidden size, and `VALUE_HEAD_DIM` where it
    differs from `head_dim`) from what every attention layer passed to `cache.update`, or `ValueError`."""
    if len(set(probe.key_shapes)) != 1 or len(set(probe.value_shapes)) != 1:
        raise ValueError(
            f"ParScale gives every layer a prefix of one shape; the attention layers of {model_name} cache keys of "
            f"(heads, size) {sorted(set(probe.key_shapes))} and values of {sorted(set(probe.value_shapes))}."
        )
    (key_heads, key_size), (value_heads, value_size) = probe.key_shapes[0], probe.value_shapes[0]
    if key_heads != value_heads:
        raise ValueError(
            f"ParScale needs the keys and values an attention layer caches to have the same number of heads; "
            f"{model_name} caches {key_heads} key heads and {value_heads} value heads."
        )
    shape = {"num_key_value_heads": key_heads, "head_dim": key_size}
    if value_size != key_size:  # latent attention: a compressed latent and the keys' rotary part (DeepSeek-V2/V3)
        shape[VALUE_HEAD_DIM] = value_size
    return shape


def _layer_types(config, num_layers: int) -> list[str]:
    """Each layer's attention type, as transformers' caches and masks decide it."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return list(layer_types)
    if getattr(config, "sliding_window", None) is not None:
        return ["sliding_attention"] * num_layers
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * num_layers
    return ["full_attention"] * num_layers


def _uses_alibi(config, parameters: Mapping[str, inspect.Parameter]) -> bool:
    """ALiBi: Falcon with `alibi=True`, MPT (`attn_config.alibi`), BLOOM (an `alibi` argument of the attention's
    forward, its `parameters`, with no switch)."""
    if getattr(config, "alibi", False) or getattr(getattr(config, "attn_config", None), "alibi", False):
        return True
    return "alibi" in parameters and not hasattr(config, "alibi")


def describe_architecture(model: nn.Module) -> Architecture:
    """Find the decoder, its layers, their attention modules and cache arguments from the model's structure, or raise
    `ValueError` naming what is unsupported.

    The decoder is `model.get_decoder()`. Its layer list is the child `ModuleList` in which every layer has exactly
    one attention module, found as the module that passes its keys/values through the KV cache
    (`<cache>.update(keys, values, self.layer_idx)`, the point where ParScale adds its prefix). Its cache argument is
    the forward argument annotated as a `Cache` (`past_key_values` in Llama-style models, `layer_past` in GPT-NeoX,
    Falcon and GPT-BigCode). The prefix's shape, and whether the model looks its positions up in a table, come from
    one forward pass of the decoder over one token (`probe.probe_decoder`).
    """
    config = getattr(model, "config", None)
    model_name = type(model).__name__
    if config is None:
        raise ValueError(
            f"ParScale supports transformers causal LMs (AutoModelForCausalLM); {model_name} has no config."
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"ParScale supports decoder-only causal LMs; {model_name} is an encoder-decoder model, whose decoder also "
            "attends to the encoder's outputs: there the prefix has no self-attention cache to live in."
        )
    text_config = config.get_text_config(decoder=True)
    if getattr(text_config, "add_cross_attention", False):
        raise ValueError(
            f"ParScale supports decoder-only causal LMs; this {model_name} has cross-attention layers "
            "(add_cross_attention=True) that attend to an encoder's outputs."
        )
    if not getattr(text_config, "is_causal", True):
        raise ValueError(f"ParScale needs causal attention; this {model_name} is configured with is_causal=False.")
    implementation = text_config._attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"ParScale supports attn_implementation in {SUPPORTED_ATTENTION}, not {implementation!r}: load the model "
            f"with attn_implementation='sdpa'."
        )
    names = {module: name for name, module in model.named_modules()}
    decoder = model.get_decoder() if callable(getattr(model, "get_decoder", None)) else None
    if decoder is None or not names.get(decoder):
        # get_decoder() is a best-effort lookup (it returns the model itself for some, e.g. Llama4ForCausalLM): take
        # the one child that holds a list of layers instead.
        children = [
            child
            for child in model.children()
            if any(isinstance(grandchild, nn.ModuleList) for grandchild in child.children())
        ]
        decoder = children[0] if len(children) == 1 else None
    if decoder is None:
        raise ValueError(f"ParScale needs a causal LM whose get_decoder() is a submodule; {model_name} has none.")

    # The layer list: the decoder's ModuleList in which every layer has exactly one attention module.
    layer_lists = [(name, child) for name, child in decoder.named_children() if isinstance(child, nn.ModuleList)]
    problem = f"{model_name}'s decoder ({type(decoder).__name__}) has no list of layers"
    layers_name, attentions = None, None
    for name, layers in layer_lists:
        found = [_attention_modules(layer) for layer in layers]
        if layers and all(len(modules) == 1 for modules in found):
            layers_name, attentions = name, [modules[0] for modules in found]
            break
        bad = next((index for index, modules in enumerate(found) if len(modules) != 1), None)
        if bad is not None:
            modules = found[bad]
            what = "none" if not modules else f"{len(modules)} ({', '.join(name for name, _ in modules)})"
            problem = f"layer {bad} of {model_name} ({type(layers[bad]).__name__}) has {what}"
    if attentions is None:
        raise ValueError(
            "ParScale needs one attention module per decoder layer that passes its post-rotary keys/values through "
            f"the KV cache (`cache.update(keys, values, self.layer_idx)`), where the prefix is added; {problem}."
        )

    decoder_name = names[decoder]
    attention_names, cache_arguments = [], []
    for index, (name, attention) in enumerate(attentions):
        parameters = inspect.signature(attention.forward).parameters
        if _uses_alibi(text_config, parameters):
            raise ValueError(
                f"{model_name} uses ALiBi position biases, which ParScale does not support: the model adds them to the "
                "attention scores of its real keys itself, so the prefix keys would get none, or the wrong ones. "
                "Rotary and learned absolute positions are supported."
            )
        cache_argument = _cache_argument(parameters)
        if cache_argument is None or "attention_mask" not in parameters:
            raise ValueError(
                f"ParScale needs attention modules that take the KV cache and an `attention_mask` as arguments; "
                f"{type(attention).__name__} (layer {index} of {model_name}) takes {list(parameters)}."
            )
        attention_names.append(f"{decoder_name}.{layers_name}.{index}.{name}")
        cache_arguments.append(cache_argument)
    if "position_ids" not in inspect.signature(decoder.forward).parameters:
        raise ValueError(
            f"ParScale needs a decoder that takes `position_ids` (the real tokens' positions must not count the "
            f"prefix); {type(decoder).__name__}.forward does not."
        )

    layer_types = _layer_types(text_config, len(attentions))
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported or len(layer_types) != len(attentions):
        raise ValueError(
            f"ParScale supports full and sliding-window attention layers; this {model_name} has {unsupported or layer_types} "
            "layers."
        )
    # What the layers cache, and whether positions index a table, are seen in one forward pass (`probe.py`).
    probe = probe_decoder(decoder, [attention.layer_idx for _, attention in attentions])
    shape = {"num_hidden_layers": len(attentions), "hidden_size": text_config.hidden_size}
    shape.update(_cached_shape(model_name, probe))
    return Architecture(
        decoder_name,
        tuple(attention_names),
        shape,
        tuple(cache_arguments),
        tuple(layer_type == "sliding_attention" for layer_type in layer_types),
        probe.position_table,
    )


def expected_adapter_shapes(architecture: Architecture, config: ParScaleConfig) -> dict[str, tuple[int, ...]]:
    """The tensors of a saved adapter (PEFT's checkpoint keys, adapter name removed) and their shapes."""
    shape = full_base_shape(architecture.shape)
    heads, length = shape["num_key_value_heads"], config.prefix_length
    prefix_shapes = {
        "k": (config.P, heads, length, shape["head_dim"]),
        "v": (config.P, heads, length, shape[VALUE_HEAD_DIM]),
    }
    expected = {
        f"base_model.model.{name}.parscale_prefix_{kind}": prefix_shape
        for name in architecture.attention_names
        for kind, prefix_shape in prefix_shapes.items()
    }
    if config.P > 1:
        hidden, streams = shape["hidden_size"], config.P
        aggregator = f"base_model.model.{architecture.decoder_name}.streams.parscale_aggregator"
        expected.update(
            {
                f"{aggregator}.0.weight": (hidden, streams * hidden),
                f"{aggregator}.0.bias": (hidden,),
                f"{aggregator}.2.weight": (streams, hidden),
                f"{aggregator}.2.bias": (streams,),
            }
        )
    return expected


def read_adapter_file(directory: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The path and tensors of a saved adapter, as PEFT reads them: safetensors if present, else PyTorch's format.

    A ``.bin`` file (``save_pretrained(..., safe_serialization=False)``) is read with ``weights_only=True``, so
    loading it cannot run code. Raises `ValueError` if there is no adapter file or it cannot be read.
    """
    safetensors_path = os.path.join(directory, SAFETENSORS_WEIGHTS_NAME)
    pickle_path = os.path.join(directory, WEIGHTS_NAME)
    path = safetensors_path if os.path.isfile(safetensors_path) or not os.path.isfile(pickle_path) else pickle_path
    if not os.path.isfile(path):
        raise ValueError(f"No {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {directory}: no adapter to load.")
    try:
        tensors = (
            load_file(path) if path == safetensors_path else torch.load(path, map_location="cpu", weights_only=True)
        )
    except Exception as error:  # safetensors and torch.load raise several types for truncated or malformed files
        raise ValueError(f"The adapter file {path} is corrupt or truncated: {error}") from error
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ValueError(f"The adapter file {path} does not hold a flat dictionary of tensors.")
    return path, tensors


def check_adapter_file(directory: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Read a saved adapter and raise `ValueError` if it is missing, unreadable, or does not fit `expected`."""
    path, tensors = read_adapter_file(directory)
    problems = [f"missing {key}" for key in sorted(expected.keys() - tensors.keys())]
    problems += [f"unexpected {key}" for key in sorted(tensors.keys() - expected.keys())]
    for key in sorted(expected.keys() & tensors.keys()):
        tensor = tensors[key]
        if tuple(tensor.shape) != expected[key]:
            problems.append(f"{key} has shape {tuple(tensor.shape)}, expected {expected[key]}")
        elif not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            problems.append(f"{key} is not finite floating point")
    if problems:
        raise ValueError(f"The adapter file {path} does not fit this model: " + "; ".join(problems[:5]))


class ParScaleModel(BaseTuner):
    """Runs a frozen causal LM as P parallel streams with learned prefixes and a learned aggregator (ParScale).

    Created by `peft.get_peft_model` from a `ParScaleConfig`; not meant to be instantiated directly. Each attention
    module is wrapped in a `ParScaleAttention` (its prefixes) and the decoder gets a `ParScaleStreams` child (the
    aggregator, and the hooks that replicate inputs and aggregate outputs). Several adapters, possibly with different
    P, can live on one model; one is active at a time.

    Example:

        ```py
        >>> import peft_parscale  # registers the PARSCALE PEFT type
        >>> from peft import PeftModel, get_peft_model
        >>> from peft_parscale import ParScaleConfig
        >>> from transformers import AutoModelForCausalLM

        >>> base = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
        >>> model = get_peft_model(base, ParScaleConfig(P=4), adapter_name="p4")
        >>> model.add_adapter("p8", ParScaleConfig(P=8))
        >>> model.set_adapter("p8")
        >>> with model.disable_adapter():  # the untouched base model
        ...     base_logits = model(input_ids).logits
        ```
    """

    prefix: str = "parscale_"
    tuner_layer_cls = ParScaleLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # ParScale finds its modules itself

    def _prepare_adapter_config(self, peft_config: ParScaleConfig, model_config: dict) -> ParScaleConfig:
        # Everything that can be wrong is checked here, before PEFT changes any module.
        architecture = describe_architecture(self.model)
        if peft_config.base_shape is None:
            peft_config.base_shape = dict(architecture.shape)
        built_for, this_model = full_base_shape(peft_config.base_shape), full_base_shape(architecture.shape)
        mismatched = [
            f"{name}={built_for[name]} (this model has {this_model[name]})"
            for name in this_model
            if built_for[name] != this_model[name]
        ]
        if mismatched:
            raise ValueError("This ParScale adapter was built for a base model with " + ", ".join(mismatched) + ".")
        table = architecture.position_table
        if table is not None and peft_config.prefix_length >= table:
            raise ValueError(
                f"This model looks its positions up in a table of {table}, with no negative positions: ParScale reads "
                f"a prefix at positions 0..T-1 and starts the real tokens at T, so prefix_length="
                f"{peft_config.prefix_length} leaves no position for them."
            )
        adapter_dir = getattr(peft_config, "adapter_dir", None)
        if adapter_dir is not None:
            check_adapter_file(adapter_dir, expected_adapter_shapes(architecture, peft_config))
        self.architecture = architecture
        # Read by PEFT's injection loop; not saved (a dataclass field would be): it follows from the base model.
        peft_config.target_modules = (architecture.decoder_name, *architecture.attention_names)
        return peft_config

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        # PEFT calls this for `get_peft_model`, `add_adapter` and `load_adapter` alike, so `prefix_init="text"` is
        # applied here. Its text is read and checked before PEFT changes anything; a loaded adapter (`adapter_dir`, set
        # by `ParScaleConfig.from_pretrained`) takes its weights from its file and is not initialised.
        config = self.peft_config[adapter_name]
        token_ids = None
        if config.prefix_init == "text" and getattr(config, "adapter_dir", None) is None:
            if low_cpu_mem_usage:
                raise ValueError("prefix_init='text' needs the adapter's weights: use low_cpu_mem_usage=False.")
            token_ids = config_token_ids(config)
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        if token_ids is not None:
            init_prefixes_from_token_ids(model, token_ids, adapter_name)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # PEFT strips the adapter name when it is the last or second-to-last part of a key; the aggregator's is
        # third-to-last (`parscale_aggregator.<adapter>.0.weight`), so it is stripped here, symmetrically for loading.
        aggregator = ".parscale_aggregator."
        if aggregator in key:
            return key.replace(f"{aggregator}{adapter_name}.", aggregator)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _check_target_module_exists(self, peft_config: ParScaleConfig, key: str) -> bool:
        return key == self.architecture.decoder_name or key in self.architecture.attention_names

    def _create_and_replace(
        self,
        peft_config: ParScaleConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        shape = full_base_shape(self.architecture.shape)
        prefix_sizes = (shape["num_key_value_heads"], shape["head_dim"], shape[VALUE_HEAD_DIM])
        if current_key == self.architecture.decoder_name:
            streams = getattr(target, "streams", None)
            if isinstance(streams, ParScaleStreams):
                streams.update_layer(adapter_name, peft_config)
            else:
                target.streams = ParScaleStreams(target, shape["hidden_size"], adapter_name, peft_config)
                target.streams.position_table = self.architecture.position_table
                self._route_generate_masks(target.streams)
        elif isinstance(target, ParScaleAttention):
            target.update_layer(adapter_name, peft_config, *prefix_sizes)
        else:
            index = self.architecture.attention_names.index(current_key)
            wrapped = ParScaleAttention(
                target,
                adapter_name,
                peft_config,
                *prefix_sizes,
                cache_argument=self.architecture.cache_arguments[index],
                sliding_window=self.architecture.sliding_layers[index],
            )
            self._replace_module(parent, target_name, wrapped, target)

    def _route_generate_masks(self, streams: ParScaleStreams) -> None:
        # With a static cache, `generate` builds the 4D attention masks itself, before the forward pass and its hooks,
        # through the model's `create_masks_for_generate`: the per-model override point transformers offers for it.
        # A bound method (not a closure), so that copies of the model (copy.deepcopy) route to their own streams.
        streams.original_masks_for_generate = getattr(
            self.model, "create_masks_for_generate", create_masks_for_generate
        )
        self.model.create_masks_for_generate = streams.masks_for_generate

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"ParScale runs one adapter at a time; got {names}.")
        super().set_adapter(names[0], inference_mode=inference_mode)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise ValueError(_CANNOT_MERGE)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        raise ValueError(_CANNOT_MERGE)


_CANNOT_MERGE = (
    "A ParScale adapter cannot be merged into, or unloaded onto, the base weights: it changes how the model runs "
    "(P streams and an aggregator), not its weights. For the base model's outputs use `with model.disable_adapter():`; "
    "to keep the adapter, use `save_pretrained` and load it onto the base model again."
)
