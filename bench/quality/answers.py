"""Answer equivalence for the quality bench: one function, `equivalent`, deciding whether a
generated text's boxed answer equals the gold answer with math-verify (the field's standard
answer-equivalence library: ``\\boxed{+6}``, ``\\boxed{006}``, ``\\boxed{12/2}`` all equal 6).

A task's own regex parser is kept only as a cross-check: when one is passed, its verdict
(``own_parser(text) == gold``) is compared with math-verify's and every disagreement is counted in
a process-wide tally (`cross_check`, `reset_cross_check`) that the reports print.

Extraction is LaTeX only, boxed answers first and no anchor-less fallback: the tasks' answer
format is ``\\boxed{N}``, so a text without a box is wrong (math-verify's default would take a
bare trailing number). Two boxes with different values are a set to math-verify, never equal to
one integer (the own parser takes the last box: a counted disagreement). math-verify's own
timeouts are off (they are signal alarms: main thread only, and no signal interrupts sympy's one
big-integer call); a text with ``^``, ``**`` or ``!`` is judged in a child process with a time limit
instead.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

# Disagreement examples kept in the tally (the count itself is exact).
_KEEP_EXAMPLES = 20


class _Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.checked = 0
        self.disagreements = 0
        self.examples: list[dict[str, Any]] = []

    def add(self, text: str, gold: Any, math_verify: bool, own: bool) -> None:
        with self.lock:
            self.checked += 1
            if math_verify != own:
                self.disagreements += 1
                if len(self.examples) < _KEEP_EXAMPLES:
                    self.examples.append({"text": text, "gold": gold, "math_verify": math_verify,
                                          "own_parser": own})


_TALLY = _Tally()


@lru_cache(maxsize=1)
def _config():
    # Imported here: math-verify brings in sympy (about a second), which users of the tasks'
    # generators alone never need.
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]


@lru_cache(maxsize=4096)
def _parse_gold(gold: str):
    from math_verify import parse  # why local: see _config

    # Timeouts off: math-verify's are signal alarms (main thread only); the texts are short.
    return parse(f"${gold}$", parsing_timeout=None)


def math_verify_equal(text: str, gold: int | str) -> bool:
    """math-verify's verdict alone: the boxed answer of ``text`` equals ``gold``. A text with an
    operator whose evaluation has no bound (``^``, ``**``, ``!``: sympy evaluates ``9^{9^{9^9}}``
    in one uninterruptible call) is judged in a child process given ``SLOW_CHECK_SECONDS``; past
    that it is wrong, with a warning."""
    if isinstance(gold, bool) or not isinstance(gold, (int, str)):
        raise TypeError(f"gold must be an int or a str, got {type(gold).__name__} {gold!r}")
    if _UNBOUNDED.search(text):
        return _equal_in_child(text, str(gold))
    return _equal(text, str(gold))


def _equal(text: str, gold: str) -> bool:
    from math_verify import parse, verify  # why local: see _config

    pred = parse(text, extraction_config=_config(), parsing_timeout=None)
    if not pred:
        return False
    return bool(verify(_parse_gold(gold), pred, timeout_seconds=None))


_UNBOUNDED = re.compile(r"\^|\*\*|!")
SLOW_CHECK_SECONDS = 10.0


def _equal_in_child(text: str, gold: str) -> bool:
    code = ("import json, sys; from bench.quality.answers import _equal; "
            "a = json.load(sys.stdin); print(int(_equal(a['text'], a['gold'])))")
    root = Path(__file__).resolve().parents[2]  # the repository: the child imports this module
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    try:
        out = subprocess.run([sys.executable, "-c", code], input=json.dumps({"text": text, "gold": gold}),
                             capture_output=True, text=True, timeout=SLOW_CHECK_SECONDS, env=env,
                             check=True)
    except subprocess.TimeoutExpired:
        log.warning("math-verify took over %.0f s on %r (gold %s): judged wrong",
                    SLOW_CHECK_SECONDS, text[:80], gold)
        return False
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"math-verify's child process failed on {text[:80]!r}: "
                           f"{e.stderr.strip()[-400:]}") from e
    return out.stdout.strip().splitlines()[-1] == "1"


def equivalent(text: str, gold: int | str, *,
               own_parser: Callable[[str], Any] | None = None) -> bool:
    """Whether ``text``'s boxed answer equals ``gold`` (math-verify decides). With ``own_parser``
    (a task's ``extract_answer``), its verdict is compared and a disagreement counted."""
    verdict = math_verify_equal(text, gold)
    if own_parser is not None:
        _TALLY.add(text, gold, verdict, own_parser(text) == gold)
    return verdict


def cross_check() -> dict[str, Any]:
    """The tally since the last reset: ``checked``, ``disagreements`` and up to 20 examples
    (``text``, ``gold``, ``math_verify``, ``own_parser`` verdicts)."""
    with _TALLY.lock:
        return {"checked": _TALLY.checked, "disagreements": _TALLY.disagreements,
                "examples": list(_TALLY.examples)}


def reset_cross_check() -> None:
    with _TALLY.lock:
        _TALLY.reset()
