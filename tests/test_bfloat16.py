"""ParScale in bfloat16, aggregator included, against the float64 reference (`reference.py`), within a bound derived
from bfloat16's rounding; and the bound is tight enough that a swapped stream or a dropped smoothing exceeds it.

The bound. bfloat16 keeps 8 significant bits: every rounding moves a value by up to u = 2^-8 of itself. A forward
pass in bfloat16 rounds at each projection, attention product, norm, residual add, the aggregator's input and the LM
head, and those errors propagate through the layers. Their size on these weights and inputs is measured here, not
guessed: the reference itself, run on the same weights cast to bfloat16 (an independent bfloat16 computation with the
same rounding points), is e16 away from the float64 reference. A correct package rounds at the same points, though
in another order (transformers keeps RMSNorm and the softmax in float32; the package mixes streams in float32), so
its own error is of the same size, but its roundings may fall the other way: it is within 2·e16, the sum of two such
errors. Measured over seeds 0..3 in the three cases below: e16 = 0.018 to 0.036, the package at 0.65 to 1.07 × e16
(a margin of at least 1.9x under the bound). A dropped smoothing moves the logits by 2.0 to 4.3 times the bound, a
swap of two streams' prefixes by 34 to 65 times. e16 itself is checked to be the size of a few roundings (below 16u,
0.0625), so that the bound cannot grow into one that anything passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from reference import adapter_tensors, left_padded_batch, positions_from_mask, reference_logits, relative_error
from tiny_models import tiny_model
from torch.nn.attention.bias import CausalBias

import peft_parscale  # noqa: F401  (registers the PEFT type)
import peft_parscale.layer as parscale_layer
from peft_parscale import ParScaleConfig
from peft_parscale.layer import ParScaleStreams

SMOOTHING = 0.1
U = 2.0**-8  # bfloat16's unit roundoff


def build(model_dtype: torch.dtype, seed: int):
    """A P=3 adapter with random prefixes (streams differ clearly) and a random aggregator whose output bias favours
    stream 0 (weights near 0.96, 0.04, 0.00: the smoothing matters), on a tiny Qwen2 in `model_dtype`; the float64
    model, and the adapter's tensors for the reference."""
    base = tiny_model("qwen2", seed=seed)
    reference_model = copy.deepcopy(base).double()
    model = get_peft_model(base.to(model_dtype), ParScaleConfig(P=3, prefix_length=4, smoothing=SMOOTHING))
    generator = torch.Generator().manual_seed(seed + 10)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                scale = 0.1 if "aggregator" in name else 1.0
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
                if name.endswith("parscale_aggregator.default.2.bias"):
                    parameter.copy_(torch.tensor([4.0, 0.0, -4.0]))  # a constant: no sensitivity to rounding
    return model, reference_model, adapter_tensors(model)


def worst_error(model, rows, expected, autocast: bool) -> float:
    input_ids, attention_mask = rows
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        kwargs["position_ids"] = None if attention_mask is None else positions_from_mask(attention_mask)
        logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits
    masks = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return max(
        relative_error(logits[row][mask.bool()].float(), want) for row, (mask, want) in enumerate(zip(masks, expected))
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(
    "model_dtype, autocast, padded, mask_kind",
    [
        (torch.bfloat16, False, True, torch.Tensor),  # a bf16 model, a left-padded batch: the 4D mask path
        (torch.bfloat16, True, False, CausalBias),  # a bf16 model under autocast, no padding: the causal-bias path
        (torch.float32, True, False, torch.Tensor),  # a float32 model under autocast: the mask is materialised
    ],
    ids=["bf16-padded", "bf16-autocast-causal-bias", "float32-autocast-materialised"],
)
def test_bfloat16_with_the_aggregator_is_within_rounding_of_the_float64_reference(
    model_dtype, autocast, padded, mask_kind, seed, monkeypatch
):
    model, reference_model, adapter = build(model_dtype, seed)
    if padded:
        rows = left_padded_batch([7, 3, 5], seed=seed + 2)
    else:
        rows = (left_padded_batch([6, 6], seed=seed + 2)[0], None)
    input_ids, attention_mask = rows
    masks = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    tokens = [ids[mask.bool()] for ids, mask in zip(input_ids, masks)]
    adapter64 = {
        key: [t.double() for t in value] if isinstance(value, list) else value for key, value in adapter.items()
    }
    expected = [reference_logits(reference_model, ids, adapter64) for ids in tokens]
    # e16: the reference computed in bfloat16 throughout, on the same weights
    model16 = copy.deepcopy(reference_model).to(torch.bfloat16)
    adapter16 = {
        key: [t.bfloat16() for t in value] if isinstance(value, list) else value for key, value in adapter.items()
    }
    e16 = max(
        relative_error(reference_logits(model16, ids, adapter16).float(), want) for ids, want in zip(tokens, expected)
    )
    assert 0 < e16 < 16 * U
    bound = 2 * e16

    masks_seen = []
    mask_with_prefix = parscale_layer.mask_with_prefix
    monkeypatch.setattr(
        parscale_layer, "mask_with_prefix", lambda *args: masks_seen.append(mask_with_prefix(*args)) or masks_seen[-1]
    )
    assert worst_error(model, rows, expected, autocast) <= bound
    assert masks_seen and all(isinstance(mask, mask_kind) for mask in masks_seen)  # the path this case is about

    # Planted bugs: each moves the logits past the bound.
    streams = next(module for module in model.modules() if isinstance(module, ParScaleStreams))
    streams.smoothing["default"] = 0.0  # smoothing dropped
    assert worst_error(model, rows, expected, autocast) > bound
    streams.smoothing["default"] = SMOOTHING
    for layer in streams.attention_layers():  # streams 0 and 1 swapped
        for prefixes in (layer.parscale_prefix_k, layer.parscale_prefix_v):
            prefixes["default"].data = prefixes["default"].data[[1, 0, 2]]
    assert worst_error(model, rows, expected, autocast) > bound
