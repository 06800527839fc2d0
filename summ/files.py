"""Result files are written atomically: a temporary file in the same folder, then a rename,
so a reader (or a resumed sweep) never sees half a file. The file gets the mode an ordinary
write would give it: the one it had when it is replaced, else 0666 less the umask (a teammate
on a shared cluster reads results as they read run.log), never the temporary file's 0600.

A write that fails (its folder cannot be created, the disk is full, the rename is refused)
raises WriteFailed with one line naming the file and the reason; the old file, if any, is left
as it was and the temporary file is removed."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from summ.errors import UserError


class WriteFailed(UserError, OSError):
    """A result file could not be written. A UserError (the run ends with its one line and exit
    code 2; a sweep records the job and goes on) and an OSError (for callers that catch those)."""


def make_folder(folder: str | os.PathLike, for_file: str | os.PathLike | None = None) -> Path:
    """Create `folder` and its parents, or raise WriteFailed naming it (or `for_file`, the file
    that was to go into it) and why it cannot exist. Call it before compute that writes there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteFailed(f"cannot write {for_file or folder}: {_folder_reason(folder, exc)}") from exc
    return folder


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    make_folder(path.parent, for_file=path)
    tmp = None
    try:
        mode = file_mode(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, WriteFailed):
            raise WriteFailed(f"cannot write {path}: {_reason(exc)}") from exc
        raise


def file_mode(path: Path) -> int:
    """The permission bits `path` keeps (it exists) or gets (new_file_mode)."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return new_file_mode()


def new_file_mode() -> int:
    """What an ordinary write gives a new file: 0666 less the process's umask."""
    return 0o666 & ~umask()


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc, since 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(current)
    return current


def _reason(exc: OSError) -> str:
    """The OS's reason in one line, without repeating the paths the message already names."""
    text = exc.strerror or str(exc) or type(exc).__name__
    return text.splitlines()[0]


def _folder_reason(folder: Path, exc: OSError) -> str:
    """Why `folder` cannot be created: most often a file sits where a folder should be."""
    for candidate in (folder, *folder.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                return f"{candidate} is a file, not a folder"
            break
    return f"the folder {folder} cannot be created ({_reason(exc)})"


def _finite(obj: Any) -> Any:
    """JSON has no NaN or Infinity: write them as null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """Serialised in full before anything touches the disk: a value JSON cannot hold raises
    TypeError (a bug, not a user error) and leaves the old file as it was."""
    try:
        text = json.dumps(_finite(data), indent=2, ensure_ascii=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot write {path}: {exc}") from exc
    atomic_write_text(path, text)


def write_jsonl(path: str | os.PathLike, rows: list) -> None:
    """One JSON object per line (the step history), written atomically."""
    atomic_write_text(path, "".join(json.dumps(_finite(r), ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list:
    """The rows of a JSON-lines file; [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
