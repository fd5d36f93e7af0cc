"""Atomic file and directory writes: a file or a directory appears whole or not at all.

Each write goes to a temporary file or directory beside its target (the same filesystem), is
flushed to disk, and is renamed into place with ``os.replace``; the parent directory is synced
after. Used by the trainers' checkpoints and model directories and by the sampling CLIs' outputs.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_directory(final: str | Path) -> "_AtomicDir":
    """Context manager yielding a temporary directory that is renamed to ``final`` on success
    (replacing an existing ``final``); removed on failure."""
    return _AtomicDir(Path(final))


class _AtomicDir:
    def __init__(self, final: Path) -> None:
        self.final = final

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.tmp-", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for f in self.tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old-{os.getpid()}")
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        _fsync_dir(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def publish_files(src_dir: Path, dst_dir: str | Path) -> None:
    """Move every file of ``src_dir`` into ``dst_dir`` with ``os.replace`` (each file appears whole
    or not at all), then remove ``src_dir``."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src_dir.iterdir()):
        if not f.is_file():
            raise ValueError(f"publish_files: {f} is not a plain file")
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, dst / f.name)
    _fsync_dir(dst)
    shutil.rmtree(src_dir, ignore_errors=True)


def staging_dir(dst_dir: str | Path) -> Path:
    """A fresh temporary directory beside ``dst_dir`` files (same filesystem, for ``publish_files``)."""
    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".staging-", dir=dst))
