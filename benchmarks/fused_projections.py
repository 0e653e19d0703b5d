"""A decode-latency lever (issue 21): the products that read the same input run as one product.

At batch 1 a decode step multiplies 8 rows (P = 8 streams) by every weight matrix, and each product is a kernel of its
own. The key and value projections (1,536 × 256 at the 1.5B shape) are too small to stream their weights at the
GPU's bandwidth (BENCHMARKS.md, "The fast decode path"). Qwen2's attention multiplies the same hidden states by its
query, key and value weights, and its MLP by its gate and up weights, so each group can be one product over the
weights stacked: three kernels become one, two become one.

Inductor's freezing passes would do this in the compiled graph (`FAST_MODE_OPTIONS`' `fast_frozen`), but with
freezing inductor declined the step's CUDA graph (run AC). Here the stacked weights are a copy made on entering
`fused_projections` and dropped on leaving it, so the model (its parameters, its state dict, the PEFT wrapper) never
changes; the copy costs the memory of the grouped weights (1.7 GB at the 1.5B shape in bfloat16).

Each group's first module computes the stacked product and keeps its parts; the others return their part. That relies
on the order in which transformers' Llama-style modules call them (query, key, value; gate, up) on one input, which
is checked at every call: a module given another input than its group's first raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# the module attributes whose products read one input, in the order the model calls them
PROJECTION_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class StackedProducts:
    """One group's linear modules as one product over their weights (and biases) stacked."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears])
            biases = [linear.bias for linear in linears]
            self.bias = None
            if any(bias is not None for bias in biases):
                self.bias = torch.cat(
                    [
                        linear.weight.new_zeros(linear.out_features) if bias is None else bias
                        for linear, bias in zip(linears, biases, strict=True)
                    ]
                )
        self.sizes = [linear.out_features for linear in linears]
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()

    def first(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.input = hidden_states
        self.parts = F.linear(hidden_states, self.weight, self.bias).split(self.sizes, dim=-1)
        return self.parts[0]

    def part(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if hidden_states is not self.input:
                raise RuntimeError(
                    f"fused_projections: product {index} of its group was called on another input than the group's "
                    "first; this model's modules do not share one input."
                )
            return self.parts[index]

        return forward


def projection_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """Every group of `PROJECTION_GROUPS` in `model` whose modules are all plain `nn.Linear` of one input width."""
    groups = []
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            linears = [getattr(module, name, None) for name in names]
            plain = all(type(linear) is nn.Linear for linear in linears)
            if plain and len({linear.in_features for linear in linears}) == 1:
                groups.append(linears)
    return groups


@contextlib.contextmanager
def fused_projections(model: nn.Module) -> Iterator[int]:
    """Inside the block, each group's products run as one (see the module docstring); yields the number of groups.
    Put the modules back on leaving. Compile the decode step inside the block (a step compiled outside it keeps the
    separate products)."""
    groups = projection_groups(model)
    patched = []
    try:
        for linears in groups:
            stacked = StackedProducts(linears)
            for index, linear in enumerate(linears):
                # an instance attribute shadows the class's forward; deleting it puts the class's back
                linear.forward = stacked.first if index == 0 else stacked.part(index)
                patched.append(linear)
        yield len(groups)
    finally:
        for linear in patched:
            del linear.forward
