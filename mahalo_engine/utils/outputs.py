"""Writing the files a command produces without losing or clobbering anything.

Every CLI that writes (``mahalo_engine search|generate``, ``bench``, the trainers, ``training.labels``,
``training.data``, ``training.convert``) goes through this module:

- single files go through `mahalo_engine.utils.atomic_files`: a regular (or new) file is
  replaced atomically with the usual umask-based mode (or the mode of the file it replaces); a
  symlink's target is written (the link stays); a special file (``/dev/null``, a FIFO) is written
  in place.
- ``check_not_input``: an output that is one of the run's inputs (``os.path.samefile``) is refused.
- ``OutputLock``: an exclusive lock on an output for the length of a run — a ``<out>.lock`` file
  beside it holding the owner's pid, locked with ``flock`` (so a lock left by a killed process is
  taken over), removed on exit. A second run on the same output is refused with one line naming
  the holder's pid.
- ``JsonlOutput``: a jsonl written in whole rows that leaves an existing file untouched until the
  first new rows are ready (a run that fails on an early check loses nothing).
- ``read_text_lines``: the input side's one rule for text files (UTF-8, a leading BOM accepted,
  an undecodable line named by ``file:line``).
- ``OPTIONS_SUFFIX`` sidecar and ``check_options``: the options that shape a run's results, stored
  with its output (``<out>.meta.json`` beside a jsonl, inside each trainer checkpoint) and compared
  on ``--resume``: any difference is refused with one line listing old and new values.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from mahalo_engine.utils.atomic_files import (atomic_write_text, is_special, new_file_mode,
                                              write_target)

OPTIONS_SUFFIX = ".meta.json"


# -- inputs -------------------------------------------------------------------------------------

def read_text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line of a UTF-8 text file (a leading byte-order mark, as
    some editors write, is skipped); a line that is not UTF-8 is a ValueError naming
    ``file:line``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file" if not p.exists() else f"{p} is not a file")
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{p}:{n}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None


# -- inputs that must not be outputs ------------------------------------------------------------

def check_not_input(out: str | Path, inputs: Mapping[str, str | Path | Iterable[str | Path] | None],
                    flag: str = "--out") -> None:
    """ValueError when ``out`` is the same file or directory as an input (``{"--prompts": path}``;
    a value may be a list of paths): writing it would destroy what the run reads."""
    if not os.path.exists(out):
        return
    for name, paths in inputs.items():
        if paths is None:
            continue
        for p in [paths] if isinstance(paths, (str, Path)) else paths:
            if os.path.exists(p) and os.path.samefile(out, p):
                raise ValueError(f"{flag} {out} is the same file as {name} {p}: writing it would "
                                 f"destroy the input; choose another {flag}")


# -- the run's lock -----------------------------------------------------------------------------

def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".lock")


class OutputLock:
    """Exclusive use of the output ``out`` (a file or a trainer's folder) while the context is
    active (module docstring).

    A special-file output (``/dev/null``) takes no lock. ``ValueError`` when another live process
    holds it. Under torchrun only rank 0 (the writer) takes it."""

    def __init__(self, out: str | Path, flag: str = "--out") -> None:
        self.out, self.flag = Path(out), flag
        real = Path(os.path.realpath(out)) if os.path.islink(out) else self.out  # file or folder
        self.path = lock_path(real) if not is_special(out) else None
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path is None or self.fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, new_file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"{self.flag} {self.out} is in use by another run (pid "
                                 f"{holder}, lock {self.path}); wait for it to finish or choose "
                                 f"another {self.flag}") from None
            # The holder we waited on may have removed the file as we opened it: lock the file
            # that is at the path now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)  # a stale lock's dead pid is replaced
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file and unlock (a no-op when not held)."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)  # releases the flock
            self.fd = None


# -- the options a result depends on ------------------------------------------------------------

def plain(value: Any) -> Any:
    """``value`` as JSON-comparable data (paths as strings, tuples as lists)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def options_of(args: Any, names: Sequence[str]) -> dict[str, Any]:
    """``{name: args.name}`` for the declared result-shaping options, as plain data."""
    return {n: plain(getattr(args, n, None)) for n in names}


def check_options(where: str | Path, saved: Mapping[str, Any] | None, now: Mapping[str, Any]
                  ) -> None:
    """``--resume`` refuses any difference between the options stored with an output and this
    run's: one ValueError line listing each option's old and new value (a dict-valued option,
    such as per-group learning rates, entry by entry). An option the output has no record of (it
    was written before that option was stored) cannot be compared and is skipped."""
    saved = {} if saved is None else saved
    diffs = []
    for k in sorted(set(saved) & set(now)):
        was, new = plain(saved[k]), plain(now[k])
        if was == new:
            continue
        flag = f"--{k.replace('_', '-')}"
        if isinstance(was, dict) and isinstance(new, dict):
            diffs += [f"{flag} {g} was {was.get(g)!r}, now {new.get(g)!r}"
                      for g in sorted(set(was) | set(new)) if was.get(g) != new.get(g)]
        else:
            diffs.append(f"{flag} was {was!r}, now {new!r}")
    if diffs:
        raise ValueError(f"--resume: {where} was made with other options ({'; '.join(diffs)}); "
                         f"rerun with the same options, or start afresh")


def options_path(out: str | Path) -> Path:
    out = write_target(out)
    return out.with_name(out.name + OPTIONS_SUFFIX)


def read_options(out: str | Path) -> dict[str, Any] | None:
    """The options stored beside the jsonl ``out`` (None when it has no sidecar)."""
    p = options_path(out)
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not valid JSON ({e}); remove it and start afresh") from None
    return data.get("options", {})


# -- jsonl outputs written in whole rows --------------------------------------------------------

class JsonlOutput:
    """A jsonl output that holds ``done`` finished items, its first ``keep_bytes`` bytes kept.

    Nothing is written until ``append`` brings the first new rows: a fresh run then replaces the
    old file atomically with them (and writes the options sidecar), a resumed one cuts the file
    to its kept rows and appends. Later rows are appended and flushed to disk in one write each
    (a crash tears at most the last line). Rows never hold NaN or infinity (invalid JSON)."""

    def __init__(self, path: str | Path, done: int = 0, keep_bytes: int = 0,
                 options: Mapping[str, Any] | None = None) -> None:
        self.path, self.done, self.keep_bytes = Path(path), done, keep_bytes
        self.options = None if options is None else dict(options)
        self.started = False

    def append(self, rows: Sequence[dict[str, Any]]) -> None:
        text = "".join(_json_line(r) for r in rows)
        target = write_target(self.path)
        special = is_special(target)
        if not self.started:
            self.started = True
            if self.options is not None and not special:
                atomic_write_text(options_path(self.path), json.dumps(
                    {"output": str(self.path), "options": self.options}, indent=1) + "\n")
            if special:
                pass
            elif self.keep_bytes == 0:
                atomic_write_text(target, text)
                return
            else:
                os.truncate(target, self.keep_bytes)
        with open(target, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if not special:
                os.fsync(f.fileno())


def _json_line(row: dict[str, Any]) -> str:
    try:
        return json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n"
    except ValueError:
        raise FloatingPointError(f"a result holds a non-finite number (NaN or infinity), which "
                                 f"JSON cannot carry: {_nonfinite_field(row)}; check the model's "
                                 f"weights") from None


def _nonfinite_field(value: Any, where: str = "row") -> str:
    import math

    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} = {value}"
    items = value.items() if isinstance(value, dict) else \
        enumerate(value) if isinstance(value, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite_field(v, f"{where}[{k!r}]")
        if found:
            return found
    return ""
