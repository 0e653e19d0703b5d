"""The generation settings the fast path (`decode.py`) takes: resolved as `generate` resolves them, and refused, before
any computation, where they would change the tokens and the fast path does not implement them."""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import GenerationConfig
from transformers.generation import GenerationMode

# Settings that `generate` turns into logits processors or stopping criteria and the fast path does not implement,
# with the values that leave each of them off. Encoder-only settings are absent: causal LMs have no encoder input.
UNSUPPORTED_SETTINGS: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
    "remove_invalid_values": (None, False),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "max_time": (None,),
    "token_healing": (None, False),
    "return_dict_in_generate": (None, False),
}
# Sampling warpers other than temperature, top-k and top-p: they only act when sampling.
UNSUPPORTED_SAMPLING_SETTINGS: dict[str, tuple[Any, ...]] = {
    "min_p": (None,),
    "top_h": (None,),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
}


def resolve_generation_config(
    causal_lm: nn.Module, generation_config: GenerationConfig | None, settings: dict[str, Any]
) -> GenerationConfig:
    """The settings `generate` would use: `generation_config` (default: none), its unset values from the model's
    `generation_config`, then transformers' defaults, then `settings` on top. Raises for what the fast path lacks."""
    # transformers' own merge (private, but the one `generate` calls), so that the settings are exactly generate's.
    config, unknown = causal_lm._prepare_generation_config(generation_config, **settings)
    if unknown:
        raise ValueError(f"Unknown generation settings: {sorted(unknown)}.")
    mode = config.get_generation_mode()
    if mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"The fast path does greedy search and sampling, not {mode.value.replace('_', ' ')}.")
    unsupported = {**UNSUPPORTED_SETTINGS, **(UNSUPPORTED_SAMPLING_SETTINGS if config.do_sample else {})}
    refused = {name: value for name, off in unsupported.items() if (value := getattr(config, name, None)) not in off}
    if refused:
        how = ", ".join(f"{name}={unsupported[name][-1]!r}" for name in refused)
        raise ValueError(
            f"The fast path does not implement {refused} (unset values come from the model's generation_config). "
            f"Set {how} to decode without them, or use `model.generate`."
        )
    if config.num_return_sequences > 1 and not config.do_sample:
        raise ValueError("Greedy search gives one sequence per prompt: num_return_sequences > 1 needs do_sample=True.")
    if config.do_sample:
        if not config.temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {config.temperature}.")
        if not 0 <= config.top_p <= 1:
            raise ValueError(f"top_p must be in [0, 1], got {config.top_p}.")
        if (config.top_k or 0) < 0:
            raise ValueError(f"top_k must be at least 0, got {config.top_k}.")
    return config
