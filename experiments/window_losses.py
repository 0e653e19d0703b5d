"""Loss per window, and arms compared on the same windows with intervals.

Every arm of the stream sweep is scored on the same held-out windows, so two arms' difference can be taken window by
window and its uncertainty estimated by resampling windows (a paired bootstrap): much tighter than two separate
intervals, since most of the variation between windows (how hard each piece of code is) is shared by the arms. A
window is a 2,048-token stretch of files joined by end-of-text tokens, so a file may span two neighbouring windows;
resampling windows treats them as independent, which they nearly are (a few files among the hundreds a window set
holds).

    losses = window_losses(model, windows["input_ids"], batch_size=4)
    paired_differences({"P8": p8_losses, "P1": p1_losses}, [("P8", "P1")])
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from peft_parscale.stats import bootstrap_interval, paired_bootstrap_pvalue


def window_losses(model: nn.Module, windows: Sequence[Sequence[int]], batch_size: int = 4) -> list[float]:
    """Each window's mean next-token loss (nats per token over its L − 1 predicted tokens), as the model's own loss
    with ``labels=input_ids`` computes it for that window alone; the windows' mean is then the token mean, as every
    window has the same length. Runs under autocast to the model's dtype where that is not float32 (a PEFT model's is
    its base model's: adapters may keep float32 weights beside a bfloat16 backbone)."""
    device, dtype = model.device, model.dtype
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    losses: list[float] = []
    model.eval()
    with torch.no_grad(), autocast:
        for start in range(0, len(windows), batch_size):
            input_ids = torch.tensor(windows[start : start + batch_size], device=device)
            logits = model(input_ids=input_ids).logits[:, :-1].float()
            token_losses = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
            losses += token_losses.mean(-1).tolist()
    return losses


def paired_differences(losses: dict[str, Sequence[float]], comparisons: Sequence[tuple[str, str]]) -> list[dict]:
    """For each (first, second) of `comparisons` with both in `losses`: mean loss difference first − second over the
    shared windows, its 95% paired bootstrap interval over windows and the two-sided paired bootstrap p-value."""
    rows = []
    for first, second in comparisons:
        if first not in losses or second not in losses:
            continue
        a, b = np.asarray(losses[first], dtype=np.float64), np.asarray(losses[second], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"{first} and {second} were scored on different windows ({len(a)} and {len(b)}).")
        low, high = bootstrap_interval(a - b)
        rows.append(
            {
                "first": first,
                "second": second,
                "windows": len(a),
                "difference": float((a - b).mean()),
                "interval": [low, high],
                "p_value": paired_bootstrap_pvalue(a, b),
            }
        )
    return rows
