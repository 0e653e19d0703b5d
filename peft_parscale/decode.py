"""Fast greedy decoding: a static KV cache, one compiled decode step replayed as a CUDA graph, no host waits.

`model.generate(..., cache_implementation="static")` already compiles the decode step (transformers does so by itself
on CUDA), and ParScale's hooks trace into that graph without breaks. But `generate` runs a Python loop between the
steps (input preparation, 4D mask building, logits processors, stopping criteria) and waits for the device at every
step to check whether all sequences have finished, so host and device time add up. On an H100, for the Qwen2.5-1.5B
shape with P=8 at batch 1, that compiled `generate` took 5.3 ms per token and this loop 3.0 ms (BENCHMARKS.md).

`greedy_generate` keeps only what greedy decoding needs. The prompt is run once (uncompiled, like `generate`'s
prefill); then every decode step is the same compiled function of (previous token, positions): the model's forward
pass over a static cache, with an attention mask that covers the whole generation from the start (the prompt's
padding, then ones; causality hides the slots not written yet), so it never changes, and the argmax. The host only
queues replays; it never reads a result until the end. End-of-sequence handling is applied afterwards: tokens after a
sequence's first `eos_token_id` become `pad_token_id`, and trailing steps where every sequence had finished are
dropped, which is what `generate` returns for greedy search.

With a ParScale adapter active, the prefix is written once into the cache's first T slots (`cache.py`) and no step
copies it. The cache, mask buffer and compiled step are kept on the model for the next call with the same batch
size, total length and adapter, as `generate` keeps its static cache.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import StaticCache

from .layer import ParScaleStreams

DEFAULT_COMPILE_OPTIONS = {"mode": "reduce-overhead", "fullgraph": True}


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The transformers model under a `PeftModel` (the model itself otherwise)."""
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model


def active_adapters_key(model: nn.Module) -> tuple[str | None, ...]:
    """The active ParScale adapter of each streams module in `model` (None where disabled): what the cache depends on."""
    return tuple(module.active_adapter_name() for module in model.modules() if isinstance(module, ParScaleStreams))


