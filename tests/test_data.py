"""The code corpora of `peft_parscale.data`, built on small trees of files: what is read, and which split it is in."""

import hashlib
import sysconfig

import pytest

from peft_parscale.data import (
    document_windows,
    is_heldout,
    packed_windows,
    python_packages_corpus,
    python_stdlib_corpus,
)

GENERATED = [f"gen/module_{index:03d}.py" for index in range(200)]  # enough files for every split to get some
KEPT = [
    "pkg/__init__.py",
    "pkg/core.py",
    "pkg/attestation.py",  # "test" inside a name is not a test
    "pkg/testing_tools/helpers.py",  # nor a directory merely starting with "testing"
    "pkg/latest_test_results.py",
    "top_level.py",
    *GENERATED,
]
EXCLUDED = [
    "pkg/tests/test_core.py",
    "pkg/tests/helpers.py",
    "pkg/test/data.py",
    "pkg/testing/fixtures.py",
    "pkg/test_thing.py",
    "pkg/thing_test.py",
    "pkg/conftest.py",
    "pkg/__pycache__/core.py",
    "pkg/notes.txt",  # not Python
]


def source(relative: str) -> str:
    return f"# {relative}\nVALUE = {len(relative)}\n"


def make_tree(root, relative_paths):
    for relative in relative_paths:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source(relative), encoding="utf-8")
    return root


def expected_split(relative: str, validation_percent: int, heldout_percent: int) -> str:
    bucket = int(hashlib.sha256(relative.encode()).hexdigest(), 16) % 100
    if bucket < heldout_percent:
        return "test"
    return "validation" if bucket < heldout_percent + validation_percent else "train"


def rows(corpus) -> dict[str, list[tuple[str, str]]]:
    return {name: list(zip(split["path"], split["text"], strict=True)) for name, split in corpus.items()}


def test_packages_corpus_keeps_sources_and_leaves_out_tests(tmp_path):
    root = make_tree(tmp_path / "site-packages", KEPT + EXCLUDED)
    (root / "pkg" / "latin1.py").write_bytes("# caf\xe9\n".encode("latin-1"))  # not UTF-8: skipped
    (root / "pkg" / "big.py").write_text("x = 1\n" * 200)  # 1200 bytes, above max_bytes below
    corpus = python_packages_corpus([root], validation_percent=10, heldout_percent=10, max_bytes=1000)
    assert list(corpus) == ["train", "validation", "test"]
    everything = [row for split in rows(corpus).values() for row in split]
    assert sorted(path for path, _ in everything) == sorted(KEPT)
    assert all(text == source(path) for path, text in everything)


def test_packages_corpus_splits_by_a_stable_hash_of_the_relative_path(tmp_path):
    root = make_tree(tmp_path / "site-packages", KEPT)
    corpus = python_packages_corpus([root], validation_percent=10, heldout_percent=15)
    for name, split in corpus.items():
        assert len(split) > 0 and all(expected_split(path, 10, 15) == name for path in split["path"])
    # the held-out split is the one `is_heldout` (the two-way split of the stdlib corpus) gives for the same percent
    assert set(corpus["test"]["path"]) == {path for path in KEPT if is_heldout(path, 15)}


def test_packages_corpus_order_and_split_do_not_depend_on_where_or_how_files_were_written(tmp_path):
    first = make_tree(tmp_path / "a" / "site-packages", KEPT)
    second = make_tree(tmp_path / "b" / "lib" / "site-packages", list(reversed(KEPT)))
    corpus = rows(python_packages_corpus([first]))
    assert corpus == rows(python_packages_corpus([second]))
    assert corpus == rows(python_packages_corpus([first]))
    assert all(paths == sorted(paths) for paths in ([path for path, _ in split] for split in corpus.values()))


def test_several_roots_each_give_paths_relative_to_themselves(tmp_path):
    purelib = make_tree(tmp_path / "purelib", ["alpha/a.py", *GENERATED[:50]])
    platlib = make_tree(tmp_path / "platlib", ["beta/b.py"])
    corpus = python_packages_corpus([purelib, platlib, purelib], validation_percent=0, heldout_percent=1)
    paths = [path for split in corpus.values() for path in split["path"]]
    assert sorted(paths) == sorted(["alpha/a.py", "beta/b.py", *GENERATED[:50]])  # purelib read once
    assert len(corpus["validation"]) == 0 and corpus["validation"].column_names == ["text", "path"]


def test_default_roots_are_this_interpreters_site_packages(tmp_path, monkeypatch):
    purelib = make_tree(tmp_path / "purelib", ["alpha/a.py"])
    platlib = make_tree(tmp_path / "platlib", ["beta/b.py"])
    paths = {**sysconfig.get_paths(), "purelib": str(purelib), "platlib": str(platlib)}
    monkeypatch.setattr(sysconfig, "get_paths", lambda: paths)
    corpus = python_packages_corpus(heldout_percent=1, validation_percent=0)
    assert sorted(path for split in corpus.values() for path in split["path"]) == ["alpha/a.py", "beta/b.py"]


@pytest.mark.parametrize("validation_percent, heldout_percent", [(-1, 5), (5, 0), (50, 50), (0, 100)])
def test_packages_corpus_refuses_impossible_shares(tmp_path, validation_percent, heldout_percent):
    with pytest.raises(ValueError, match="less than 100"):
        python_packages_corpus([tmp_path], validation_percent=validation_percent, heldout_percent=heldout_percent)


def test_stdlib_corpus_keeps_its_two_way_split(tmp_path):
    root = make_tree(
        tmp_path / "lib",
        [*KEPT, "pkg/test_thing.py", "pkg/tests/helpers.py", "idlelib/idle_test/x.py", "site-packages/pkg/a.py"],
    )
    corpus = python_stdlib_corpus(heldout_percent=10, root=root)
    assert list(corpus) == ["train", "test"]
    assert set(corpus["test"]["path"]) == {path for path in KEPT if is_heldout(path, 10)}
    assert set(corpus["train"]["path"]) == {path for path in KEPT if not is_heldout(path, 10)}


def test_windows_are_cut_per_document_or_packed():
    documents = [[1, 2, 3, 4, 5], [6], [7, 8, 9]]
    # per document: windows of 2; a 1-token tail predicts nothing and is dropped, a 2-token one is kept
    assert document_windows(documents, 2) == [[1, 2], [3, 4], [7, 8]]
    assert document_windows(documents, 3) == [[1, 2, 3], [4, 5], [7, 8, 9]]
    assert document_windows(documents, 3, min_length=3) == [[1, 2, 3], [7, 8, 9]]  # full windows only
    # packed: the documents joined by end-of-text (0) into 12 tokens, cut into windows; a shorter tail is dropped
    assert packed_windows(documents, 0, 4) == [[1, 2, 3, 4], [5, 0, 6, 0], [7, 8, 9, 0]]
    assert packed_windows(documents, 0, 5) == [[1, 2, 3, 4, 5], [0, 6, 0, 7, 8]]  # [9, 0] dropped
    with pytest.raises(ValueError, match="at least 2"):
        document_windows(documents, 1)
