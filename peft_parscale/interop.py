"""Interop with the checkpoints released by the ParScale authors (``model_type`` ``qwen2_parscale``).

The released format is a Qwen2 checkpoint with the ParScale weights stored beside the backbone's, loaded with
``trust_remote_code`` (the authors' ``modeling_qwen2_parscale.py``):

- config.json: the Qwen2 fields plus ``parscale_n`` (P), ``parscale_n_tokens`` (T) and ``parscale_attn_smooth`` (ε);
- per layer i, ``model.layers.{i}.self_attn.prefix_k`` / ``prefix_v`` of shape (P, num_key_value_heads, T, head_dim),
  and ``model.aggregate_layer.{0,2}.{weight,bias}``: Linear(P·H -> H), SiLU, Linear(H -> P). With P = 1 none of these
  exist and the checkpoint is a plain Qwen2 model.

Its semantics are this package's (stream-major replication, post-rotary prefixes every query sees, positions from 0,
aggregation over the hidden-major concatenation [h_1 ... h_P], element h·P + p, with a float32 softmax and smoothing),
and its tensors have this adapter's shapes and layouts, so converting is renaming:

    released                                   this package's adapter (PEFT checkpoint keys)
    model.layers.{i}.self_attn.prefix_k        base_model.model.model.layers.{i}.self_attn.parscale_prefix_k
    model.aggregate_layer.0.weight             base_model.model.model.streams.parscale_aggregator.0.weight

Tensors are copied as they are stored, dtype included (a bfloat16 checkpoint gives a bfloat16 base and adapter), and
read one shard at a time with safetensors' ``safe_open``, so a conversion holds at most one shard in memory. Outputs
are written to a temporary directory beside OUT and renamed into place at the end: OUT is never left half-written.

The format's config fields and tensor names are in `released_format.py`; reading checkpoints and writing outputs,
in `checkpoint_files.py`.

Example:

    ```py
    >>> from peft_parscale.interop import export_official, import_official
    >>> imported = import_official("ParScale-Qwen-3B-P8-Python", "parscale-3b-p8", write_base=False,
    ...                            verify_base="Qwen2.5-3B", base_model_name_or_path="Qwen/Qwen2.5-3B")
    >>> imported.adapter_dir  # load it with PeftModel.from_pretrained(base, ...) after `import peft_parscale`
    >>> export_official("Qwen2.5-3B", "my-adapter", "my-adapter-released")
    ```
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .adapter_file import check_adapter_file, check_tensor_shapes
from .checkpoint_files import (
    CONFIG_FILE,
    SAFETENSORS_METADATA,
    Checkpoint,
    PathLike,
    check_output,
    copy_tokenizer_files,
    read_json,
    shard_name,
    staged_directory,
    write_index,
    write_json,
)
from .config import BASE_SHAPE_FIELDS, ParScaleConfig
from .released_format import (
    MODELING_FILES,
    RELEASED_MODEL_TYPE,
    Qwen2Layout,
    base_config_of_released,
    plain_qwen2_config,
    released_adapter_config,
    released_config,
)

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# Qwen2 configuration fields that change what the backbone computes, compared when verifying a base.
COMPUTE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "layer_types",
)


@dataclass(frozen=True)
class ImportedCheckpoint:
    """What `import_official` wrote: the adapter, and the base when it was written."""

    adapter_dir: Path
    base_dir: Path | None
    config: ParScaleConfig
    verified_base: Path | None


# ----------------------------------------------------------------------------------------------------------------
# import


def find_backbone_mismatch(source: PathLike, base: PathLike) -> str | None:
    """Compare the backbone of `source` (a released checkpoint, or any Qwen2 one) with the Qwen2 checkpoint `base`.

    Compares the configuration fields that change what the model computes, then every backbone tensor (name, shape,
    exact values; a lossless dtype difference, such as a float32 copy of bfloat16 weights, is not a mismatch), one
    tensor at a time. Returns a description of the first mismatch, or None if they match.

    Example:

        ```py
        >>> find_backbone_mismatch("ParScale-Qwen-3B-P8-Python", "Qwen2.5-3B")  # None: the adapter fits that base
        ```
    """
    source_checkpoint, base_checkpoint = Checkpoint.read(source, "SRC"), Checkpoint.read(base, "BASE")
    source_config = source_checkpoint.config
    released = source_config.get("model_type") == RELEASED_MODEL_TYPE
    plain_source_config = (
        base_config_of_released(source_config) if released else plain_qwen2_config(source_config, "SRC")
    )
    source_layout = Qwen2Layout.from_config(plain_source_config, "SRC")
    base_layout = Qwen2Layout.from_config(plain_qwen2_config(base_checkpoint.config, "BASE"), "BASE")
    for field in COMPUTE_FIELDS:
        source_value, base_value = getattr(source_layout.config, field), getattr(base_layout.config, field)
        if source_value != base_value:
            return f"config field {field} is {source_value!r} in SRC and {base_value!r} in BASE"
    parscale = set()
    if released and source_config.get("parscale_n", 1) > 1:
        parscale = set(source_layout.released_to_adapter(released_adapter_config(source_config)))
    source_names = set(source_checkpoint.tensors) - parscale
    base_names = set(base_checkpoint.tensors)
    one_sided = sorted((source_names ^ base_names) - set(source_layout.optional))  # a tied head may be stored or not
    if one_sided:
        where = "SRC" if one_sided[0] in source_names else "BASE"
        return f"tensor {one_sided[0]} is only in {where}"
    with ExitStack() as stack:
        handles = {}

        def base_tensor(name: str) -> torch.Tensor:
            file = base_checkpoint.tensors[name].file
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(base_checkpoint.directory / file, "pt"))
            return handles[file].get_tensor(name)

        for name, source_tensor in source_checkpoint.load(sorted(source_names & base_names)):
            mismatch = _describe_difference(name, source_tensor, base_tensor(name))
            if mismatch is not None:
                return mismatch
    return None


def _describe_difference(name: str, source: torch.Tensor, base: torch.Tensor) -> str | None:
    """None if the tensors hold the same values, else what differs.

    Values are compared exactly in the wider of the two dtypes (a lossless cast): a float32 copy of bfloat16 weights
    matches them, the dtype being a storage choice that `from_pretrained(dtype=...)` overrides anyway.
    """
    if source.shape != base.shape:
        return f"tensor {name} has shape {tuple(source.shape)} in SRC and {tuple(base.shape)} in BASE"
    common = torch.promote_types(source.dtype, base.dtype)
    if torch.equal(source.to(common), base.to(common)):
        return None
    difference = (source.to(common) - base.to(common)).abs()
    differing = int((difference > 0).sum())
    summary = f"max abs difference {difference.max().item():.3g}, {differing} of {difference.numel()} values differ"
    if source.dtype != base.dtype:
        return f"tensor {name} is {_dtype_name(source)} in SRC and {_dtype_name(base)} in BASE ({summary})"
    return f"tensor {name} differs ({_dtype_name(source)}, shape {tuple(source.shape)}): {summary}"


def import_official(
    source: PathLike,
    output: PathLike,
    *,
    write_base: bool = True,
    verify_base: PathLike | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> ImportedCheckpoint:
    """Turn a released ``qwen2_parscale`` checkpoint into a plain Qwen2 base and a ParScale adapter.

    Writes ``output/adapter`` (adapter_config.json and adapter_model.safetensors, for `PeftModel.from_pretrained`
    after ``import peft_parscale``) and, unless ``write_base=False``, ``output/base`` (a ``qwen2`` checkpoint for
    `AutoModelForCausalLM`, no remote code, with the source's tokenizer and generation files). Tensors keep their
    stored dtype. Everything is checked (config, tensor names and shapes, and ``verify_base``) before anything is
    written; ``output`` appears complete or not at all.

    Args:
        source: Directory of a released checkpoint (config.json and safetensors weights, possibly sharded).
        output: Directory to create; it must be absent or empty unless ``overwrite``.
        write_base: Also write the backbone as ``output/base``. Skip it when you have the matching Qwen2 model.
        verify_base: A Qwen2 checkpoint directory whose tensors must hold exactly the values of the source's backbone
            (see `find_backbone_mismatch`); a mismatch raises `ValueError` describing the first difference.
        base_model_name_or_path: Recorded in the adapter config (used by `AutoPeftModelForCausalLM`); defaults to
            ``output/base`` when written, else to ``verify_base``.
        overwrite: Replace a non-empty ``output``.

    Example:

        ```py
        >>> import peft_parscale
        >>> from peft import PeftModel
        >>> from transformers import AutoModelForCausalLM
        >>> result = import_official("ParScale-Qwen-3B-P8-Python", "parscale-3b-p8")
        >>> base = AutoModelForCausalLM.from_pretrained(result.base_dir)
        >>> model = PeftModel.from_pretrained(base, result.adapter_dir)
        ```
    """
    checkpoint = Checkpoint.read(source, "SRC")
    if verify_base is not None:
        Checkpoint.read(verify_base, "the base to verify")  # fail on a missing directory before the slow part
    adapter_config = released_adapter_config(checkpoint.config)
    layout = Qwen2Layout.from_config(base_config_of_released(checkpoint.config), "SRC")
    adapter_config.base_shape = dict(layout.architecture.shape)
    names = layout.released_to_adapter(adapter_config)
    check_tensor_shapes(
        {name: info.shape for name, info in checkpoint.tensors.items()},
        {**layout.backbone, **{released: shape for released, (_, shape) in names.items()}},
        f"SRC ({RELEASED_MODEL_TYPE}, P={adapter_config.P}, T={adapter_config.prefix_length})",
        layout.optional,
    )
    output = check_output(output, [source, verify_base], overwrite)
    if verify_base is not None:
        mismatch = find_backbone_mismatch(source, verify_base)
        if mismatch is not None:
            raise ValueError(f"The base {verify_base} does not match the backbone of {source}: {mismatch}.")
    if base_model_name_or_path is None:
        base_model_name_or_path = str(output / "base") if write_base else _absolute(verify_base)
    adapter_config.base_model_name_or_path = base_model_name_or_path

    with staged_directory(output) as staging:
        adapter_tensors = {names[name][0]: tensor for name, tensor in checkpoint.load(list(names))}
        (staging / "adapter").mkdir()
        save_file(adapter_tensors, staging / "adapter" / ADAPTER_WEIGHTS_FILE, metadata=SAFETENSORS_METADATA)
        adapter_config.save_pretrained(str(staging / "adapter"))
        if write_base:
            _write_base(checkpoint, set(checkpoint.tensors) - set(names), staging / "base")
    return ImportedCheckpoint(
        adapter_dir=output / "adapter",
        base_dir=output / "base" if write_base else None,
        config=adapter_config,
        verified_base=Path(verify_base) if verify_base is not None else None,
    )


def _write_base(checkpoint: Checkpoint, backbone: set[str], directory: Path) -> None:
    """The backbone as a plain Qwen2 checkpoint; shards follow the source's, one source shard in memory at a time."""
    directory.mkdir()
    files = [file for file in checkpoint.files() if any(checkpoint.tensors[name].file == file for name in backbone)]
    weight_map, total_size = {}, 0
    for index, file in enumerate(files, start=1):
        output_file = shard_name(index, len(files))
        names = [name for name in backbone if checkpoint.tensors[name].file == file]
        shard = dict(checkpoint.load(names))
        save_file(shard, directory / output_file, metadata=SAFETENSORS_METADATA)
        weight_map.update({name: output_file for name in shard})
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in shard.values())
        del shard
    if len(files) > 1:
        write_index(directory, weight_map, total_size)
    write_json(directory / CONFIG_FILE, base_config_of_released(checkpoint.config))
    copy_tokenizer_files(checkpoint.directory, directory)


