"""What a model does with its keys, values and positions, seen by running its decoder once over one token.

ParScale puts its prefix where each attention layer hands its keys/values to the KV cache, and reads a text-initialised
prefix at positions before the real tokens'. Two facts about a model decide whether that is exact, and both are taken
from one forward pass of the base model (`probe_decoder`) rather than from config fields, which describe them only for
the architectures someone wrote a rule for:

- **What each layer caches.** The prefix has the shape of what the layer passes to `cache.update`: (heads, size) of
  its keys and of its values. That is usually `num_key_value_heads` × `head_dim`, but not always: multi-query attention
  caches one head, Falcon-40B broadcasts its keys to every query head first, and latent attention (DeepSeek-V2/V3)
  caches a compressed latent and its rotary part, of other sizes than the keys and values it attends with.
- **Whether positions are looked up in a table.** Rotary models compute their angles from the position ids, so
  negative positions are valid and relative distances are all that matter. Models that index a table with them,
  learned (GPT-2's `wpe`) or fixed (CodeGen's and GPT-J's `embed_positions[position_ids]`), have no entry below 0: a
  negative index wraps to the end of the table or fails. The probe watches every tensor operation of the forward
  pass (a `TorchDispatchMode`) for an index computed from the position ids, and records the table's length.

The probe runs with ParScale adapters disabled and in evaluation mode; it works on the meta device too (no values
are read), so it costs one token's forward pass.

Example::

    probe = probe_decoder(model.get_decoder(), layer_indices=[0, 1])
    probe.key_shapes[0], probe.value_shapes[0], probe.position_table
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

# The dispatch mode is PyTorch's extension point for seeing every operator a forward pass runs ("Extending PyTorch":
# TorchDispatchMode); torch exposes it, and the pytree helper it hands arguments in, under these module names.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import DynamicCache

from .layer import ParScaleLayer

_aten = torch.ops.aten
# Operations that read a tensor at integer indices, and where their indexed tensor and dimension are:
# (op) -> function of (args) giving [(index tensor, length of the indexed dimension)].
_LOOKUPS = {
    _aten.embedding.default: lambda args: [(args[1], args[0].shape[0])],
    _aten.index.Tensor: lambda args: [(index, args[0].shape[dim]) for dim, index in enumerate(args[1])],
    _aten.gather.default: lambda args: [(args[2], args[0].shape[args[1]])],
    _aten.index_select.default: lambda args: [(args[2], args[0].shape[args[1]])],
    _aten.take.default: lambda args: [(args[1], args[0].numel())],
}


@dataclass(frozen=True)
class Probe:
    """What one forward pass of a decoder showed.

    key_shapes, value_shapes: per attention layer probed, (heads, size) of the keys and the values it passed to
        `cache.update`.
    position_table: the length of the table the model looks its positions up in, or None where it computes from
        them (rotary embeddings, or no positions at all).
    """

    key_shapes: tuple[tuple[int, int], ...]
    value_shapes: tuple[tuple[int, int], ...]
    position_table: int | None


def _is_index(tensor: torch.Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


class _PositionLookups(TorchDispatchMode):
    """Follows the position ids through every operation and records the tables they index: an integer tensor computed
    from a tracked one is tracked, and a tracked tensor used as an index is a lookup. Floating-point results (rotary
    angles, and through them every hidden state) are not followed: they are computed from positions, not looked up."""

    def __init__(self, position_ids: torch.Tensor) -> None:
        super().__init__()
        self.tracked = {id(position_ids): position_ids}  # the tensors are kept so that their ids are not reused
        self.table_lengths: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        output = func(*args, **kwargs)
        if any(id(leaf) in self.tracked for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)):
            for index, length in _LOOKUPS.get(func, lambda _: [])(args):
                if isinstance(index, torch.Tensor) and id(index) in self.tracked:
                    self.table_lengths.append(int(length))
            for leaf in tree_leaves(output):
                if isinstance(leaf, torch.Tensor) and _is_index(leaf):
                    self.tracked[id(leaf)] = leaf
        return output


@contextlib.contextmanager
def base_model_only(decoder: nn.Module) -> Iterator[None]:
    """Run `decoder` as the base model: evaluation mode (no dropout; gradient checkpointing, which drops the cache, is
    for training only) and ParScale adapters disabled; restore both on exit."""
    modules = list(decoder.modules())
    training = [module.training for module in modules]
    disabled = {module: module.disable_adapters for module in modules if isinstance(module, ParScaleLayer)}
    try:
        decoder.eval()
        for module in disabled:
            # PEFT's own switch (`enable_adapters`) also changes which weights require gradients; only the flag is set.
            module._disable_adapters = True
        yield
    finally:
        for module, mode in zip(modules, training):
            module.training = mode
        for module, flag in disabled.items():
            module._disable_adapters = flag


@contextlib.contextmanager
def _eager_attention(decoder: nn.Module) -> Iterator[None]:
    """Flex attention compiles its kernel, which torch.compile refuses under a dispatch mode: the probe runs eager
    attention there instead, which caches the same keys/values and reads the positions the same way."""
    configs = {id(config): config for module in decoder.modules() if (config := getattr(module, "config", None))}
    flex = [config for config in configs.values() if getattr(config, "_attn_implementation", None) == "flex_attention"]
    try:
        for config in flex:
            config._attn_implementation = "eager"
        yield
    finally:
        for config in flex:
            config._attn_implementation = "flex_attention"


def probe_decoder(decoder: nn.Module, layer_indices: Sequence[int]) -> Probe:
    """Run `decoder` once over one token at position 0, with a dynamic cache, and report what the attention layers
    with cache indices `layer_indices` cached and whether the positions were looked up in a table.

    Raises `ValueError` if the forward pass fails or a layer caches nothing.
    """
    device = next(decoder.parameters()).device
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    positions = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache = DynamicCache()
    lookups = _PositionLookups(positions)
    try:
        with base_model_only(decoder), _eager_attention(decoder), torch.no_grad(), lookups:
            decoder(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True)
    except Exception as error:  # whatever the model raises, its cause goes with the message
        raise ValueError(
            "ParScale runs the base model once over one token to see what its attention layers cache; that forward "
            f"pass failed: {type(error).__name__}: {error}"
        ) from error
    layers = cache.layers
    missing = [index for index in layer_indices if index >= len(layers) or not layers[index].is_initialized]
    if missing:
        raise ValueError(
            f"The attention layers with cache indices {missing} passed nothing to the KV cache in a forward pass: "
            "ParScale has nowhere to put their prefix."
        )
    key_shapes = tuple((layers[index].keys.shape[1], layers[index].keys.shape[-1]) for index in layer_indices)
    value_shapes = tuple((layers[index].values.shape[1], layers[index].values.shape[-1]) for index in layer_indices)
    table = min(lookups.table_lengths) if lookups.table_lengths else None
    return Probe(key_shapes, value_shapes, table)
