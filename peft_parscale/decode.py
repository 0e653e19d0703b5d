"""Fast decoding: a static KV cache, one compiled decode step replayed as a CUDA graph, no host waits between steps.

`model.generate(..., cache_implementation="static")` already compiles the decode step (transformers does so by itself
on CUDA), and ParScale's hooks trace into that graph without breaks. But `generate` runs a Python loop between the
steps (input preparation, 4D mask building, logits processors, stopping criteria) and waits for the device at every
step to check whether all sequences have finished, so host and device time add up (BENCHMARKS.md, "The fast decode
path", compares the two).
Sampling in `generate` also calls `torch.multinomial`, which keeps its step out of CUDA graphs.

`fast_generate` keeps only what greedy search and sampling need. Each distinct prompt is run once (uncompiled, like
`generate`'s prefill, but once however many sequences continue it: their cache rows are copies); then every decode
step is the same compiled function of (previous token, positions, one uniform number per sequence): the model's
forward pass over a static cache, with an attention mask that covers the whole generation from the start (the
prompt's padding, then ones; causality hides the slots not written yet), so it never changes, followed by the choice
of the next token on the device (`sampling.TokenSelector`). The host only queues replays. Every `check_every` steps
(and only if there is an end-of-sequence id or a stop string) it reads the new tokens once, to stop early when every
sequence has ended; the end-of-sequence handling itself is applied afterwards (`EndOfSequences`), giving what
`generate` returns.

With a ParScale adapter active, the prefix is written once into the cache's first T slots (`cache.py`) and no step
copies it. The cache, mask buffer and compiled step are kept on the model for the next call with the same number of
sequences, total length, adapter and token selection, as `generate` keeps its static cache.

With `fuse_projections=True` the products that read one input (query, key and value; gate and up) run as one product
over a copy of their weights stacked (`fused_projections.py`), kept with the decoder.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerBase, StaticCache, StopStringCriteria

from .cache import copy_prompt_rows, make_prefix_resident, takes_prompt_rows
from .decode_attention import grouped_query_decoding
from .end_of_sequence import EndOfSequences, token_id_list
from .fused_projections import FusedProjections
from .generation_settings import resolve_generation_config
from .layer import ParScaleStreams
from .sampling import GREEDY, TokenSelector, draw_uniforms

DEFAULT_COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": True}
# Tokens (streams counted) in one forward pass of the prefill: enough to keep a GPU's matrix units busy, few enough
# that the activations stay small beside the cache (0.6 GB per MLP activation at Qwen2.5-0.5B's width, bfloat16).
PREFILL_TOKENS = 65_536


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel` (the model itself otherwise)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position, counting from the first unpadded token of its left-padded row (padding: 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def active_streams(model: nn.Module) -> tuple[ParScaleStreams, str] | None:
    """The streams module of `model` whose adapter is active, and that adapter's name; None without one."""
    for module in model.modules():
        if isinstance(module, ParScaleStreams) and module.active_adapter_name() is not None:
            return module, module.active_adapter_name()
    return None


def active_adapters_key(model: nn.Module) -> tuple[str | None, ...]:
    """The active ParScale adapter of each streams module in `model` (None where disabled): what the cache depends on."""
    return tuple(module.active_adapter_name() for module in model.modules() if isinstance(module, ParScaleStreams))


