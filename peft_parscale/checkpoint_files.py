"""Checkpoint directories as `peft_parscale.interop` reads and writes them.

A transformers checkpoint is read header first (`Checkpoint.read`: config.json and the names, shapes and dtypes of
its safetensors tensors, without loading them) and its tensors one file at a time (`Checkpoint.load`), so a conversion
holds at most one shard in memory. Outputs are written into a directory beside the destination and renamed into place
at the end (`staged_directory`), so the destination is never left half-written.

Example:

    ```py
    >>> from peft_parscale.checkpoint_files import Checkpoint
    >>> checkpoint = Checkpoint.read("Qwen2.5-0.5B", "BASE")
    >>> checkpoint.tensors["model.norm.weight"]
    TensorInfo(file='model.safetensors', shape=(896,), dtype='BF16')
    ```
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

PathLike = str | os.PathLike

# Files a checkpoint directory carries besides its config and weights, copied along so the result is usable alone.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes, and checks for, in every weights file
# Bytes per element; the other safetensors dtypes (BOOL, U8, I8, F8_*) have 1.
_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor is stored and what its header says, read without loading the tensor."""

    file: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "BF16"

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _DTYPE_BYTES.get(self.dtype, 1)


@dataclass(frozen=True)
class Checkpoint:
    """A transformers checkpoint directory: its config.json and the headers of its safetensors files."""

    directory: Path
    config: dict
    tensors: dict[str, TensorInfo]

    @classmethod
    def read(cls, directory: PathLike, role: str) -> Checkpoint:
        """Read config.json and the weights' headers; raise `ValueError` naming `role` if anything is missing."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{role} {directory} is not a directory.")
        config = read_json(directory / CONFIG_FILE, role)
        if (directory / SINGLE_WEIGHTS_FILE).is_file():  # the order transformers looks for them in
            listed = None
            files = [SINGLE_WEIGHTS_FILE]
        elif (directory / WEIGHTS_INDEX_FILE).is_file():
            listed = read_json(directory / WEIGHTS_INDEX_FILE, role).get("weight_map")
            if not isinstance(listed, dict) or not listed:
                raise ValueError(f"{role}: {directory / WEIGHTS_INDEX_FILE} has no weight_map.")
            files = sorted(set(listed.values()))
        else:
            raise ValueError(
                f"{role} {directory} has no safetensors weights ({SINGLE_WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE})."
            )
        tensors = {}
        for file in files:
            path = directory / file
            if not path.is_file():
                raise ValueError(f"{role}: {WEIGHTS_INDEX_FILE} lists {file}, which is not in {directory}.")
            try:
                with safe_open(path, "pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                        header = handle.get_slice(name)
                        tensors[name] = TensorInfo(file, tuple(header.get_shape()), header.get_dtype())
            except Exception as error:  # safetensors raises several types for truncated or malformed files
                raise ValueError(f"{role}: cannot read {path}: {error}") from error
        if listed is not None:
            misplaced = sorted(
                name for name, file in listed.items() if name not in tensors or tensors[name].file != file
            )
            if misplaced:
                raise ValueError(f"{role}: {WEIGHTS_INDEX_FILE} lists {misplaced[0]} in a file that does not hold it.")
        return cls(directory, config, tensors)

    def files(self) -> list[str]:
        return sorted({info.file for info in self.tensors.values()})

    def load(self, names: Sequence[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the named tensors, reading one file at a time."""
        wanted = set(names)
        for file in self.files():
            with safe_open(self.directory / file, "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                    if name in wanted:
                        yield name, handle.get_tensor(name)


def shard_name(index: int, count: int) -> str:
    return SINGLE_WEIGHTS_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


def write_index(directory: Path, weight_map: dict[str, str], total_size: int) -> None:
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / WEIGHTS_INDEX_FILE, index)


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)


def read_json(path: Path, role: str) -> dict:
    if not path.is_file():
        raise ValueError(f"{role}: {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{role}: cannot read {path}: {error}") from error
    if not isinstance(content, dict):
        raise ValueError(f"{role}: {path} is not a JSON object.")  # noqa: TRY004 (a bad file, reported as such)
    return content


def write_json(path: Path, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as file:
        json.dump(content, file, indent=2, sort_keys=True)
        file.write("\n")


def check_output(output: PathLike, inputs: Sequence[PathLike | None], overwrite: bool) -> Path:
    """The absolute output path, after refusing one that exists with content (unless `overwrite`) or holds an input."""
    output = Path(output).resolve()
    if output.exists() and not output.is_dir():
        raise ValueError(f"OUT {output} exists and is not a directory.")
    for path in inputs:
        if path is not None and (Path(path).resolve() == output or output in Path(path).resolve().parents):
            raise ValueError(f"OUT {output} would replace the input {path}: choose another OUT.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ValueError(
            f"OUT {output} exists and is not empty: choose another OUT, or pass --overwrite to replace it."
        )
    return output


@contextmanager
def staged_directory(output: Path) -> Iterator[Path]:
    """Yield a new directory beside `output`; on success it replaces `output`, on failure it is removed."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.replaced-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a no-op once renamed
