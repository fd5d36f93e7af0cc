"""The quality bench's long task (`bench.quality.chain_task`): answers recomputed from the question
text alone, worked solutions of 5-8 true equations, disjoint splits, the judge's scale; and the
task selection (`QualityConfig.task`) leaving the short task's cache key as it was."""
import re

import pytest

from bench.quality.chain_task import (MAX_VALUE, SPLITS, STEP_SEP, STYLE_BEST_CHARS,
                                      STYLE_WORST_CHARS, make_split, split_of, style_score, verify)

_GAIN = ("gets", "finds", "buys", "is given")
_LOSS = ("gives away", "loses", "sells", "uses")


def _answer_from_text(question: str) -> tuple[int, int]:
    """An independent reading of the story: (answer, number of changes)."""
    m = re.fullmatch(r"(\w+) has (\d+) (\w+)\. Then \1 (.+)\. How many \3 now\?", question)
    assert m, question
    value = int(m.group(2))
    clauses = [c for part in m.group(4).split(", ") for c in part.split(" and ")]
    for c in clauses:
        if c == "doubles them":
            value *= 2
        elif c == "triples them":
            value *= 3
        else:
            verb, n = re.fullmatch(r"(.+?) (\d+)(?: more)?", c).groups()
            assert verb in _GAIN + _LOSS, c
            value += int(n) if verb in _GAIN else -int(n)
        assert 0 <= value <= MAX_VALUE
    return value, len(clauses)


def test_answers_are_right_and_worked_solutions_take_5_to_8_steps():
    problems = make_split("train", 400, seed=7)
    assert len({p.question for p in problems}) == 400
    counts = set()
    for p in problems:
        answer, changes = _answer_from_text(p.question)
        assert p.answer == answer and len(p.ops) == changes
        steps = p.solution("worked").split(STEP_SEP)
        assert 5 <= len(steps) <= 8 and steps[-1] == f"\\boxed{{{answer}}}"
        counts.add(len(steps))
        value = int(steps[0].split()[0])
        for s in steps[:-1]:  # a chain of true equations, each starting where the last ended
            a, op, b, eq, c = s.split()
            assert eq == "=" and int(a) == value
            value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
            assert value == int(c)
        assert value == answer
        assert verify(p.solution("worked"), answer) and verify(p.solution("terse"), answer)
    assert counts == {5, 6, 7, 8}
    ops = {op for p in problems for op, _ in p.ops}
    assert ops == {"+", "-", "*"}  # mixed operators
    with pytest.raises(ValueError, match="style"):
        problems[0].solution("chatty")


def test_splits_are_disjoint_and_deterministic():
    assert "prmq" in SPLITS and "test" in SPLITS
    sets = {s: {p.question for p in make_split(s, 120, seed=3)} for s in SPLITS}
    for a in SPLITS:
        assert len(sets[a]) == 120 and all(split_of(q) == a for q in sets[a])
        for b in SPLITS:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    assert [p.question for p in make_split("prmq", 20, seed=3)] == \
        [p.question for p in make_split("prmq", 20, seed=3)]
    with pytest.raises(ValueError, match="split must be one of"):
        make_split("dev", 3, seed=0)


def test_style_judge_pulls_against_worked_answers():
    p = make_split("val", 1, seed=0)[0]
    worked, terse = p.solution("worked"), p.solution("terse")
    span = STYLE_WORST_CHARS - STYLE_BEST_CHARS
    assert style_score(worked) == pytest.approx((STYLE_WORST_CHARS - len(worked)) / span)
    assert style_score(terse) == 1.0 > style_score(worked) > 0.0
    assert style_score(worked.replace("\\boxed", "")) == 0.0  # no answer


def test_task_selection_and_the_short_cache_key():
    from bench.quality import chain_task, task
    from bench.quality.settings import QualityConfig, preset, task_module

    # the short task's key is the one its cached artefacts were written under (before tasks)
    assert preset("full").train_key() == preset("quick").train_key() == "c997396410f9fbab"
    assert task_module(preset("quick")) is task and task_module(preset("long")) is chain_task
    assert preset("long").train_key() != preset("full").train_key()
    with pytest.raises(ValueError, match="task must be one of"):
        QualityConfig(task="medium")
    with pytest.raises(ValueError, match="sft_init must be"):
        QualityConfig(sft_init="huge")