class GreedyDecoder:
    """The static cache, attention mask buffer and compiled decode step for one batch size and total length."""

    def __init__(
        self, causal_lm: nn.Module, batch_size: int, max_length: int, compile_options: dict[str, Any] | None
    ) -> None:
        self.causal_lm = causal_lm
        self.batch_size, self.max_length = batch_size, max_length
        self.cache = StaticCache(config=causal_lm.config, max_cache_len=max_length)
        device = next(causal_lm.parameters()).device
        self.attention_mask = torch.ones(batch_size, max_length, dtype=torch.long, device=device)
        self.used = False
        self.step = self.next_tokens if compile_options is None else torch.compile(self.next_tokens, **compile_options)
        self.compiled = compile_options is not None

    def __deepcopy__(self, memo: dict) -> None:
        return None  # a copy of the model builds its own (compiled functions and caches are not copied)

    def next_tokens(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens at `positions` in, each sequence's greedy next token (B, 1) out; the cache is updated in place.
        With one token per sequence this is the decode step, the function that is compiled."""
        logits = self.causal_lm(
            input_ids=input_ids,
            attention_mask=self.attention_mask,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the prompt; return the first new token (B, 1) and the positions of the next step (B, 1)."""
        if self.used:
            self.cache.reset()  # ParScale's cache layers write the prefix back into the first T slots
        self.used = True
        prompt_length = input_ids.shape[1]
        self.attention_mask[:, :prompt_length].copy_(attention_mask)
        self.attention_mask[:, prompt_length:].fill_(1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.next_tokens(input_ids, positions), positions[:, -1:] + 1

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """The prompt followed by `max_new_tokens` greedy tokens, (B, S + max_new_tokens)."""
        # Step-major, so that every step's input, a row seen as (B, 1), has the same strides whatever the number of
        # new tokens: the compiled step is specialised on its inputs' strides and would be compiled again.
        new_tokens = torch.empty(max_new_tokens, self.batch_size, dtype=torch.long, device=input_ids.device)
        first, positions = self.prefill(input_ids, attention_mask)
        new_tokens[0] = first[:, 0]
        for index in range(1, max_new_tokens):
            if self.compiled:
                # Each call is a new step: the graph's previous outputs may be overwritten (they were copied out).
                torch.compiler.cudagraph_mark_step_begin()
            new_tokens[index] = self.step(new_tokens[index - 1].unsqueeze(1), positions)[:, 0]
            positions.add_(1)
        return torch.cat([input_ids, new_tokens.T], dim=1)


def finish_at_eos(sequences: torch.Tensor, prompt_length: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Pad every sequence after its first EOS and drop the trailing steps in which all sequences had finished."""
    new_tokens = sequences[:, prompt_length:]
    is_eos = new_tokens == eos_token_id
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    new_tokens = new_tokens.masked_fill(after_eos, pad_token_id)
    finished = is_eos.any(-1)
    if bool(finished.all()):
        length = int(is_eos.long().argmax(-1).max()) + 1
        new_tokens = new_tokens[:, :length]
    return torch.cat([sequences[:, :prompt_length], new_tokens], dim=1)


def greedy_decoder(
    model: nn.Module,
    batch_size: int,
    max_length: int,
    compile: bool,
    compile_options: dict[str, Any] | None = None,
) -> GreedyDecoder:
    """The decoder `greedy_generate` uses for this batch size and total length (prompt + new tokens): the one kept on
    the model if it matches (same shapes, adapter and compile options), else a new one, which replaces it."""
    causal_lm = causal_lm_of(model)
    options = (compile_options or DEFAULT_COMPILE_OPTIONS) if compile else None
    key = (batch_size, max_length, active_adapters_key(causal_lm), repr(options))
    decoder = getattr(causal_lm, "_parscale_greedy_decoder", None)
    if decoder is None or decoder.key != key:
        decoder = GreedyDecoder(causal_lm, batch_size, max_length, options)
        decoder.key = key
        causal_lm._parscale_greedy_decoder = decoder  # one at a time, like generate's static cache
    return decoder


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    compile: bool | None = None,
    compile_options: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Greedy decoding with a static cache and a compiled, CUDA-graphed decode step; returns what `generate` does.

    Works on a `PeftModel` with a ParScale adapter (the active adapter is used; `disable_adapter()` gives the base
    model) and on a plain transformers causal LM. Left padding is supported through `attention_mask`. The output
    equals `model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False)` up to the rounding
    differences of compiled kernels: tokens are identical in float32 and can differ where two logits are within
    rounding of each other in bfloat16.

    Args:
        model: The model (`PeftModel` or transformers causal LM).
        input_ids: Prompt token ids, (B, S).
        attention_mask: (B, S) with zeros on left padding; all ones if omitted.
        max_new_tokens: Number of tokens to generate (fewer are returned if every sequence reaches `eos_token_id`).
        eos_token_id: Token that ends a sequence; `model.generation_config.eos_token_id` if omitted (None: no end).
        pad_token_id: Token written after a sequence's end; the generation config's, else `eos_token_id`.
        compile: Compile the decode step (`torch.compile`, CUDA graphs by default); defaults to True on CUDA.
        compile_options: Keyword arguments of `torch.compile`; default `{"mode": "reduce-overhead", "fullgraph": True}`.
            Each new batch size, total length or adapter compiles the step again; raise
            `torch._dynamo.config.recompile_limit` (8 by default) when decoding many different shapes in one process.

    Returns:
        (B, S + n) token ids: the prompt followed by n <= max_new_tokens new tokens.

    Example:

        ```py
        >>> import peft_parscale
        >>> from peft import PeftModel
        >>> from peft_parscale.decode import greedy_generate
        >>> model = PeftModel.from_pretrained(base.cuda(), "qwen2.5-1.5b-parscale-p8").eval()
        >>> tokens = greedy_generate(model, inputs.input_ids, inputs.attention_mask, max_new_tokens=128)
        ```
    """
    causal_lm = causal_lm_of(model)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    generation_config = getattr(causal_lm, "generation_config", None)
    if eos_token_id is None and generation_config is not None:
        eos_token_id = generation_config.eos_token_id
    if isinstance(eos_token_id, (list, tuple)):
        if len(eos_token_id) > 1:
            raise ValueError("greedy_generate supports a single eos_token_id.")
        eos_token_id = eos_token_id[0] if eos_token_id else None
    if pad_token_id is None:
        pad_token_id = getattr(generation_config, "pad_token_id", None)
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id

    if compile is None:
        compile = input_ids.device.type == "cuda"
    batch_size, prompt_length = input_ids.shape
    decoder = greedy_decoder(model, batch_size, prompt_length + max_new_tokens, compile, compile_options)
    sequences = decoder.run(input_ids, attention_mask.to(input_ids.device), max_new_tokens)
    if eos_token_id is None:
        return sequences
    return finish_at_eos(sequences, prompt_length, eos_token_id, pad_token_id)
