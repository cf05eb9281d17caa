"""``python -m distload.manifest CKPT``: writes ``CKPT/distload-manifest.json``, the reference
digests ``--verify-checksums`` checks a checkpoint against when it is no Hugging Face cache snapshot.

It lists config.json, the index and every weight file (what a load reads, and every other index
and ``*.safetensors``/``*.bin``/``*.pt``/``*.pth`` file at the folder's top: a verified load that
does not read one names it, listed, unlisted or gone, without hashing it), each with its sha256
and size, as one JSON file with sorted keys and no timestamp: the same folder always gives the
same bytes. Writing it is the only thing distload ever writes into a checkpoint folder, and only
here: a temporary file beside it, renamed into place; nothing else there is opened for writing,
and a manifest that would not change is left alone. Run it on a copy you trust (say, right after
a download checked against its publisher's digests): it records what is there, right or wrong.

Exit codes: 0 written (or already up to date), 1 a DistloadError (one line), 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from .checkpoint.digests import SHA256, file_digest
from .checkpoint.directory import weight_files
from .checkpoint.reference import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION, is_snapshot, weight_names
from .errors import CheckpointError, DistloadError


def manifest_text(directory: str, *, num_threads: int | None = None) -> str:
    """The manifest of ``directory``: its JSON text.

    Args:
        directory: the checkpoint folder.
        num_threads: files hashed at once (default: the cores this process may use).

    Raises:
        CheckpointError: an unusable folder or file (names it), or a Hugging Face cache snapshot
            (its blob names are the reference already).
    """
    if is_snapshot(directory):
        raise CheckpointError("is a snapshot of the Hugging Face cache: its blob names are each file's digest "
                              "already, and --verify-checksums checks against them (distload writes nothing "
                              "into the cache)", file=os.path.abspath(directory))
    directory = os.path.abspath(directory)
    names = weight_names(directory, weight_files(directory, allow_pickle=True))
    threads = num_threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), threads or 1))) as pool:
        digests = list(pool.map(lambda name: file_digest(os.path.join(directory, *name.split("/")), SHA256), names))
    files = {name: {SHA256: digest, "size": size} for name, (digest, size) in zip(names, digests)}
    doc = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "files": files}
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def write_manifest(directory: str, *, num_threads: int | None = None) -> tuple[str, bool]:
    """Writes ``directory``'s manifest beside its files, atomically.

    Returns:
        ``(path of the manifest, whether it was written)``: False when it was up to date.

    Raises:
        CheckpointError: as ``manifest_text``, or the manifest could not be written.
    """
    text = manifest_text(directory, num_threads=num_threads)
    path = os.path.join(os.path.abspath(directory), MANIFEST_NAME)
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return path, False
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CheckpointError(f"cannot write the manifest: {err.strerror or err}", file=path) from None
    return path, True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distload.manifest", allow_abbrev=False,
        description=f"Write CHECKPOINT/{MANIFEST_NAME}: the sha256 and size of config.json, the index and every "
                    "weight file, which --verify-checksums checks a load against.")
    parser.add_argument("checkpoint", help="the checkpoint folder (a copy you trust)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        return 2 if done.code else 0
    try:
        path, written = write_manifest(args.checkpoint)
    except DistloadError as err:
        print(f"distload.manifest: error: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"{'wrote' if written else 'up to date:'} {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
