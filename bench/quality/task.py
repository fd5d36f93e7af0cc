"""The quality bench's task: generated arithmetic word problems, their verifier (``acc``) and a
rule-based style judge (``style``).

A problem is a start amount (2–20) followed by 2–3 changes (+/−, operands 1–9), asked as a short
story;
the gold answer is exact integer arithmetic. Two solution styles exist, both valid training targets:

- ``worked``: one equation per step (``"5 + 3 = 8\\n\\n8 - 2 = 6\\n\\n\\boxed{6}"``);
- ``terse``: the answer alone (``"\\boxed{6}"``), i.e. the working is skipped.

The judge rewards brevity, so the two objectives pull apart for a small model: terse answers score
high on style but must be computed "in the head" and are less often right.

Splits (``train``, ``pref``, ``prm``, ``val``, ``test``) are disjoint by construction: a problem's
split is a function of a hash of its question text, and problems are drawn by rejection until a split
has the count asked for, so the same question never lands in two splits.
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

SPLITS = ("train", "pref", "prm", "val", "test")
# Share of the hash space per split: most problems train the SFT model; the rest are small pools.
_SPLIT_SHARE = {"train": 0.70, "pref": 0.08, "prm": 0.08, "val": 0.06, "test": 0.08}
STYLES = ("worked", "terse")
STEP_SEP = "\n\n"

_NAMES = ("Ana", "Ben", "Cai", "Dev", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim", "Leo", "Mia",
          "Ned", "Oli", "Pia", "Raj", "Sam", "Tia", "Uma", "Zoe")
_ITEMS = ("apples", "coins", "books", "shells", "stamps", "cards", "pens", "eggs", "rocks", "cups")
_GAIN = ("gets {b} more", "finds {b} more", "buys {b} more", "is given {b} more")
_LOSS = ("gives away {b}", "loses {b}", "sells {b}", "uses {b}")


@dataclass(frozen=True)
class Problem:
    """One word problem: ``question`` (the prompt), the ``ops`` as (sign, operand), ``answer``."""

    question: str
    start: int
    ops: tuple[tuple[str, int], ...]
    answer: int

    @property
    def problem_id(self) -> str:
        return problem_hash(self.question)[:12]

    def solution(self, style: str) -> str:
        """The reference solution in ``style``: steps separated by ``"\\n\\n"``, last ``\\boxed{N}``."""
        if style == "terse":
            return f"\\boxed{{{self.answer}}}"
        if style != "worked":
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        steps, value = [], self.start
        for sign, b in self.ops:
            new = value + b if sign == "+" else value - b
            steps.append(f"{value} {sign} {b} = {new}")
            value = new
        return STEP_SEP.join(steps + [f"\\boxed{{{value}}}"])


def problem_hash(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def split_of(question: str) -> str:
    """The split a question belongs to: a fixed function of its hash."""
    u = int(problem_hash(question)[:12], 16) / 16 ** 12
    edge = 0.0
    for name in SPLITS:
        edge += _SPLIT_SHARE[name]
        if u < edge:
            return name
    return SPLITS[-1]


def random_problem(rng: random.Random) -> Problem:
    """2 or 3 changes (operands 1..9) to a start amount in 2..20; amounts never go below zero."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 20)
    start, ops, sentences = value, [], [f"{name} has {value} {item}."]
    for _ in range(rng.choice((2, 3))):
        sign = "-" if value > 1 and rng.random() < 0.5 else "+"
        b = rng.randint(1, min(9, value)) if sign == "-" else rng.randint(1, 9)
        value = value + b if sign == "+" else value - b
        ops.append((sign, b))
        sentences.append(f"Then {name} " + rng.choice(_GAIN if sign == "+" else _LOSS).format(b=b) + ".")
    sentences.append(f"How many {item} now?")
    return Problem(" ".join(sentences), start, tuple(ops), value)


def make_split(split: str, n: int, seed: int) -> list[Problem]:
    """``n`` distinct problems of ``split``, drawn deterministically from ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}:{split}")
    out: dict[str, Problem] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split!r} problems (the problem space "
                             f"is too small for this count)")
        p = random_problem(rng)
        if p.question not in out and split_of(p.question) == split:
            out[p.question] = p
    return list(out.values())


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def extract_answer(text: str) -> int | None:
    """The integer in the last ``\\boxed{...}`` of ``text``; None when there is none (a miss)."""
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def verify(text: str, gold: int) -> bool:
    """acc: the last boxed integer equals the gold answer (a missing box is wrong)."""
    return extract_answer(text) == gold


# The judge's length scale: a 10-character answer scores 1, one of 80 characters or more scores 0.
STYLE_BEST_CHARS = 10
STYLE_WORST_CHARS = 80


def style_score(text: str, *, noise: float = 0.0, noise_seed: int = 0) -> float:
    """style in [0, 1]: brevity of the answer, linear in its length in characters between
    ``STYLE_BEST_CHARS`` (1.0) and ``STYLE_WORST_CHARS`` (0.0); a text without a boxed answer
    scores 0 (rambling that never answers is not "concise").

    ``noise > 0`` imitates an LLM judge's inconsistency: Gaussian noise of that std, a deterministic
    function of (text, noise_seed), added before clipping to [0, 1].
    """
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    if extract_answer(text) is None:
        base = 0.0
    else:
        n = len(text.strip())
        base = (STYLE_WORST_CHARS - n) / (STYLE_WORST_CHARS - STYLE_BEST_CHARS)
    if noise > 0:
        h = int(hashlib.sha256(f"{noise_seed}\0{text}".encode()).hexdigest()[:16], 16)
        base += noise * random.Random(h).gauss(0.0, 1.0)
    return min(1.0, max(0.0, base))