# ----------------------------------------------------------------------------------------------------------------
# export


def export_official(
    base: PathLike,
    adapter: PathLike,
    output: PathLike,
    *,
    modeling_files: Sequence[PathLike] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Qwen2 base and a ParScale adapter as one released-format ``qwen2_parscale`` checkpoint.

    The output has config.json (the base's fields plus ``parscale_n``, ``parscale_n_tokens``,
    ``parscale_attn_smooth``, ``model_type``, ``auto_map`` and ``architectures`` of the released checkpoints), the
    base's safetensors shards copied byte for byte, one more shard with the ParScale tensors under their released
    names (stored dtypes kept), an index, and the base's tokenizer and generation files. The authors' code files are
    copied in only when given (``modeling_files``); without them, load with ``trust_remote_code`` after adding them.

    Args:
        base: Directory of the Qwen2 checkpoint the adapter was trained on (safetensors weights).
        adapter: Directory of a saved ParScale adapter with P > 1.
        output: Directory to create; it must be absent or empty unless ``overwrite``.
        modeling_files: Paths of ``configuration_qwen2_parscale.py`` and ``modeling_qwen2_parscale.py``.
        overwrite: Replace a non-empty ``output``.

    Returns:
        The output directory.

    Example:

        ```py
        >>> export_official("Qwen2.5-0.5B", "runs/p8/adapter", "qwen2.5-0.5b-p8-released")
        ```
    """
    checkpoint = Checkpoint.read(base, "BASE")
    layout = Qwen2Layout.from_config(plain_qwen2_config(checkpoint.config, "BASE"), "BASE")
    layout.check_backbone(checkpoint.tensors, "BASE")
    adapter_config = _read_adapter_config(Path(adapter))
    mismatched = [
        f"{field}={adapter_config.base_shape[field]} (BASE has {layout.architecture.shape[field]})"
        for field in BASE_SHAPE_FIELDS
        if adapter_config.base_shape is not None
        and adapter_config.base_shape[field] != layout.architecture.shape[field]
    ]
    if mismatched:
        raise ValueError("ADAPTER was built for a base model with " + ", ".join(mismatched) + ".")
    names = layout.released_to_adapter(adapter_config)
    try:
        check_adapter_file(str(adapter), {key: shape for key, shape in names.values()})
    except ValueError as error:
        raise ValueError(f"ADAPTER does not fit BASE: {error}") from error
    code_files = _check_modeling_files(modeling_files)
    output = check_output(output, [base, adapter], overwrite)

    adapter_tensors = load_file(Path(adapter) / ADAPTER_WEIGHTS_FILE)
    released_tensors = {released: adapter_tensors[key] for released, (key, _) in names.items()}
    with staged_directory(output) as staging:
        files = checkpoint.files()
        shard_names = {file: shard_name(index, len(files) + 1) for index, file in enumerate(files, start=1)}
        for file, copied_name in shard_names.items():
            shutil.copyfile(checkpoint.directory / file, staging / copied_name)
        parscale_shard = shard_name(len(files) + 1, len(files) + 1)
        save_file(released_tensors, staging / parscale_shard, metadata=SAFETENSORS_METADATA)
        weight_map = {name: shard_names[info.file] for name, info in checkpoint.tensors.items()}
        weight_map.update({name: parscale_shard for name in released_tensors})
        total_size = sum(info.nbytes for info in checkpoint.tensors.values())
        total_size += sum(tensor.numel() * tensor.element_size() for tensor in released_tensors.values())
        write_index(staging, weight_map, total_size)
        write_json(staging / CONFIG_FILE, released_config(checkpoint.config, adapter_config))
        copy_tokenizer_files(checkpoint.directory, staging)
        for path in code_files:
            shutil.copyfile(path, staging / path.name)
    return output


def _read_adapter_config(directory: Path) -> ParScaleConfig:
    path = directory / ADAPTER_CONFIG_FILE
    peft_type = read_json(path, "ADAPTER").get("peft_type")
    if peft_type != "PARSCALE":
        raise ValueError(f"ADAPTER {directory} is not a ParScale adapter: its peft_type is {peft_type!r}.")
    config = ParScaleConfig.from_pretrained(str(directory))
    if config.P == 1:
        raise ValueError(
            "A P=1 adapter cannot be exported: the released format has no ParScale weights for P=1 (a qwen2_parscale "
            "checkpoint with parscale_n=1 is a plain Qwen2 model, without prefixes), so the adapter's prefixes would "
            "be lost."
        )
    return config


def _check_modeling_files(paths: Sequence[PathLike] | None) -> list[Path]:
    if not paths:
        return []
    paths = [Path(path) for path in paths]
    if sorted(path.name for path in paths) != sorted(MODELING_FILES):
        raise ValueError(f"modeling files must be {' and '.join(MODELING_FILES)} (auto_map names them), got {paths}.")
    for path in paths:
        if not path.is_file():
            raise ValueError(f"modeling file {path} does not exist.")
    return paths


def _dtype_name(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _absolute(path: PathLike | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


# ----------------------------------------------------------------------------------------------------------------
# command line


def import_official_main(argv: list[str]) -> int:
    """``parscale import-official SRC OUT``: a released checkpoint -> OUT/base + OUT/adapter."""
    parser = argparse.ArgumentParser(
        prog="parscale import-official",
        description=(
            "Turn a released ParScale checkpoint (model_type qwen2_parscale, a local directory) into a plain Qwen2 "
            "base (OUT/base, loadable without remote code) and a ParScale adapter (OUT/adapter). Tensors keep their "
            "stored dtype."
        ),
    )
    parser.add_argument("source", metavar="SRC", help="directory of the released checkpoint")
    parser.add_argument("output", metavar="OUT", help="directory to create (absent or empty, unless --overwrite)")
    parser.add_argument(
        "--no-base", action="store_true", help="write only OUT/adapter (when you already have the matching Qwen2 model)"
    )
    parser.add_argument(
        "--verify-base",
        metavar="DIR",
        help="a local Qwen2 checkpoint that must equal SRC's backbone tensor by tensor (reports the first difference)",
    )
    parser.add_argument(
        "--base-model-name-or-path",
        metavar="NAME",
        help="base model recorded in the adapter config, e.g. Qwen/Qwen2.5-3B (default: OUT/base, or --verify-base)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        result = import_official(
            args.source,
            args.output,
            write_base=not args.no_base,
            verify_base=args.verify_base,
            base_model_name_or_path=args.base_model_name_or_path,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as error:
        return _fail(parser.prog, error)
    config = result.config
    print(f"adapter: {result.adapter_dir} (P={config.P}, T={config.prefix_length}, smoothing={config.smoothing})")
    if result.base_dir is not None:
        print(f"base:    {result.base_dir}")
    if result.verified_base is not None:
        print(f"verified: {result.verified_base} matches the backbone of {args.source} tensor by tensor")
    return 0


def export_official_main(argv: list[str]) -> int:
    """``parscale export-official BASE ADAPTER OUT``: a Qwen2 base + adapter -> a released-format checkpoint."""
    parser = argparse.ArgumentParser(
        prog="parscale export-official",
        description=(
            "Write a Qwen2 base and a ParScale adapter (P > 1) as one checkpoint in the released ParScale format "
            "(model_type qwen2_parscale), for tools built for the authors' checkpoints."
        ),
    )
    parser.add_argument("base", metavar="BASE", help="directory of the Qwen2 checkpoint the adapter was trained on")
    parser.add_argument("adapter", metavar="ADAPTER", help="directory of the saved ParScale adapter")
    parser.add_argument("output", metavar="OUT", help="directory to create (absent or empty, unless --overwrite)")
    parser.add_argument(
        "--modeling-files",
        nargs=2,
        metavar=("CONFIGURATION_PY", "MODELING_PY"),
        help=f"the authors' {' and '.join(MODELING_FILES)}, copied into OUT (not copied otherwise)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        output = export_official(
            args.base, args.adapter, args.output, modeling_files=args.modeling_files, overwrite=args.overwrite
        )
    except (ValueError, OSError) as error:
        return _fail(parser.prog, error)
    print(f"released-format checkpoint: {output}")
    return 0


def _fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    return 1
