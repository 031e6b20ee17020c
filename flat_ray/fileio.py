"""Writing files so that a crash never leaves one half-written, and checking a folder is writable before a run."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from flat_ray.errors import FlatRayError


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, flushed, then renamed over it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def nearest_existing(path: Path) -> Path:
    """``path`` itself where it exists, else the closest folder above it that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem(path: str | Path) -> int:
    """The filesystem (device id) ``path`` is on, or would be created on: that of its nearest existing folder."""
    return nearest_existing(Path(path).expanduser()).stat().st_dev


def check_writable(path: str | Path, what: str) -> None:
    """Fail with one line if ``path`` (a folder that may not exist yet) cannot be created or written.

    Nothing is left behind: the check looks at the nearest existing folder and creates and removes one
    temporary file there."""
    p = Path(path).expanduser()
    existing = nearest_existing(p)
    if not existing.is_dir():
        raise FlatRayError(f"{what} {str(p)!r} is not usable: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise FlatRayError(f"{what} {str(p)!r} is not writable: [Errno {exc.errno}] {exc.strerror} in "
                           f"{str(existing)!r}; choose another folder or fix its permissions") from None
