"""The adapter file checks: a saved ParScale adapter is read and checked against the model before PEFT loads it.

PEFT creates an adapter first and reads its file afterwards, so a missing, corrupt or mismatched file would leave a
half-loaded adapter behind. `ParScaleModel` checks the file first (`check_adapter_file`), against the tensors the
model's architecture and the adapter's config imply (`expected_adapter_shapes`); `peft_parscale.interop` checks the
released checkpoints it converts with the same `check_tensor_shapes`.

Example:

    ```py
    >>> from peft_parscale.adapter_file import check_adapter_file, expected_adapter_shapes
    >>> from peft_parscale.architecture import describe_architecture
    >>> check_adapter_file("runs/p8/adapter", expected_adapter_shapes(describe_architecture(base), config))
    ```
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors.torch import load_file

from .architecture import Architecture
from .config import VALUE_HEAD_DIM, ParScaleConfig, full_base_shape

Shapes = Mapping[str, tuple[int, ...]]  # tensor name -> shape


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


def tensor_problems(found: Shapes, expected: Shapes, optional: Shapes | None = None) -> list[str]:
    """The missing, unexpected and misshapen tensors of `found` against `expected`, each described in a few words;
    `optional` tensors (a tied LM head a checkpoint may or may not store) may be there or not."""
    allowed = {**(optional or {}), **expected}
    problems = [f"missing {name} {expected[name]}" for name in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {name}" for name in sorted(found.keys() - allowed.keys())]
    problems += [
        f"{name} has shape {tuple(found[name])}, expected {tuple(allowed[name])}"
        for name in sorted(found.keys() & allowed.keys())
        if tuple(found[name]) != tuple(allowed[name])
    ]
    return problems


def _summary(problems: list[str]) -> str:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    return "; ".join(problems[:5]) + more


def check_tensor_shapes(found: Shapes, expected: Shapes, what: str, optional: Shapes | None = None) -> None:
    """Raise `ValueError` naming `what` unless `found` has exactly the `expected` tensors (and any `optional` ones),
    with their shapes."""
    problems = tensor_problems(found, expected, optional)
    if problems:
        raise ValueError(f"{what} does not have the expected tensors: {_summary(problems)}.")


def check_adapter_file(directory: str, expected: Shapes) -> None:
    """Read a saved adapter and raise `ValueError` if it is missing, unreadable, or does not fit `expected`: other
    tensors or shapes, or values that are not finite floating point."""
    path, tensors = read_adapter_file(directory)
    problems = tensor_problems({key: tuple(tensor.shape) for key, tensor in tensors.items()}, expected)
    problems += [
        f"{key} is not finite floating point"
        for key in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[key].shape) == expected[key]
        and (not tensors[key].is_floating_point() or not torch.isfinite(tensors[key]).all())
    ]
    if problems:
        raise ValueError(f"The adapter file {path} does not fit this model: {_summary(problems)}.")
