"""Crash-safe file writing: every file a reader may see is complete (temp file + fsync + rename).

A rename within one folder is atomic on POSIX, so after a crash a path holds either the old
content or the new one, never a torn mix. Append-only progress files (``*.partial``) are the one
exception; ``read_jsonl`` tolerates their torn last line.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, List


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files readable by the owner only; give finished files the usual permissions.
_FILE_MODE = 0o666 & ~_current_umask()


def _fsync_dir(path: Path) -> None:
    # The rename itself lives in the folder's metadata; fsync it so it survives a power loss.
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def append_jsonl(path, rows: Iterable[dict]) -> None:
    """Append complete lines and fsync, so a crash can tear at most the last line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path, tolerate_torn_tail: bool = False) -> List[dict]:
    """Parse a JSONL file.

    With tolerate_torn_tail, an unterminated last line is dropped: append_jsonl writes whole
    lines ending in "\n", so a line without one is a crash in the middle of an append, not a
    committed row. Damage anywhere else is an error naming the line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    # A complete file ends with "\n", so the final element is "" unless the last append was torn.
    tail = lines.pop()
    if tail.strip() and not tolerate_torn_tail:
        lines.append(tail)
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e})") from None
    return rows


def replace_dir(tmp_dir, final_dir) -> None:
    """Move a fully written folder into place, so that at every instant, across any sequence of
    crashes, one complete folder is reachable by ``find_dir``: final_dir, or its ``.old`` twin.

    Invariant: ``.old`` is complete whenever final_dir does not exist. final_dir only ever
    appears by an atomic rename of a complete folder (tmp_dir, finished by the caller), and
    ``.old`` is deleted (or overwritten by a rename) only while final_dir exists. So:
      * final_dir exists: a stale ``.old`` (maybe half deleted by an earlier crash) is removed,
        final_dir is renamed to ``.old`` (complete), tmp_dir to final_dir, and ``.old`` removed;
      * final_dir is missing (a crash between the two renames): ``.old`` is the last complete
        folder; tmp_dir is renamed to final_dir first, and only then is ``.old`` removed.
    Deleting ``.old`` before final_dir exists (as this function once did) could lose both: a
    crash during that delete left a partial ``.old`` that resume picked, and a crash just after
    left only the ``.tmp`` folder, which resume never considers (it may be half written).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    old = final_dir.with_name(final_dir.name + ".old")
    if final_dir.exists():
        if old.exists():
            shutil.rmtree(old)  # final_dir is complete: .old is redundant
        os.replace(final_dir, old)
        _fsync_dir(final_dir.parent)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old.exists():
        shutil.rmtree(old)


def find_dir(final_dir):
    """The folder replace_dir last completed: final_dir, or its '.old' twin after a crash between
    the two renames; None when neither exists. Never the '.tmp' folder: it may be half written,
    and replace_dir never leaves the only complete copy there (see its invariant); a '.old' next
    to an existing final_dir may be half deleted and is ignored."""
    final_dir = Path(final_dir)
    if final_dir.is_dir():
        return final_dir
    old = final_dir.with_name(final_dir.name + ".old")
    return old if old.is_dir() else None
