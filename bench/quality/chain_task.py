"""The quality bench's long task: arithmetic chains whose worked solutions take 5–8 steps, so a
policy makes per-step errors that step guidance can catch (the short task, `bench.quality.task`,
is answered in 1–4 steps). Same names and semantics as `bench.quality.task`.

A problem is a start amount (2–20) followed by 4–7 changes: ``+ b`` / ``- b`` (b in 1..9) and
``* 2`` / ``* 3`` ("doubles them", "triples them"), told as a story of one sentence of changes; amounts stay in 0..``MAX_VALUE``
(a step that would leave the range is not drawn). The gold answer is exact integer arithmetic.
Two solution styles:

- ``worked``: one equation per step (``"7 * 3 = 21\\n\\n21 - 4 = 17\\n\\n...\\n\\n\\boxed{N}"``),
  4–7 equations plus the box: 5–8 steps;
- ``terse``: the answer alone (``"\\boxed{N}"``).

``verify`` decides with math-verify (`bench.quality.answers`), this module's regex parser
(``extract_answer``) being the counted cross-check. The style judge rewards brevity on a longer
scale than the short task's (a worked answer here is 60–110 characters), so the two objectives pull
apart: a terse answer scores high on style and is rarely right.

Splits (``train``, ``pref``, ``prm``, ``prmq``, ``val``, ``test``) are disjoint by construction
(a question's split is a function of its hash). ``prmq`` holds the problems whose rollouts measure
the PRM's quality (`bench.quality.prm_quality`): the PRM never trains on them.
"""
from __future__ import annotations

import random

from bench.quality.answers import equivalent
# STEP_SEP, STYLES, Problem, problem_hash and extract_answer (the task's own parser, the counted
# cross-check of ``verify``) are part of a task module's interface (re-exported).
from bench.quality.problem_kit import (STEP_SEP, STYLES, Problem, apply,  # noqa: F401
                                       brevity_score, draw_split, extract_answer, hash_split,
                                       problem_hash)
from bench.quality.task import _GAIN, _ITEMS, _LOSS, _NAMES

SPLITS = ("train", "pref", "prm", "prmq", "val", "test")
_SPLIT_SHARE = {"train": 0.66, "pref": 0.08, "prm": 0.08, "prmq": 0.04, "val": 0.06, "test": 0.08}
MIN_OPS, MAX_OPS = 4, 7
MAX_VALUE = 60  # small amounts: the tiny policy's arithmetic is the per-step error source
_TIMES = {2: "doubles them", 3: "triples them"}
_P_TIMES = 0.25  # chance of a multiplication when it stays in range


def split_of(question: str) -> str:
    """The split a question belongs to: a fixed function of its hash."""
    return hash_split(question, SPLITS, _SPLIT_SHARE)


def random_problem(rng: random.Random) -> Problem:
    """4 to 7 changes to a start amount in 2..20; amounts stay within 0..MAX_VALUE."""
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    value = rng.randint(2, 20)
    start, ops, verbs = value, [], []
    for _ in range(rng.randint(MIN_OPS, MAX_OPS)):
        times = [b for b in _TIMES if value * b <= MAX_VALUE]
        if times and rng.random() < _P_TIMES:
            op, b = "*", rng.choice(times)
            verb = _TIMES[b]
        elif value > 1 and (value + 1 > MAX_VALUE or rng.random() < 0.5):
            op, b = "-", rng.randint(1, min(9, value))
            verb = rng.choice(_LOSS).format(b=b)
        else:
            op, b = "+", rng.randint(1, min(9, MAX_VALUE - value))
            verb = rng.choice(_GAIN).format(b=b)
        value = apply(value, op, b)
        ops.append((op, b))
        verbs.append(verb)
    # One sentence for the changes keeps the prompt short (the tiny policy's context is small).
    question = (f"{name} has {start} {item}. Then {name} {', '.join(verbs[:-1])} and {verbs[-1]}. "
                f"How many {item} now?")
    return Problem(question, start, tuple(ops), value)


def make_split(split: str, n: int, seed: int) -> list[Problem]:
    """``n`` distinct problems of ``split``, drawn deterministically from ``seed``."""
    return draw_split(split, n, seed, SPLITS, random_problem, split_of)


def verify(text: str, gold: int) -> bool:
    """acc: math-verify finds the boxed answer of ``text`` equivalent to ``gold`` (a missing box is
    wrong; `bench.quality.answers.equivalent`, cross-checked against ``extract_answer``)."""
    return equivalent(text, gold, own_parser=extract_answer)


# The judge's length scale: a 10-character answer scores 1, one of 120 characters or more scores 0
# (every worked answer lies in between, shorter chains scoring higher).
STYLE_BEST_CHARS = 10
STYLE_WORST_CHARS = 120


def style_score(text: str, *, noise: float = 0.0, noise_seed: int = 0) -> float:
    """style in [0, 1]: brevity, linear in the length between ``STYLE_BEST_CHARS`` (1.0) and
    ``STYLE_WORST_CHARS`` (0.0); a text without a boxed answer scores 0; ``noise``: the judge's
    inconsistency (`bench.quality.problem_kit.brevity_score`)."""
    return brevity_score(text, extract_answer(text) is not None, STYLE_BEST_CHARS,
                         STYLE_WORST_CHARS, noise=noise, noise_seed=noise_seed)
