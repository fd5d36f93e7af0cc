"""Atomic file and directory writes: a file or a directory appears whole or not at all.

Each write goes to a temporary file or directory beside its target (the same filesystem), is
flushed to disk, and is renamed into place with ``os.replace``; the parent directory is synced
after. New files and directories get the usual umask-based mode (a replaced file keeps its own),
never ``mkstemp``'s 0600. Only regular files are replaced: a symlink's target is written (the
link stays a link) and a special file (``/dev/null``, a FIFO) is written in place. Used by the
trainers' checkpoints and model directories and by every CLI's outputs
(`mahalo_engine.utils.outputs`).
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(..., "w")`` gives a new file under the current umask."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode ``mkdir`` gives a new directory under the current umask."""
    return 0o777 & ~_umask()


def is_special(path: str | Path) -> bool:
    """True for an existing path (after symlinks) that is neither a regular file nor a directory:
    a character or block device, a FIFO, a socket. Such outputs are written in place."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def write_target(path: str | Path) -> Path:
    """The file an output named ``path`` really is: a symlink's final target (so that the link
    stays a link), else ``path``. A directory is an error."""
    real = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    if real.is_dir():
        raise IsADirectoryError(f"{path} is a directory; expected a file path")
    return real


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
    """``data`` into ``path``: an atomic replace for a regular or new file (module docstring), the
    target of a symlink, in place for a special file."""
    target = write_target(path)
    if is_special(target):
        with open(target, "wb") as f:
            f.write(data)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = new_file_mode()
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # mkstemp creates 0600
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


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
        self.tmp.chmod(new_dir_mode())  # mkdtemp's 0700 would stay on the published directory
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
