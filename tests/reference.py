"""Helpers for the tests, and an independent ParScale reference written plainly from the paper's semantics.

The reference does not use transformers' modeling code nor the package: it reads the weights and runs every stream of
every sequence on its own, with explicit attention over [prefix; keys], explicit rotary embeddings and an explicit
aggregation loop.
"""

from __future__ import annotations

import math

import torch
from tiny_models import VOCAB
from trl import SFTConfig

LENGTH = 24  # tokens per training window in the TRL tests


def randomize_adapter(model, seed: int = 1, scale: float = 0.5) -> None:
    """Give every trainable (ParScale) weight random values, so streams and aggregation weights differ clearly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)


def left_padded_batch(lengths: list[int], seed: int = 2, pad_id: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, width - length :] = torch.randint(1, VOCAB, (length,), generator=generator)
        attention_mask[row, width - length :] = 1
    return input_ids, attention_mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, |expected|), in float64: a bound of 1e-5 means 1e-5 absolute below 1 and
    relative above."""
    return ((actual.double() - expected.double()).abs() / expected.double().abs().clamp(min=1.0)).max().item()


def randomize_aggregator(model, seed: int = 1, scale: float = 0.1) -> None:
    """Random aggregator weights (non-uniform stream weights); the prefixes stay as they are."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "parscale_aggregator" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator).to(parameter) * scale)


# ----------------------------------------------------------------------------------------------------------------
# The reference


def _rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rotate(x, positions, theta):
    # x: (heads, n, d); standard RoPE, pairing dimension i with i + d/2; angles in float64, then x's dtype
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angles = positions.double()[:, None] * inv_freq[None, :]
    cos = torch.cat([angles.cos(), angles.cos()], -1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], -1).to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _weights(base_model, prefix: str):
    return {name[len(prefix) :]: p.detach() for name, p in base_model.named_parameters() if name.startswith(prefix)}


def _project(h: torch.Tensor, w: dict, name: str, count: int, head_dim: int) -> torch.Tensor:
    """One attention projection of a layer's normed input `h` (n, H), split into heads: (count, n, head_dim)."""
    out = h @ w[f"self_attn.{name}.weight"].T
    if f"self_attn.{name}.bias" in w:
        out = out + w[f"self_attn.{name}.bias"]
    return out.view(h.shape[0], count, head_dim).transpose(0, 1)


