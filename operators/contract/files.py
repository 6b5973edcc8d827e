"""The project's one way to write a file that a reader must never see half-written.

``atomic_path(path)`` yields a temporary name beside ``path`` (hidden, unique to the process and
thread, ending in ``.partial`` so a clean-up can find leftovers), and renames it onto ``path`` only
when the block succeeds; on an error the temporary file is removed and ``path`` is untouched. Two
processes writing into one folder never share a temporary name. Lives on the deploy side because
both sides use it and ``operators`` never imports ``training``.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def temp_name(path: Path, suffix: str = "") -> Path:
    """``.NAME.PID-TID.partial`` beside ``path``; with ``suffix`` (a writer that chooses its format by
    the file's ending, as ``np.save`` and nibabel do) ``.STEM.PID-TID.partialSUFFIX``."""
    stem = path.name[: -len(suffix)] if suffix and path.name.endswith(suffix) else path.name
    return path.with_name(f".{stem}.{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}{suffix}")


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False, suffix: str = "") -> Iterator[Path]:
    """A temporary path (a file or a folder) to write to; renamed onto ``path`` when the block ends
    without error. ``suffix``: the ending the temporary name must keep (see ``temp_name``)."""
    path = Path(path)
    tmp = temp_name(path, suffix)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def write_atomic(path: str | Path, data: str | bytes, fsync: bool = False) -> None:
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


def write_json(path: str | Path, obj: Any, indent: int = 1) -> None:
    write_atomic(path, json.dumps(obj, indent=indent))


def jsonl_records(
    path: str | Path, keys: tuple[str, ...], error: type[Exception] = ValueError
) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSON-lines file; a line that is not a JSON object
    holding ``keys`` raises ``error`` naming the file and the line."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                missing = [k for k in keys if k not in rec]
            except (ValueError, TypeError) as exc:
                raise error(f"{path}: line {n} is not a JSON record ({exc})") from None
            if missing:
                raise error(f"{path}: line {n} lacks {', '.join(missing)}")
            yield n, rec