class FastDecoder:
    """The static cache, attention mask buffer and compiled decode step for one number of sequences, total length and
    token selector; with `fuse_projections`, the stacked weights of the fused products too, and with
    `prefill_compile_options` the prompts' forward pass compiled."""

    def __init__(
        self,
        causal_lm: nn.Module,
        batch_size: int,
        max_length: int,
        selector: TokenSelector,
        compile_options: dict[str, Any] | None,
        fuse_projections: bool = False,
        prefill_compile_options: dict[str, Any] | None = None,
    ) -> None:
        self.causal_lm = causal_lm
        self.batch_size, self.max_length, self.selector = batch_size, max_length, selector
        self.cache = StaticCache(config=causal_lm.config, max_cache_len=max_length)
        device = next(causal_lm.parameters()).device
        self.attention_mask = torch.ones(batch_size, max_length, dtype=torch.long, device=device)
        self.used = False
        self.step = self.next_tokens if compile_options is None else torch.compile(self.next_tokens, **compile_options)
        self.compiled = compile_options is not None
        self.prompt_forward = self.forward_prompts
        if prefill_compile_options is not None:
            self.prompt_forward = torch.compile(self.forward_prompts, **prefill_compile_options)
        self.fused = FusedProjections(causal_lm) if fuse_projections else None

    def fused_products(self) -> contextlib.AbstractContextManager:
        """The block in which the fused products are in use (none without `fuse_projections`)."""
        return contextlib.nullcontext() if self.fused is None else self.fused.applied()

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the model builds its own (compiled functions and caches are not copied)

    def next_tokens(
        self, input_ids: torch.Tensor, positions: torch.Tensor, uniforms: torch.Tensor | None
    ) -> torch.Tensor:
        """Tokens at `positions` in, each sequence's next token (B, 1) out; the cache is updated in place. With one
        token per sequence this is the decode step, the function that is compiled."""
        logits = self.causal_lm(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        return self.selector(logits[:, -1], uniforms)[:, None]

    @torch.no_grad()
    def prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, uniforms: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompts (each distinct one once); return the first new token (B, 1) and the positions of the next
        step (B, 1)."""
        with self.fused_products():
            if self.used:
                self.cache.reset()  # ParScale's cache layers write the prefix back into the first T slots
            self.used = True
            prompt_length = input_ids.shape[1]
            self.attention_mask[:, :prompt_length].copy_(attention_mask)
            self.attention_mask[:, prompt_length:].fill_(1)
            if not takes_prompt_rows(self.cache):  # sliding-window layers: every row runs through the static cache
                positions = positions_from_mask(attention_mask)
                return self.next_tokens(input_ids, positions, uniforms), positions[:, -1:] + 1
            prompts, prompt_of_row = torch.unique(
                torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1), dim=0, return_inverse=True
            )
            prompt_ids, prompt_mask = prompts.split(prompt_length, dim=1)
            positions = positions_from_mask(prompt_mask)
            logits = self.run_prompts_once(prompt_ids, prompt_mask, positions, prompt_of_row)
            return self.selector(logits[prompt_of_row], uniforms)[:, None], positions[prompt_of_row, -1:] + 1

    def run_prompts_once(
        self,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        positions: torch.Tensor,
        prompt_of_row: torch.Tensor,
    ) -> torch.Tensor:
        """Each distinct prompt's last logits (N, vocab); its keys/values are written into the static cache's rows
        of the sequences that continue it (`prompt_of_row`: for each row, the index of its prompt).

        `generate` runs a prompt once per sequence; HumanEval's 20 samples per problem would run each prompt 20·P
        times, and at P=8 the activations of those rows (2,048 rows of 512 tokens) exhausted an 80 GB GPU. Here each
        distinct prompt runs once, in chunks of about `PREFILL_TOKENS` stream tokens, each chunk through a dynamic
        cache whose rows are then copied into the static one (`cache.copy_prompt_rows`).
        """
        streams = active_streams(self.causal_lm)
        num_streams = 1
        if streams is not None:
            module, adapter_name = streams
            make_prefix_resident(self.cache, module.attention_prefixes(adapter_name))
            num_streams = module.num_streams[adapter_name]
        num_prompts, prompt_length = prompt_ids.shape
        per_chunk = max(1, PREFILL_TOKENS // (num_streams * prompt_length))
        logits = []
        for first in range(0, num_prompts, per_chunk):
            chunk = slice(first, first + per_chunk)
            chunk_logits, prompt_cache = self.prompt_forward(prompt_ids[chunk], prompt_mask[chunk], positions[chunk])
            in_chunk = (prompt_of_row >= first) & (prompt_of_row < first + per_chunk)
            rows = in_chunk.nonzero().squeeze(1)
            copy_prompt_rows(
                self.cache, prompt_cache, rows, prompt_of_row[rows] - first, self.batch_size, prompt_length
            )
            logits.append(chunk_logits)
            del prompt_cache  # before the next chunk's forward pass: one chunk's cache at a time
        return torch.cat(logits)

    def forward_prompts(
        self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, DynamicCache]:
        """One chunk of prompts through a dynamic cache: their last logits (N, vocab) and the cache; the function
        `prefill_compile_options` compiles."""
        prompt_cache = DynamicCache()
        logits = self.causal_lm(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            position_ids=positions,
            past_key_values=prompt_cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        return logits[:, -1], prompt_cache

    @torch.no_grad()
    def run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        uniforms: Sequence[torch.Tensor] | None = None,
        all_ended: Callable[[torch.Tensor], bool] | None = None,
        check_every: int = 32,
    ) -> torch.Tensor:
        """The prompt followed by up to `max_new_tokens` new tokens, (B, S + n).

        `uniforms`: each step's uniform numbers, (B,) (sampling only). `all_ended`, if given, is called every
        `check_every` steps with the new tokens so far (B, t); the loop stops when it returns True.
        """
        # no per-head copies of the cache (decode_attention.py)
        with grouped_query_decoding(self.causal_lm), self.fused_products():
            first, positions = self.prefill(input_ids, attention_mask, None if uniforms is None else uniforms[0])
            new_tokens = [first.clone()]  # in memory of its own, like the later steps' inputs (see below)
            for index in range(1, max_new_tokens):
                if all_ended is not None and index % check_every == 0 and all_ended(torch.cat(new_tokens, dim=1)):
                    break
                if self.compiled:
                    # Each call is a new step: the graph's previous outputs may be overwritten (they are copied out).
                    torch.compiler.cudagraph_mark_step_begin()
                step_uniforms = None if uniforms is None else uniforms[index]
                # The copy of the output is the next step's input. Every input has memory of its own (views into one
                # buffer would change storage offset at every step, which a step compiled for dynamic shapes guards
                # on and would be compiled again for) and the same strides whatever the number of steps.
                new_tokens.append(self.step(new_tokens[-1], positions, step_uniforms).clone())
                positions.add_(1)
        return torch.cat([input_ids, *new_tokens], dim=1)


def forget_fast_decoder(model: nn.Module) -> None:
    """Free what the fast path keeps on the model for its next call: the static cache, the compiled step and, with
    `fuse_projections`, the copy of the fused weights."""
    causal_lm_of(model).__dict__.pop("_parscale_fast_decoder", None)
    gc.collect()  # the decoder refers to itself (its compiled step is its own bound method): only the collector frees it


def fast_decoder(
    model: nn.Module,
    batch_size: int,
    max_length: int,
    selector: TokenSelector = GREEDY,
    compile: bool = False,
    compile_options: dict[str, Any] | None = None,
    fuse_projections: bool = False,
    prefill_compile_options: dict[str, Any] | None = None,
) -> FastDecoder:
    """The decoder `fast_generate` uses for this number of sequences, total length (prompt + new tokens) and selector:
    the one kept on the model if it matches (same shapes, adapter, selector, compile options of the step and of the
    prefill, projections and the model's device and dtype), else a new one, which replaces it."""
    causal_lm = causal_lm_of(model)
    options = (compile_options or DEFAULT_COMPILE_OPTIONS) if compile else None
    weight = next(causal_lm.parameters())
    placement = (weight.device, weight.dtype)  # a model moved or cast needs a cache (and copies) where it now is
    compiled = repr(options), repr(prefill_compile_options)
    key = (batch_size, max_length, active_adapters_key(causal_lm), selector, compiled, fuse_projections, placement)
    decoder = getattr(causal_lm, "_parscale_fast_decoder", None)
    if decoder is None or decoder.key != key:
        if decoder is not None:
            decoder = None
            forget_fast_decoder(causal_lm)  # the old one's cache and copies are freed before the new ones are made
        decoder = FastDecoder(
            causal_lm, batch_size, max_length, selector, options, fuse_projections, prefill_compile_options
        )
        decoder.key = key
        causal_lm._parscale_fast_decoder = decoder  # one at a time, like generate's static cache
    return decoder


@torch.no_grad()
def fast_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    generation_config: GenerationConfig | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    compile: bool | None = None,
    compile_options: dict[str, Any] | None = None,
    check_every: int = 32,
    fuse_projections: bool = False,
    prefill_compile_options: dict[str, Any] | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Greedy search or sampling with a static cache and a compiled, CUDA-graphed decode step; returns what
    `model.generate` returns for the same settings.

    Works on a `PeftModel` with a ParScale adapter (the active adapter is used; `disable_adapter()` gives the base
    model) and on a plain transformers causal LM; prompts are left-padded through `attention_mask`. The settings are
    resolved as `generate` resolves them: `generation_config`, its unset values from the model's `generation_config`
    (so a checkpoint's defaults apply), then transformers' defaults, and keyword `settings` override all of them.

    Implemented: `max_new_tokens` (or `max_length`), `do_sample`, `temperature`, `top_k`, `top_p`,
    `num_return_sequences` (each prompt's sequences are consecutive rows, as in `generate`), `eos_token_id` (one or a
    list), `pad_token_id`, `stop_strings` (with `tokenizer`). Anything else that changes the tokens raises
    `ValueError` before any computation: beam search and the other non-greedy, non-sampling modes, and
    `repetition_penalty`, `no_repeat_ngram_size`, `bad_words_ids`, `sequence_bias`, `min_length`, `min_new_tokens`,
    `forced_bos_token_id`, `forced_eos_token_id`, `suppress_tokens`, `begin_suppress_tokens`,
    `exponential_decay_length_penalty`, `remove_invalid_values`, `guidance_scale`, `watermarking_config`,
    `max_time`, `token_healing`, `return_dict_in_generate`, and when sampling `min_p`, `top_h`, `typical_p`,
    `epsilon_cutoff`, `eta_cutoff`. Settings that cannot change the tokens (`use_cache`, `cache_implementation`,
    `compile_config`, sampling settings when greedy, ...) are ignored.

    Each distinct prompt runs once in the prefill, however many rows hold it (`num_return_sequences`, or the same
    prompt passed several times), in chunks of about `PREFILL_TOKENS` stream tokens; its cache rows are then copied.

    Greedy tokens equal `generate`'s up to the rounding differences of compiled kernels: identical in float32, and
    they can differ where two logits are within rounding of each other in bfloat16. Sampling draws from the
    distribution `generate` samples from, with its own randomness: before the first step, each returned sequence r
    gets `max_new_tokens` uniform numbers in [0, 1),
        `torch.rand(rows, max_new_tokens, generator=generator, device=generator.device)[r]`
    (rows = batch size × num_return_sequences; `generator=None` draws from the default generator of the model's
    device), or with a list of generators, one per returned sequence,
        `torch.rand(max_new_tokens, generator=generator[r], device=generator[r].device)`,
    in which case a sequence does not depend on the other rows of the batch. The same number of values is drawn
    however early the generation ends. Step t of sequence r picks its token with the t-th number as `TokenSelector`
    describes (inverse-CDF sampling after temperature, top-k and top-p).

    Why one uniform number per step, drawn before the loop: torch.compile cannot trace a random op given a
    `torch.Generator` (a graph break, an error with `fullgraph=True`; checked with torch 2.13), and inside a CUDA graph
    only generators registered with it advance between replays (CUDA-graph trees handle the default CUDA generator
    alone). Drawing up front keeps the step free of random ops, makes the draws independent of compilation, and is
    cheap: rows × steps floats (160 × 512 × 4 bytes = 320 kB), where Gumbel-max sampling would need one number per
    vocabulary entry (× 151,936 for Qwen2.5: 50 GB). Inverse-CDF sampling needs just one.

    Args:
        model: The model (`PeftModel` or transformers causal LM).
        input_ids: Prompt token ids, (B, S).
        attention_mask: (B, S) with zeros on left padding; all ones if omitted.
        generation_config: The generation settings (see above); the model's `generation_config` fills unset values.
        generator: Source of the uniform numbers when sampling: one `torch.Generator`, or one per returned sequence.
        tokenizer: Needed for `stop_strings`.
        compile: Compile the decode step (`torch.compile`, CUDA graphs by default); defaults to True on CUDA. The
            sampling step's cumulative sums are computed in chunks (`peft_parscale.sampling.cumulative_sum`), short
            enough for inductor's scan code generation on CUDA (BENCHMARKS.md, "Code changed after the GPU runs", has
            the failure this avoids; `python -m benchmarks.run --suites selector` checks it on a GPU).
        compile_options: Keyword arguments of `torch.compile`; default `{"mode": "reduce-overhead", "fullgraph": True}`.
            Each new number of sequences, total length, adapter or sampling setting compiles the step again; add
            `"dynamic": True` or raise `torch._dynamo.config.recompile_limit` (8 by default) when decoding many shapes.
        check_every: Steps between the checks for every sequence having ended (each waits for the device once).
        fuse_projections: Run each layer's query, key and value products as one product, and its gate and up
            products as one (`peft_parscale.fused_projections`): fewer, larger kernels for the decode step's few rows.
            Costs a copy of those weights (about 60 % of a Qwen2.5 layer's) for as long as the decoder is kept on the
            model (`forget_fast_decoder` frees it); the copy is made again where a weight was changed in place
            (torch counts such changes, except those made through `.data`) or replaced. The model itself is not
            changed. Projections that are not plain `nn.Linear` (a LoRA-wrapped one) keep their own products.
        prefill_compile_options: Keyword arguments of `torch.compile` for the prompts' forward pass (default: not
            compiled), for the time to the first token: `{"fullgraph": True}` compiles it without CUDA graphs (whose
            memory would stay reserved for every prompt shape). The first prompt shape compiles it for that shape,
            the second once more with dynamic shapes (torch.compile's automatic dynamic shapes), which later shapes
            reuse.
        **settings: Generation settings overriding `generation_config` (`max_new_tokens=...`, `do_sample=...`, ...).

    Returns:
        (B × num_return_sequences, S + n) token ids: each prompt followed by n <= max_new_tokens new tokens.

    Example:

        ```py
        >>> import peft_parscale
        >>> from peft import PeftModel
        >>> from peft_parscale.decode import fast_generate
        >>> model = PeftModel.from_pretrained(base.cuda(), "qwen2.5-1.5b-parscale-p8").eval()
        >>> tokens = fast_generate(
        ...     model, inputs.input_ids, inputs.attention_mask, max_new_tokens=512, do_sample=True, temperature=0.8,
        ...     top_p=0.95, top_k=0, num_return_sequences=20, generator=torch.Generator("cuda").manual_seed(0),
        ...     stop_strings=["\\ndef"], tokenizer=tokenizer,
        ... )
        ```
    """
    causal_lm = causal_lm_of(model)
    config = resolve_generation_config(causal_lm, generation_config, settings)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(input_ids.shape)}.")
    prompt_length = input_ids.shape[1]
    max_new_tokens = config.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = config.max_length - prompt_length
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}.")
    stop_strings = None
    if config.stop_strings:
        if tokenizer is None:
            raise ValueError("Stop strings need the model's tokenizer: pass `tokenizer`.")
        stop_strings = StopStringCriteria(tokenizer, config.stop_strings)
    eos_token_ids = token_id_list(config.eos_token_id)
    pad_token_id = config.pad_token_id
    if pad_token_id is None and eos_token_ids:
        pad_token_id = eos_token_ids[0]  # what generate does
    selector = TokenSelector.from_generation_config(config)
    rows, device = input_ids.shape[0] * config.num_return_sequences, input_ids.device
    uniforms = draw_uniforms(generator, rows, max_new_tokens, device) if selector.do_sample else None
    input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
    attention_mask = attention_mask.to(device).repeat_interleave(config.num_return_sequences, dim=0)
    if compile is None:
        compile = device.type == "cuda"
    decoder = fast_decoder(
        model,
        rows,
        prompt_length + max_new_tokens,
        selector,
        compile,
        compile_options,
        fuse_projections,
        prefill_compile_options,
    )
    if not eos_token_ids and stop_strings is None:
        return decoder.run(input_ids, attention_mask, max_new_tokens, uniforms)
    ends = EndOfSequences(input_ids, eos_token_ids, stop_strings, pad_token_id if eos_token_ids else None)
    sequences = decoder.run(input_ids, attention_mask, max_new_tokens, uniforms, ends.all_ended, check_every)
    return ends.finish(sequences)


def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
    compile_options: dict[str, Any] | None = None,
    fuse_projections: bool = False,
    prefill_compile_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Greedy decoding on the fast path: `fast_generate` with `do_sample=False`.

    Returns what `model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False)` returns (the
    other settings of the model's `generation_config` apply, and `fast_generate` refuses those it does not
    implement). `eos_token_id` and `pad_token_id` default to the generation config's (pad: else the first EOS id).

    Example:

        ```py
        >>> from peft_parscale.decode import greedy_generate
        >>> tokens = greedy_generate(model, inputs.input_ids, inputs.attention_mask, max_new_tokens=128)
        ```
    """
    settings = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    return fast_generate(
        model,
        input_ids,
        attention_mask,
        compile=compile,
        compile_options=compile_options,
        fuse_projections=fuse_projections,
        prefill_compile_options=prefill_compile_options,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **{name: value for name, value in settings.items() if value is not None},
    )
