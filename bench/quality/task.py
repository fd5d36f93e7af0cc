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

import random

# STEP_SEP, STYLES, Problem, problem_hash and extract_answer are part of a task module's interface
# (re-exported).
from bench.quality.problem_kit import (STEP_SEP, STYLES, Problem, brevity_score,  # noqa: F401
                                       draw_split, extract_answer, hash_split, problem_hash)

SPLITS = ("train", "pref", "prm", "val", "test")
# Share of the hash space per split: most problems train the SFT model; the rest are small pools.
_SPLIT_SHARE = {"train": 0.70, "pref": 0.08, "prm": 0.08, "val": 0.06, "test": 0.08}

_NAMES = ("Ana", "Ben", "Cai", "Dev", "Eli", "Fay", "Gus", "Ida", "Jon", "Kim", "Leo", "Mia",
          "Ned", "Oli", "Pia", "Raj", "Sam", "Tia", "Uma", "Zoe")
_ITEMS = ("apples", "coins", "books", "shells", "stamps", "cards", "pens", "eggs", "rocks", "cups")
_GAIN = ("gets {b} more", "finds {b} more", "buys {b} more", "is given {b} more")
_LOSS = ("gives away {b}", "loses {b}", "sells {b}", "uses {b}")


def split_of(question: str) -> str:
    """The split a question belongs to: a fixed function of its hash."""
    return hash_split(question, SPLITS, _SPLIT_SHARE)


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
    return draw_split(split, n, seed, SPLITS, random_problem, split_of)


def verify(text: str, gold: int) -> bool:
    """acc: the last boxed integer equals the gold answer (a missing box is wrong)."""
    return extract_answer(text) == gold


# The judge's length scale: a 10-character answer scores 1, one of 80 characters or more scores 0.
STYLE_BEST_CHARS = 10
STYLE_WORST_CHARS = 80


def style_score(text: str, *, noise: float = 0.0, noise_seed: int = 0) -> float:
    """style in [0, 1]: brevity of the answer, linear in its length in characters between
    ``STYLE_BEST_CHARS`` (1.0) and ``STYLE_WORST_CHARS`` (0.0); a text without a boxed answer
    scores 0; ``noise``: the judge's inconsistency (`bench.quality.problem_kit.brevity_score`)."""
    return brevity_score(text, extract_answer(text) is not None, STYLE_BEST_CHARS,
                         STYLE_WORST_CHARS, noise=noise, noise_seed=noise_seed)
