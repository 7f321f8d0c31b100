"""Atomic file writing: a crash or SIGKILL at any moment leaves either the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator


def default_cache_dir() -> Path:
    """Where catdog keeps what it can recompute (features, ONNX files): $CATDOG_CACHE, else ~/.cache/catdog."""
    return Path(os.environ.get("CATDOG_CACHE", Path.home() / ".cache" / "catdog"))


def settings_digest(settings: dict, length: int = 12) -> str:
    """A short digest of the settings a cached file was made with, for its name: other settings, another file."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:length]


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success fsync it and move it over the destination.

    The temporary file lives in the same folder so that `os.replace` is a rename on one file system (atomic).
    """
    destination = Path(destination)
    if _is_stream(destination):
        # /dev/null, /dev/stdout, a named pipe: there is no file to replace (and replacing /dev/null with a regular
        # file, as root, would break every other program); write the finished content through instead.
        with tempfile.TemporaryDirectory(prefix="catdog-") as folder:
            temporary = Path(folder) / destination.name
            yield temporary
            with open(temporary, "rb") as source, open(destination, "wb") as target:
                shutil.copyfileobj(source, target)
        return
    if destination.is_symlink():
        destination = destination.resolve()  # keep the link: the file it points to gets the new content
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(handle)
    temporary = Path(temporary_name)
    try:
        yield temporary
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        # mkstemp makes the file readable by its owner alone; a written file gets the mode any new file would
        # (a model file mounted into a container must be readable by the server's own user).
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, destination)
    finally:
        if temporary.exists():
            temporary.unlink()


def _current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _is_stream(destination: Path) -> bool:
    """Whether the destination is a device, pipe or socket (or a link to one, like /dev/stdout), not a file."""
    try:
        mode = destination.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def write_bytes_atomic(destination: str | os.PathLike, data: bytes) -> None:
    with atomic_path(destination) as temporary:
        temporary.write_bytes(data)


def write_text_atomic(destination: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(destination, text.encode("utf-8"))


def write_json_atomic(destination: str | os.PathLike, value: Any) -> None:
    write_text_atomic(destination, json.dumps(value, indent=2, sort_keys=False, default=str) + "\n")


def write_csv_atomic(destination: str | os.PathLike, header: list[str], rows: Iterable[Iterable[Any]]) -> None:
    with atomic_path(destination) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(header)
            writer.writerows(rows)


def write_with_atomic(destination: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)` and move the result into place atomically (for library writers like savefig)."""
    with atomic_path(destination) as temporary:
        write(temporary)
