"""Fused projections for the fast path's decode step: the linear products that read the same input run as one.

At batch 1 a decode step multiplies a few rows (P streams per sequence) by every weight matrix, and each product is a
kernel of its own. Small products, such as the key and value projections of grouped-query attention, are too small
to stream their weights at the GPU's bandwidth (BENCHMARKS.md, "Code changed after the GPU runs", `fast_fused`).
Llama-style attention (Qwen2, Llama, Mistral, ...) multiplies the same hidden states by its query, key and value
weights, and its MLP by its gate and up weights, so each group can be one product over the weights stacked: three
kernels become one, two become one.

inductor's freezing passes would fuse them in the compiled graph, but with freezing inductor declines the step's CUDA
graph ("mutated inputs": the static cache's buffers; BENCHMARKS.md, run AG). Here the stacked
weights are a copy kept beside the model, so the model (its parameters, its state dict, the PEFT wrapper) never
changes; the copy costs the memory of the grouped weights (about 60 % of a Qwen2.5 decoder layer's). While
`applied()` lasts, each group's first module computes the stacked product and keeps its parts until the group's last
module has returned its own, and the others return their part. That relies on the order in which the modules are
called (query, key, value; gate, up) on one input, which is checked at every call: a module given another input than
its group's first raises. The copy is detached from autograd: the block refuses to run with gradients enabled.

    fused = FusedProjections(causal_lm)  # the copy
    with torch.no_grad(), fused.applied():  # a step compiled outside the block keeps the separate products
        logits = causal_lm(input_ids=ids).logits

`fast_generate(..., fuse_projections=True)` keeps one with its decoder and applies it around every generation.
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
        self.linears = linears
        with torch.no_grad():
            self.weight = torch.cat([linear.weight for linear in linears])
            self.bias = None
            if any(linear.bias is not None for linear in linears):
                self.bias = torch.cat([self.bias_of(linear) for linear in linears])
        # the compiled step reads the copy as a constant address (a CUDA graph records it once), like a parameter
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                torch._dynamo.mark_static_address(tensor)
        self.sizes = [linear.out_features for linear in linears]
        self.copied = self.sources()
        self.input: torch.Tensor | None = None
        self.parts: tuple[torch.Tensor, ...] = ()
        self.forwards = [self.first] + [self.part(index) for index in range(1, len(linears))]

    @staticmethod
    def bias_of(linear: nn.Linear) -> torch.Tensor:
        return linear.weight.new_zeros(linear.out_features) if linear.bias is None else linear.bias

    def sources(self) -> list[tuple[int, int, int]]:
        """What the copy was made from: each weight's and bias's identity, memory and in-place version (`_version`,
        the counter of in-place changes that autograd checks too: an optimizer step or `load_state_dict` advances it;
        a change made through `.data` does not, and is not seen)."""
        tensors = [t for linear in self.linears for t in (linear.weight, linear.bias) if t is not None]
        return [(id(t), t.data_ptr(), t._version) for t in tensors]

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the group's weights again, in place, if any was changed or replaced since the last copy."""
        if self.sources() == self.copied:
            return
        self.weight.copy_(torch.cat([linear.weight for linear in self.linears]))
        if self.bias is not None:
            self.bias.copy_(torch.cat([self.bias_of(linear) for linear in self.linears]))
        self.copied = self.sources()

    def first(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.input = hidden_states
        self.parts = F.linear(hidden_states, self.weight, self.bias).split(self.sizes, dim=-1)
        return self.parts[0]

    def part(self, index: int) -> Callable[[torch.Tensor], torch.Tensor]:
        last = index == len(self.sizes) - 1

        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            if hidden_states is not self.input:
                raise RuntimeError(
                    f"Fused projections: product {index} of its group was called on another input than the group's "
                    "first; this model's modules do not share one input (decode with fuse_projections=False)."
                )
            part = self.parts[index]
            if last:  # the layer's activations are not kept past the layer (a prefill's would add up over layers)
                self.forget()
            return part

        return forward

    def forget(self) -> None:
        self.input, self.parts = None, ()


def projection_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """Every group of `PROJECTION_GROUPS` in `model` whose modules are all plain `nn.Linear` of one input width, dtype
    and device, none with a forward of its own (a module wrapped by another adapter, LoRA for instance, or given a
    forward by accelerate's hooks, is left as it is)."""
    groups = []
    for module in model.modules():
        for names in PROJECTION_GROUPS:
            linears = [getattr(module, name, None) for name in names]
            if not all(type(linear) is nn.Linear and "forward" not in linear.__dict__ for linear in linears):
                continue
            if len({(linear.in_features, linear.weight.dtype, linear.weight.device) for linear in linears}) == 1:
                groups.append(linears)
    return groups


class FusedProjections:
    """The stacked copies of every projection group of `model` (`projection_groups`), put in use by `applied()`."""

    def __init__(self, model: nn.Module) -> None:
        self.groups = [StackedProducts(linears) for linears in projection_groups(model)]
        self.depth = 0

    def __len__(self) -> int:
        return len(self.groups)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the groups' modules compute from the copies, refreshed first if a weight changed; on
        leaving it, every module's own forward is back. Blocks may nest (the outermost one does the work). Raises
        under enabled gradients: the copies would leave the model's weights without theirs."""
        if torch.is_grad_enabled():
            raise RuntimeError("Fused projections compute from a copy of the weights: use them under torch.no_grad().")
        self.depth += 1
        try:
            if self.depth == 1:
                for group in self.groups:
                    group.refresh()
                    for linear, forward in zip(group.linears, group.forwards, strict=True):
                        # an instance attribute shadows the class's forward; deleting it puts the class's back
                        linear.forward = forward
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                for group in self.groups:
                    group.forget()  # a group left part-way by an error
                    for linear in group.linears:
                        linear.__dict__.pop("forward", None)
