"""Carry an unfinished run from one device session to the next: what resuming needs, in chunks the device takes.

A device machine keeps its files only while it is held, and a session's device time ends before some runs do (the
20 M-token sweep's P=8 run on one GPU, RESULTS.md). Such a run checkpoints by ``--time-limit``, comes
back here at the end of one session and goes up again in the next. A device call returns at most 8 files of at most
16 MiB, 64 MiB together, no more than 2 folders below $OUT and named in letters, digits, '.', '_' and '-' alone, and
carries at most 64 MiB up, the repository's own files included, so the run travels as an archive in chunks, with a
manifest of SHA-256 sums:

    # on the device, after the runs' last call of the session (the checkpoints are saved):
    python3 experiments/device_transfer.py pack sweep/P8 /tmp/pack/P8
    python3 experiments/device_transfer.py pack sweep/P4 /tmp/pack/P4
    python3 experiments/device_transfer.py send /tmp/pack "$OUT"/pack   # what fits in this call's return
    # the same `send` in each next call, back to back while the machine is warm, until it sends nothing
    # here: every chunk and manifest into git-ignored folders (.sweep-pack/P8/, ...); next session, calls carrying
    # a few chunks each into /tmp/pack/P8, then:
    python3 experiments/device_transfer.py unpack /tmp/pack/P8 sweep/P8

What travels: the run folder's own files (its segments' timings) and its latest checkpoint, which holds everything the
Trainer reads to resume (adapter, optimizer, scheduler, random states, trainer state with the learning curve). Left
behind: older checkpoints, the tokenizer and model card the Trainer writes into each checkpoint (resuming does not read
them), and ``initial_adapter/``, which only the short parity runs' ``--compare`` reads. `unpack` checks every sum
before it writes anything and refuses a run folder that already holds a checkpoint.

The packs here are git-ignored (a P=8 checkpoint is about 100 MiB), so they live only in the checkout that received
them: a session whose machine is shut down before it ends loses them, and the run starts again (P=8 of the one-GPU
sweep did, RESULTS.md).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

RETURNED_FILE_BYTES = 16 * 2**20  # the most a file returned by a device call may have
CHUNK_BYTES = 15 * 2**20  # under RETURNED_FILE_BYTES; four fill a call's 64 MiB with room to spare
RETURNED_NAME = re.compile(r"[A-Za-z0-9._-]+")  # what a returned file's or folder's name may hold
# what one call may return (`send`): 8 files and 64 MiB, less 2 MiB for an archive of results the call returns too
# (which also takes one of the 8 files: pass --max-files 7 beside it)
SEND_FILES, SEND_BYTES = 8, 62 * 2**20
# what the Trainer writes into a checkpoint for the user and never reads back when resuming
NOT_FOR_RESUMING = {
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
}


def files_to_carry(run: Path) -> list[Path]:
    """The run folder's own files and its latest checkpoint's files that resuming reads, relative to `run`."""
    checkpoint = get_last_checkpoint(str(run))
    if checkpoint is None:
        raise ValueError(f"{run} holds no checkpoint-<step> folder: there is nothing to resume.")
    own = sorted(path.relative_to(run) for path in run.iterdir() if path.is_file())
    saved = sorted(
        path.relative_to(run)
        for path in Path(checkpoint).rglob("*")
        if path.is_file() and path.name not in NOT_FOR_RESUMING
    )
    return own + saved


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack(run: Path, destination: Path, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Write `destination`/chunk-NN and manifest.json for `run`; returns the manifest. `destination` must be empty or
    new: an older pack's chunks left beside the new ones would travel for nothing."""
    if destination.is_dir() and any(destination.iterdir()):
        raise ValueError(f"{destination} is not empty: pack into a new folder (or remove the older pack first).")
    files = files_to_carry(run)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in files:
            archive.add(run / name, arcname=str(name))
    data = buffer.getvalue()
    destination.mkdir(parents=True, exist_ok=True)
    chunks = []
    for index, start in enumerate(range(0, len(data), chunk_bytes)):
        chunk = data[start : start + chunk_bytes]
        name = f"chunk-{index:02d}"
        (destination / name).write_bytes(chunk)
        chunks.append({"name": name, "bytes": len(chunk), "sha256": sha256(chunk)})
    manifest = {"run": run.name, "files": [str(name) for name in files], "sha256": sha256(data), "chunks": chunks}
    (destination / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def unpack(source: Path, run: Path) -> list[str]:
    """Check the chunks in `source` against its manifest, then extract them into `run`; returns the files written."""
    manifest = json.loads((source / "manifest.json").read_text())
    parts = []
    for chunk in manifest["chunks"]:
        path = source / chunk["name"]
        if not path.is_file():
            raise ValueError(f"{path} is missing: bring every chunk of the manifest ({len(manifest['chunks'])}).")
        data = path.read_bytes()
        if sha256(data) != chunk["sha256"]:
            raise ValueError(f"{path} does not match its SHA-256 in the manifest: copy it again.")
        parts.append(data)
    data = b"".join(parts)
    if sha256(data) != manifest["sha256"]:
        raise ValueError(f"The chunks in {source} joined do not match the manifest's SHA-256.")
    if run.is_dir() and get_last_checkpoint(str(run)) is not None:
        raise ValueError(f"{run} already holds a checkpoint; unpack into a folder without one.")
    run.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
        archive.extractall(run, filter="data")  # the "data" filter refuses absolute paths and links out of `run`
    return manifest["files"]


def send(packs: Path, out: Path, max_files: int = SEND_FILES, max_bytes: int = SEND_BYTES) -> list[str]:
    """Copy into `out` (new or empty: one `send` a call) the next files under `packs` (`pack`'s destinations, one
    folder a run) that fit in one device call's return, manifests first, each under its path relative to `packs`;
    returns them, empty once all have gone. Each file sent is listed with its SHA-256 in ``<packs>.sent`` beside
    `packs`, so that the next call, on the same warm machine, sends the rest, and a file packed again since is sent
    again. Every file is checked against a call's limits before anything is copied. A call whose return failed: delete
    ``<packs>.sent`` and send everything again."""
    packs = packs.resolve()
    if not packs.is_dir():
        raise ValueError(f"{packs} is not a folder of packs (`pack`'s destinations).")
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty: one `send` a call, into a new folder.")
    files = sorted(
        (path for path in packs.rglob("*") if path.is_file()),
        key=lambda path: (path.name != "manifest.json", str(path)),
    )
    for path in files:
        parts = path.relative_to(packs).parts
        if len(parts) > 2 or not all(RETURNED_NAME.fullmatch(part) for part in parts):
            raise ValueError(
                f"{path}: a call returns files at most two folders down, named in letters, digits, '.', '_' and '-' "
                "alone: pack each run into <packs>/<name>/ with such a name."
            )
        if path.stat().st_size > min(max_bytes, RETURNED_FILE_BYTES):
            raise ValueError(f"{path} is larger than a call may return: pack with smaller chunks.")
    sent_list = packs.with_name(packs.name + ".sent")
    sent = set(sent_list.read_text().splitlines()) if sent_list.exists() else set()
    chosen, total = [], 0
    for path in files:
        entry = f"{sha256(path.read_bytes())}  {path.relative_to(packs)}"
        size = path.stat().st_size
        if entry not in sent and len(chosen) < max_files and total + size <= max_bytes:
            chosen.append(entry)
            total += size
    names = [entry.partition("  ")[2] for entry in chosen]
    for name in names:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(packs / name, out / name)
    with sent_list.open("a") as listing:
        listing.writelines(f"{entry}\n" for entry in chosen)
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack_parser = commands.add_parser("pack", help="RUN_DIR DESTINATION: chunks and manifest of what resuming needs")
    pack_parser.add_argument("run", type=Path)
    pack_parser.add_argument("destination", type=Path)
    pack_parser.add_argument("--chunk-mib", type=float, default=CHUNK_BYTES / 2**20)
    unpack_parser = commands.add_parser("unpack", help="SOURCE RUN_DIR: check the chunks, then extract them")
    unpack_parser.add_argument("source", type=Path)
    unpack_parser.add_argument("run", type=Path)
    send_parser = commands.add_parser("send", help="PACKS OUT: the next files of PACKS that fit in one call's return")
    send_parser.add_argument("packs", type=Path)
    send_parser.add_argument("out", type=Path)
    send_parser.add_argument("--max-files", type=int, default=SEND_FILES)
    send_parser.add_argument("--max-mib", type=float, default=SEND_BYTES / 2**20)
    args = parser.parse_args(argv)
    if args.command == "send":
        chosen = send(args.packs, args.out, args.max_files, int(args.max_mib * 2**20))
        in_all = sum(1 for path in args.packs.rglob("*") if path.is_file())
        print(f"sent {len(chosen)} files: {' '.join(chosen) or 'none'}; {in_all} in {args.packs} in all")
    elif args.command == "pack":
        manifest = pack(args.run, args.destination, int(args.chunk_mib * 2**20))
        total = sum(chunk["bytes"] for chunk in manifest["chunks"])
        print(
            f"{args.run}: {len(manifest['files'])} files, {total / 2**20:.1f} MiB in {len(manifest['chunks'])} chunks"
        )
    else:
        files = unpack(args.source, args.run)
        print(f"{args.run}: {len(files)} files unpacked")


if __name__ == "__main__":
    main()