def reference_hidden(model, tokens: torch.Tensor, prefix_k=None, prefix_v=None) -> torch.Tensor:
    """Final-norm hidden states (n, H) of one sequence of real tokens (positions 0..n-1) for one stream.

    `model` is the plain transformers model; prefix_k[l], prefix_v[l] are (kv_heads, T, head_dim) or None.
    """
    config = model.config
    weights = _weights(model, "model.")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    eps = config.rms_norm_eps
    n = tokens.shape[0]
    positions = torch.arange(n)
    x = weights["embed_tokens.weight"][tokens]
    for layer in range(config.num_hidden_layers):
        w = {k[len(f"layers.{layer}.") :]: v for k, v in weights.items() if k.startswith(f"layers.{layer}.")}
        h = _rms_norm(x, w["input_layernorm.weight"], eps)
        q, k, v = (
            _project(h, w, name, count, head_dim)
            for name, count in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads))
        )
        if "self_attn.q_norm.weight" in w:  # Qwen3 normalises q and k per head before the rotary embedding
            q = _rms_norm(q, w["self_attn.q_norm.weight"], eps)
            k = _rms_norm(k, w["self_attn.k_norm.weight"], eps)
        q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
        visible = torch.ones(n, n, dtype=torch.bool).tril()
        if prefix_k is not None:  # the stream's prefix: post-rotary, in front, seen by every query
            k = torch.cat([prefix_k[layer], k], dim=1)
            v = torch.cat([prefix_v[layer], v], dim=1)
            visible = torch.cat([torch.ones(n, prefix_k[layer].shape[1], dtype=torch.bool), visible], dim=1)
        outputs = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            scores = (q[head] @ k[kv].T) / math.sqrt(head_dim)
            scores = scores.masked_fill(~visible, float("-inf"))
            outputs.append(torch.softmax(scores, dim=-1) @ v[kv])
        attention = torch.cat(outputs, dim=-1) @ w["self_attn.o_proj.weight"].T
        if "self_attn.o_proj.bias" in w:
            attention = attention + w["self_attn.o_proj.bias"]
        x = x + attention
        h = _rms_norm(x, w["post_attention_layernorm.weight"], eps)
        gate, up = h @ w["mlp.gate_proj.weight"].T, h @ w["mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w["mlp.down_proj.weight"].T
    return _rms_norm(x, weights["norm.weight"], eps)


def reference_logits(model, tokens: torch.Tensor, adapter: dict | None) -> torch.Tensor:
    """ParScale logits (n, vocab) of one unpadded sequence.

    adapter: {"prefix_k": [(P, kv, T, d) per layer], "prefix_v": [...], "aggregator": [W1, b1, W2, b2] or None,
    "smoothing": ε}; None means the plain base model.
    """
    lm_head = model.lm_head.weight.detach()
    if adapter is not None:  # in the model's dtype (float32 adapters read from files, float64 models)
        adapter = {
            key: [tensor.to(lm_head.dtype) for tensor in value] if isinstance(value, list) else value
            for key, value in adapter.items()
        }
    if adapter is None:
        return reference_hidden(model, tokens) @ lm_head.T
    num_streams = adapter["prefix_k"][0].shape[0]
    streams = [
        reference_hidden(
            model,
            tokens,
            [layer[p] for layer in adapter["prefix_k"]],
            [layer[p] for layer in adapter["prefix_v"]],
        )
        for p in range(num_streams)
    ]
    if num_streams == 1:
        return streams[0] @ lm_head.T
    w1, b1, w2, b2 = adapter["aggregator"]
    epsilon = adapter["smoothing"]
    mixed = []
    for t in range(tokens.shape[0]):
        h = [stream[t] for stream in streams]
        features = torch.stack(h, dim=-1).reshape(-1)  # element index hidden·P + p
        logits = w2 @ torch.nn.functional.silu(w1 @ features + b1) + b2
        weights = torch.softmax(logits.double(), dim=-1) * (1 - epsilon) + epsilon / num_streams
        mixed.append(sum(weights[p].to(h[p].dtype) * h[p] for p in range(num_streams)))
    return torch.stack(mixed) @ lm_head.T


# Bounds on |package - reference| / max(1, |reference|), the reference always computed in float64 (its model in
# float64), by the dtype the package ran in. A ParScale mistake moves these logits by 0.01 to 3.
# - float64: the two then differ only by the float32 steps that transformers keeps inside float64 models (RMSNorm's
#   output and the rotary tables): single roundings of relative size 2^-24 ≈ 6e-8 at a few places per layer, which
#   these tiny models amplify to at most 1.6e-6 (measured over every architecture, sdpa and eager, with and without
#   a cache). 1e-5 is 6x that; float64 accumulation order (threads, a loaded CPU) moves results by ~1e-15.
# - float32 (only where float64 is unavailable: flex attention on CPU): every operation rounds, and the accumulation
#   order of matrix products follows the thread schedule. Measured: up to 1.1e-5 on an idle CPU, 2e-5 on a loaded one.
#   1e-4 is 5x the worst seen, and still 100x below the smallest error that matters.
LOGIT_TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """|actual - expected| <= LOGIT_TOLERANCE[actual.dtype] · max(1, |expected|) elementwise; `expected` in float64."""
    assert expected.dtype == torch.float64 and actual.dtype in LOGIT_TOLERANCE, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    relative = (actual.double() - expected).abs() / expected.abs().clamp(min=1.0)
    assert relative.max() <= LOGIT_TOLERANCE[actual.dtype], f"greatest relative difference {relative.max():.3g}"


def reference_greedy(model, tokens: torch.Tensor, adapter: dict | None, new_tokens: int) -> torch.Tensor:
    """The reference's own greedy loop: `tokens` (one unpadded sequence) followed by `new_tokens` argmax tokens."""
    for _ in range(new_tokens):
        tokens = torch.cat([tokens, reference_logits(model, tokens, adapter)[-1].argmax()[None]])
    return tokens


def greedy_with_logits(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int, **generate_kwargs
):
    """`model.generate`'s greedy output with the logits of every step (pad id 0, that of `left_padded_batch`)."""
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **generate_kwargs,
        )


def adapter_tensors(peft_model, adapter_name: str = "default") -> dict:
    """Read an adapter's weights out of a PeftModel by name, for the reference."""
    named = dict(peft_model.named_parameters())
    layers = peft_model.base_model.model.config.num_hidden_layers
    decoder = "base_model.model.model"

    def get(name):  # in the model's dtype, at least float32
        tensor = named[name].detach()
        return tensor.to(torch.promote_types(tensor.dtype, torch.float32))

    aggregator_prefix = f"{decoder}.streams.parscale_aggregator.{adapter_name}"
    has_aggregator = f"{aggregator_prefix}.0.weight" in named
    config = peft_model.peft_config[adapter_name]
    return {
        "prefix_k": [get(f"{decoder}.layers.{i}.self_attn.parscale_prefix_k.{adapter_name}") for i in range(layers)],
        "prefix_v": [get(f"{decoder}.layers.{i}.self_attn.parscale_prefix_v.{adapter_name}") for i in range(layers)],
        "aggregator": [get(f"{aggregator_prefix}.{part}") for part in ("0.weight", "0.bias", "2.weight", "2.bias")]
        if has_aggregator
        else None,
        "smoothing": config.smoothing,
    }


def training_args(output_dir, **overrides) -> SFTConfig:
    """TRL training arguments for the tests' tiny models: CPU, float32, a few steps, nothing saved or reported."""
    settings = {
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 2e-2,
        "max_length": LENGTH,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "bf16": False,  # float32 end to end, so that losses compare with the reference at tight tolerances
        "seed": 0,
        "dataloader_num_workers": 0,
    }
    return SFTConfig(**{**settings, **overrides})
