"""Files a tool writes: atomic writes, JSON lines, and output paths that stay inside their folder.

Each atomic writer puts the data in a temporary file ``.<name>.<random>.tmp`` in the same folder, flushes it to
disk, then renames it over the target (``os.replace`` is atomic on POSIX and Windows when both paths are on one file
system): a file is either the old one or the whole new one, never half of it. A process killed mid-write leaves its
temporary file; :func:`remove_stale_temporaries` clears those of given targets.

A JSON-lines file grows by :func:`append_jsonl`; a kill can leave its last line unfinished (no newline), which
:func:`read_jsonl` skips and the next :func:`append_jsonl` cuts off.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_open", "atomic_write_bytes", "atomic_write_text", "atomic_save_json", "atomic_torch_save",
           "remove_stale_temporaries", "append_jsonl", "read_jsonl", "output_dir",
           "file_in"]

TEMP_SUFFIX = ".tmp"


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> tuple[int, int]:
    """Delete the temporary files that interrupted :func:`atomic_open` writes of the files ``names`` (glob
    patterns, e.g. ``"config_resume_*.yaml"``) in ``folder`` left behind; returns (files, bytes) removed.

    Only for files no other process is writing now (a run's own files, at its start).
    """
    files = size = 0
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                n = tmp.stat().st_size
                tmp.unlink()
                files, size = files + 1, size + n
    return files, size


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file beside ``path``; on a clean exit it replaces ``path``, on an error it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the file the permissions open() would
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_save_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line. A kill can at worst leave a last line unfinished (no newline): :func:`read_jsonl`
    skips it, and the next append cuts it off first, so that it does not run into the new line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.truncate(_whole_lines_end(f))
        f.write((json.dumps(record) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


def _whole_lines_end(f, block: int = 1 << 16) -> int:
    """The offset just after the last newline of the binary file ``f`` (0 when it has none)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        start = max(pos - block, 0)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file, skipping blank lines and an unfinished last line (no newline after it:
    a write a kill cut short). ValueError naming the file and the line for a whole line that is not JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    records = []
    for number, line in enumerate(text.split("\n")[:-1], 1):  # the last item is "" or the unfinished line
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {number}: not JSON ({e.msg})") from e
    return records


def output_dir(path: str | os.PathLike, flag: str = "--output-dir") -> Path:
    """``path`` as an output folder, created if missing; ValueError naming ``flag`` when it cannot be one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create the folder: {e.strerror or e}") from e
    return path


def file_in(folder: str | os.PathLike, name: str, flag: str) -> Path:
    """``folder / name``, refused (ValueError naming ``flag``) unless ``name`` is a plain file name, so that the
    file lands in ``folder`` itself: no folder part, no ``..``, not empty or hidden."""
    if not name or name != Path(name).name or name in (".", "..") or name.startswith(".") or "\\" in name \
            or "\0" in name:
        raise ValueError(f"{flag} {name!r} must be a plain file name (no folder, not hidden), to stay in {folder}")
    return Path(folder) / name
