"""Real Python code with no download (the standard library or installed packages, split by file), and its windows.

The paper recycles a model by training ParScale weights on Python code (its Section 4.2 uses Stack-V2 Python).
Every Python installation carries a few thousand files of reviewed, idiomatic Python in its standard library, so
the quickstart and the tests can train and evaluate on real code on a machine with no network. The packages
installed next to it (``site-packages``) are a larger, more varied corpus of the same kind. Tests are left out (they
are mostly boilerplate around assertions).

The split is by file and by a stable hash of the file's path relative to its root (the standard library, or the
``site-packages`` directory), so it is the same on every run and machine for the same files, and no file contributes
to two splits.

Example::

    from peft_parscale.data import python_packages_corpus, python_stdlib_corpus

    corpus = python_stdlib_corpus()          # DatasetDict with "train" and "test", columns "text" and "path"
    trainer = SFTTrainer(..., train_dataset=corpus["train"], eval_dataset=corpus["test"])

    corpus = python_packages_corpus()        # "train", "validation" (to choose settings), "test" (to report)

Token ids become fixed-length windows here, the one place that cuts them: `document_windows` cuts each document on
its own (evaluation: no window mixes two files), `packed_windows` joins the documents with end-of-text tokens first
(pre-training style: every token is used and no window needs padding)::

    ids = tokenizer(list(corpus["test"]["text"]), add_special_tokens=False)["input_ids"]
    document_windows(ids, 2048)                          # the last, shorter window of each document kept
    packed_windows(ids, tokenizer.eos_token_id, 2048)    # the tail dropped

Local data for ``parscale sft``/``parscale eval`` (`load_data` reads it)::

    python -m peft_parscale.data laptop-data --max_files 40   # laptop-data/train.jsonl and test.jsonl, {"text": ...}
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, IterableDataset, IterableDatasetDict, Value

EXCLUDED_DIRECTORIES = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
PACKAGE_TEST_DIRECTORIES = {"test", "tests", "testing", "__pycache__"}
PACKAGE_TEST_FILES = ("test_*.py", "*_test.py", "conftest.py")
MAX_FILE_BYTES = 1_000_000  # larger files are mostly generated (tables, bindings, vendored bundles)
FEATURES = Features({"text": Value("string"), "path": Value("string")})


def document_windows(token_ids: Iterable[Sequence[int]], length: int, min_length: int = 2) -> list[list[int]]:
    """Each document's token ids cut into consecutive windows of `length` tokens, in order; a window shorter than
    `min_length` (a document's last) is dropped. The default keeps every window that predicts a token (two or more);
    ``min_length=length`` keeps only full windows."""
    if length < 2:
        raise ValueError(f"seq_len must be at least 2, got {length}")
    return [
        list(ids[start : start + length])
        for ids in token_ids
        for start in range(0, len(ids), length)
        if len(ids) - start >= min_length
    ]


def packed_windows(token_ids: Iterable[Sequence[int]], eos_token_id: int, length: int) -> list[list[int]]:
    """Documents' token ids joined by end-of-text tokens and cut into windows of `length` tokens (the tail dropped),
    as in pre-training: every training token is used, and no window needs padding."""
    stream = [token for ids in token_ids for token in [*ids, eos_token_id]]
    return [stream[i : i + length] for i in range(0, len(stream) - length + 1, length)]


def python_files(
    root: Path, excluded_directories: set[str], is_excluded_file: Callable[[Path], bool]
) -> list[tuple[Path, str]]:
    """``(path, path relative to root)`` of the ``.py`` files under `root`, sorted, without excluded ones."""
    files = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        excluded = excluded_directories.intersection(relative.parts[:-1]) or is_excluded_file(path)
        if not excluded and path.is_file():  # not a directory named *.py, nor a broken link
            files.append((path, relative.as_posix()))
    return sorted(files, key=lambda file: file[0])  # by Path (its parts), the order the stdlib corpus always had


def stdlib_python_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files under ``root`` (default: this interpreter's), sorted, tests excluded."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    return [path for path, _ in python_files(root, EXCLUDED_DIRECTORIES, lambda path: path.name.startswith("test_"))]


def package_python_files(root: str | Path) -> list[tuple[Path, str]]:
    """``(path, relative path)`` of the ``.py`` files of the packages in a ``site-packages`` directory, sorted, tests
    (``test``/``tests``/``testing`` directories, ``test_*.py``, ``*_test.py``, ``conftest.py``) excluded."""
    return python_files(
        Path(root), PACKAGE_TEST_DIRECTORIES, lambda path: any(path.match(pattern) for pattern in PACKAGE_TEST_FILES)
    )


def path_bucket(relative_path: str) -> int:
    """A stable number in 0..99 from a file's relative path, so that splits never depend on file order."""
    return int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 100


def is_heldout(relative_path: str, heldout_percent: int) -> bool:
    """Whether a file is held out: a stable hash of its relative path, so the split never depends on file order."""
    return path_bucket(relative_path) < heldout_percent


def python_stdlib_corpus(heldout_percent: int = 5, root: str | Path | None = None) -> DatasetDict:
    """The standard library's source as a ``DatasetDict`` with a ``train`` and a ``test`` (held-out) split.

    Each row is one file: ``{"text": source, "path": path relative to the library root}``. Files that are not
    valid UTF-8 are skipped.
    """
    if not 0 < heldout_percent < 100:
        raise ValueError(f"heldout_percent must be between 1 and 99, got {heldout_percent}")
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = [(path, path.relative_to(root).as_posix()) for path in stdlib_python_files(root)]
    return _corpus(files, lambda relative: "test" if is_heldout(relative, heldout_percent) else "train", max_bytes=None)


def python_packages_corpus(
    roots: Iterable[str | Path] | None = None,
    validation_percent: int = 5,
    heldout_percent: int = 5,
    max_bytes: int = MAX_FILE_BYTES,
) -> DatasetDict:
    """The Python source of installed packages as a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits.

    ``validation`` is for choosing settings, ``test`` (held out) for reporting results. Each row is one file:
    ``{"text": source, "path": path relative to its site-packages directory}``, in a fixed order. Tests are excluded
    (see `package_python_files`), as are files that are not valid UTF-8 or larger than `max_bytes`. A file is in
    ``test`` exactly when ``is_heldout(path, heldout_percent)``, and in ``validation`` for the next
    `validation_percent` hash buckets.

    Args:
        roots: ``site-packages`` directories; default: this interpreter's (``purelib`` and ``platlib``).
        validation_percent: Share of files (by hash of their path) in ``validation``, 0 to 98.
        heldout_percent: Share of files in ``test``, 1 to 99 - validation_percent.
        max_bytes: Files larger than this are skipped.

    Example::

        corpus = python_packages_corpus()
        trainer = SFTTrainer(..., train_dataset=corpus["train"], eval_dataset=corpus["validation"])
    """
    if not (0 <= validation_percent and 0 < heldout_percent and validation_percent + heldout_percent < 100):
        raise ValueError(
            "validation_percent >= 0 and heldout_percent >= 1 must add up to less than 100, got "
            f"{validation_percent} and {heldout_percent}."
        )
    if roots is None:
        roots = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    unique_roots = list(dict.fromkeys(Path(root).resolve() for root in roots))  # purelib is often platlib
    files = [file for root in unique_roots for file in package_python_files(root)]

    def split(relative: str) -> str:
        bucket = path_bucket(relative)  # the lowest buckets are held out, as `is_heldout` says
        if bucket < heldout_percent:
            return "test"
        return "validation" if bucket < heldout_percent + validation_percent else "train"

    return _corpus(files, split, max_bytes, split_names=("train", "validation", "test"))


def _corpus(
    files: list[tuple[Path, str]],
    split_of: Callable[[str], str],
    max_bytes: int | None,
    split_names: tuple[str, ...] = ("train", "test"),
) -> DatasetDict:
    """One row per readable file (``text``, ``path``), in the given order, in the split `split_of` its path names."""
    splits: dict[str, dict[str, list[str]]] = {name: {"text": [], "path": []} for name in split_names}
    for path, relative in files:
        if max_bytes is not None and path.stat().st_size > max_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        columns = splits[split_of(relative)]
        columns["text"].append(text)
        columns["path"].append(relative)
    # from columns with explicit features: an empty split still has its two columns
    return DatasetDict({name: Dataset.from_dict(columns, features=FEATURES) for name, columns in splits.items()})


def load_data(
    path: str, name: str | None = None, split: str | None = None, streaming: bool = False
) -> Dataset | DatasetDict | IterableDataset | IterableDatasetDict:
    """``datasets.load_dataset(path, name, split=split, streaming=streaming)``, which takes a Hub dataset or a local
    folder of data files (``train.jsonl``, ``test.jsonl``, ...); for a folder written by ``save_to_disk``, which
    ``load_dataset`` refuses, ``datasets.load_from_disk`` (a single saved ``Dataset`` is the ``train`` split)."""
    from datasets import load_dataset, load_from_disk

    saved = ("dataset_dict.json", "state.json")  # what save_to_disk writes for a DatasetDict / a Dataset
    if not any(os.path.isfile(os.path.join(path, file)) for file in saved):
        return load_dataset(path, name=name, split=split, streaming=streaming)
    dataset = load_from_disk(path)
    if isinstance(dataset, Dataset):
        dataset = DatasetDict({"train": dataset})
    if streaming:
        dataset = IterableDatasetDict({key: value.to_iterable_dataset() for key, value in dataset.items()})
    return dataset if split is None else dataset[split]


def write_jsonl(corpus: DatasetDict, directory: str | os.PathLike, max_rows: int | None = None) -> list[Path]:
    """Each split of ``corpus`` as ``directory/SPLIT.jsonl``, one JSON object per row (its first ``max_rows`` rows):
    the layout ``load_dataset(directory)`` reads, with one split per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for split, rows in corpus.items():
        rows = rows.select(range(min(len(rows), max_rows))) if max_rows is not None else rows
        rows.to_json(directory / f"{split}.jsonl", lines=True, force_ascii=False)
        files.append(directory / f"{split}.jsonl")
    return files


def main(argv: list[str] | None = None) -> None:
    """``python -m peft_parscale.data DIR``: write the standard library corpus as ``DIR/train.jsonl`` and
    ``DIR/test.jsonl``, a local dataset for ``parscale sft --dataset_name DIR`` and ``parscale eval``."""
    parser = argparse.ArgumentParser(prog="python -m peft_parscale.data", description=main.__doc__.split(":")[1])
    parser.add_argument("directory")
    parser.add_argument("--max_files", type=int, help="files per split at most (default: all)")
    args = parser.parse_args(argv)
    for file in write_jsonl(python_stdlib_corpus(), args.directory, args.max_files):
        print(f"{file}: {file.read_text().count(chr(10))} rows")


if __name__ == "__main__":
    main()
