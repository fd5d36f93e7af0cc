"""What every command line of the project shares: user errors as one line, ``--debug``, help text
that shows defaults, and the ``--device`` check.

``run_cli(main, argv)`` runs a CLI's ``main``: a user error (``ValueError`` and its subclasses such
as ``DataError``, ``TypeError``, ``OSError`` such as a missing file, a corrupt checkpoint reported
as ``ValueError``, a non-finite loss) becomes ``error: <message>`` on stderr and exit code 2; an
interrupt (Ctrl-C / SIGINT / SIGTERM) becomes exit code 130 with its message; SIGINT counts even
when the process inherited it ignored or blocked (a shell's background job does), since it is how
a time limit cuts a run (``timeout -s INT`` in bench/device_check.sh). ``--debug`` on the command
line or ``MAHALO_DEBUG=1`` re-raises instead, so the traceback shows. Anything else (a bug) always
shows its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any, Callable, Sequence

import torch

# Exceptions that describe bad input, not a bug in the program.
USER_ERRORS = (ValueError, TypeError, OSError, FloatingPointError)
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A run stopped on purpose by SIGINT/SIGTERM; the message says what was kept."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter plus ``(default: X)`` on every option whose help does not already
    name its default (flags, ``None`` defaults and suppressed ones are left alone)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or not action.option_strings or d is None or d is True
                or d is False or d is argparse.SUPPRESS or d == []):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (or set MAHALO_DEBUG=1)")


def debug_enabled(argv: Sequence[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("MAHALO_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (a missing file's OSError keeps its path)."""
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """``main(argv)`` with the shared error policy (module docstring); returns the exit code."""
    debug = debug_enabled(argv)
    previous = _sigterm_as_interrupt()
    previous_int = _take_sigint()
    try:
        return int(main(argv) or 0)
    except Interrupted as e:
        print(one_line(e), file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)


def _take_sigint():
    """SIGINT raises KeyboardInterrupt even if this process inherited it ignored or blocked: both
    survive ``exec``, so a CLI started as a shell's background job, or by a thread that blocks
    it, would run past the ``timeout -s INT`` meant to cut it and lose the report of what it did.
    Returns ``SIG_IGN`` when it was ignored (`run_cli` restores it), else None."""
    previous = None
    try:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            previous = signal.SIG_IGN
            log.warning("SIGINT was ignored in this process (inherited); it interrupts the run")
    except ValueError:  # not the main thread: dispositions cannot be set here
        return None
    # after the handler, so that a SIGINT already pending is delivered to it
    if signal.SIGINT in signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}):
        log.warning("SIGINT was blocked in this process (inherited); it interrupts the run")
    return previous


def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does (trainers install their own handler for
    a graceful stop). Returns the previous handler, or None off the main thread."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test runner thread)
        return None


def resolve_device(name: str | None) -> torch.device:
    """``--device`` as a torch device: None is cuda when available, else cpu. ``cuda`` on a torch
    without CUDA, or with no visible device, is a ValueError saying which."""
    if name is None or name == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"--device {name}: this torch ({torch.__version__}) was built without "
                             f"CUDA; use --device cpu or install a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device (check the driver and "
                             f"CUDA_VISIBLE_DEVICES); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) "
                             f"visible")
    return device


LITERAL = "literal:"  # --boundary literal:WORD ends steps at WORD itself, not a preset
DEFAULT_BOUNDARY = "\n\n"
BOUNDARY_HELP = ("where a step ends: a string such as '\\n\\n' (escapes decoded), a preset: "
                 "math, sentence, paragraph, turn, or literal:TEXT for a plain word (repeatable; "
                 "default '\\n\\n')")


def unescape(text: str) -> str:
    r"""Shell-friendly escapes: '\n\n' on the command line means two newlines."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def add_boundary_arg(parser: argparse.ArgumentParser) -> None:
    """``--boundary``, the same in every CLI that splits text into steps (engine and labels);
    `parse_boundaries` turns its values into what `mahalo_engine.text.split_steps` and
    `SearchConfig.boundary` take."""
    parser.add_argument("--boundary", action="append", type=unescape, default=None,
                        help=BOUNDARY_HELP)


def parse_boundaries(values: Sequence[str] | None) -> Any:
    """``--boundary`` values -> a boundary spec (the default ``"\n\n"`` when none is given):
    presets stay names, ``literal:TEXT`` becomes ``Boundary(strings=(TEXT,))``, other strings
    are literal. ValueError for an empty string or a plain word that names no preset."""
    if not values:
        return DEFAULT_BOUNDARY
    # Imported here: Boundary brings in Triton (via triton_kernels), which no --help needs.
    from mahalo_engine.boundary import PRESETS, Boundary

    out: list[Any] = []
    for b in values:
        if b.startswith(LITERAL):
            if not b[len(LITERAL):]:
                raise ValueError(f"--boundary {LITERAL}: the literal text is empty")
            out.append(Boundary(strings=(b[len(LITERAL):],)))
            continue
        if not b:
            raise ValueError("--boundary: the boundary string is empty")
        if b.isidentifier() and b not in PRESETS:
            raise ValueError(f"--boundary {b!r}: a plain word names a preset, one of "
                             f"{', '.join(sorted(PRESETS))}; to end steps at the literal text, "
                             f"pass --boundary {LITERAL}{b}")
        out.append(b)
    return out
