"""What every quality-bench task shares: the `Problem` record and its worked solution, disjoint hash
splits, drawing distinct problems of one split, the boxed-answer parser (``extract_answer``) and
the brevity style judge. A task module (`bench.quality.task`, `bench.quality.chain_task`) supplies
its split shares, its problem generator and its judge's length scale."""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

P = TypeVar("P")

STYLES = ("worked", "terse")
STEP_SEP = "\n\n"


def apply(value: int, op: str, b: int) -> int:
    """``value op b`` for the tasks' operators."""
    if op == "+":
        return value + b
    if op == "-":
        return value - b
    if op == "*":
        return value * b
    raise ValueError(f"op must be '+', '-' or '*', got {op!r}")


@dataclass(frozen=True)
class Problem:
    """One word problem: ``question`` (the prompt), a ``start`` amount, the ``ops`` as (operator,
    operand) applied in turn, and the ``answer``."""

    question: str
    start: int
    ops: tuple[tuple[str, int], ...]
    answer: int

    @property
    def problem_id(self) -> str:
        return problem_hash(self.question)[:12]

    def solution(self, style: str) -> str:
        """The reference solution in ``style``: ``worked`` (one equation per step, steps
        separated by ``"\\n\\n"``, last ``\\boxed{N}``) or ``terse`` (the box alone)."""
        if style == "terse":
            return f"\\boxed{{{self.answer}}}"
        if style != "worked":
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        steps, value = [], self.start
        for op, b in self.ops:
            new = apply(value, op, b)
            steps.append(f"{value} {op} {b} = {new}")
            value = new
        return STEP_SEP.join(steps + [f"\\boxed{{{value}}}"])


def problem_hash(question: str) -> str:
    return hashlib.sha256(question.encode("utf-8")).hexdigest()


def hash_split(question: str, splits: Sequence[str], share: Mapping[str, float]) -> str:
    """The split a question belongs to: a fixed function of its hash (``share`` per split, in
    the order of ``splits``; the last split takes any rounding remainder)."""
    u = int(problem_hash(question)[:12], 16) / 16 ** 12
    edge = 0.0
    for name in splits:
        edge += share[name]
        if u < edge:
            return name
    return splits[-1]


def draw_split(split: str, n: int, seed: int, splits: Sequence[str],
               draw: Callable[[random.Random], P], split_of: Callable[[str], str]) -> list[P]:
    """``n`` problems (``draw(rng)``, each with a ``question``) of ``split`` with distinct questions,
    drawn deterministically from ``seed`` by rejection, so no question lands in two splits."""
    if split not in splits:
        raise ValueError(f"split must be one of {tuple(splits)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{seed}:{split}")
    out: dict[str, P] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise ValueError(f"could not draw {n} distinct {split!r} problems (the problem space "
                             f"is too small for this count)")
        p = draw(rng)
        if p.question not in out and split_of(p.question) == split:
            out[p.question] = p
    return list(out.values())


_BOXED = re.compile(r"\\boxed\{\s*(-?\d+)\s*\}")


def extract_answer(text: str) -> int | None:
    """The integer in the last ``\\boxed{...}`` of ``text``; None when there is none (a miss). A
    task's own parser: the short task's ``verify`` itself, the long task's counted cross-check."""
    found = _BOXED.findall(text)
    return int(found[-1]) if found else None


def brevity_score(text: str, answered: bool, best_chars: int, worst_chars: int, *,
                  noise: float = 0.0, noise_seed: int = 0) -> float:
    """style in [0, 1]: brevity of the answer, linear in its length in characters between
    ``best_chars`` (1.0) and ``worst_chars`` (0.0); a text without an answer (``answered``
    False) scores 0 (rambling that never answers is not "concise").

    ``noise > 0`` imitates an LLM judge's inconsistency: Gaussian noise of that std, a deterministic
    function of (text, noise_seed), added before clipping to [0, 1].
    """
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")
    if not answered:
        base = 0.0
    else:
        n = len(text.strip())
        base = (worst_chars - n) / (worst_chars - best_chars)
    if noise > 0:
        h = int(hashlib.sha256(f"{noise_seed}\0{text}".encode()).hexdigest()[:16], 16)
        base += noise * random.Random(h).gauss(0.0, 1.0)
    return min(1.0, max(0.0, base))
