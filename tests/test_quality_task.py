"""The quality bench's task: generated problems (answers recomputed from the question text alone),
disjoint splits, the verifier and the style judge on crafted texts."""
import re

import pytest

from bench.quality.task import (SPLITS, STYLE_BEST_CHARS, STYLE_WORST_CHARS, extract_answer,
                                make_split, split_of, style_score, verify)

_GAIN = ("gets", "finds", "buys", "is given")
_LOSS = ("gives away", "loses", "sells", "uses")


def _answer_from_text(question: str) -> int:
    """An independent reading of the story: the start amount, then each sentence's verb and number."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(re.search(r"has (\d+) ", sentences[0]).group(1))
    for s in sentences[1:]:
        if s.startswith("How many"):
            break
        n = int(re.search(r"(\d+)", s).group(1))
        if any(f" {v} " in f" {s} " for v in _GAIN):
            value += n
        elif any(f" {v} " in f" {s} " for v in _LOSS):
            value -= n
        else:
            raise AssertionError(f"unparsed sentence {s!r}")
    return value


def test_answers_are_right_and_solutions_consistent():
    problems = make_split("train", 300, seed=7)
    assert len({p.question for p in problems}) == 300
    for p in problems:
        assert p.answer == _answer_from_text(p.question)
        assert 2 <= len(p.ops) <= 3 and p.answer >= 0
        worked = p.solution("worked")
        steps = worked.split("\n\n")
        assert len(steps) == len(p.ops) + 1 and steps[-1] == f"\\boxed{{{p.answer}}}"
        for s in steps[:-1]:  # every equation is true
            a, op, b, _, c = s.split()
            assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c)
        assert p.solution("terse") == f"\\boxed{{{p.answer}}}"
        assert verify(worked, p.answer) and verify(p.solution("terse"), p.answer)
    with pytest.raises(ValueError, match="style"):
        problems[0].solution("chatty")


def test_splits_are_disjoint_and_deterministic():
    sets = {s: {p.question for p in make_split(s, 150, seed=3)} for s in SPLITS}
    for a in SPLITS:
        assert len(sets[a]) == 150
        assert all(split_of(q) == a for q in sets[a])
        for b in SPLITS:
            if a < b:
                assert not sets[a] & sets[b], (a, b)
    assert [p.question for p in make_split("val", 20, seed=3)] == \
        [p.question for p in make_split("val", 20, seed=3)]
    assert {p.question for p in make_split("val", 20, seed=4)} != \
        {p.question for p in make_split("val", 20, seed=3)}


def test_verifier_on_crafted_texts():
    assert extract_answer("3 + 4 = 7\n\n\\boxed{7}") == 7
    assert extract_answer("\\boxed{5} then \\boxed{ 12 }") == 12  # the last box counts
    assert extract_answer("\\boxed{-3}") == -3
    assert extract_answer("the answer is 7") is None
    assert extract_answer("\\boxed{7") is None
    assert extract_answer("\\boxed{x}") is None
    assert verify("\\boxed{7}\n\n", 7)
    assert not verify("\\boxed{8}", 7)
    assert not verify("7", 7)  # a missing box is wrong


def test_style_judge_on_crafted_texts():
    span = STYLE_WORST_CHARS - STYLE_BEST_CHARS
    assert style_score("\\boxed{12}") == 1.0  # 10 characters
    worked = "3 + 4 = 7\n\n7 - 2 = 5\n\n\\boxed{5}"
    assert style_score(worked) == pytest.approx((STYLE_WORST_CHARS - len(worked)) / span)
    assert style_score(worked + "\n\n") == style_score(worked)  # surrounding whitespace ignored
    assert style_score("x" * 200 + "\\boxed{1}") == 0.0
    assert style_score("7") == 0.0  # no boxed answer
    assert style_score("\\boxed{5}") > style_score(worked) > 0  # terse beats worked
    noisy = [style_score(worked, noise=0.1, noise_seed=s) for s in range(20)]
    assert len(set(noisy)) > 10 and all(0 <= v <= 1 for v in noisy)
    assert abs(sum(noisy) / 20 - style_score(worked)) < 0.1
    assert style_score(worked, noise=0.1, noise_seed=3) == style_score(worked, noise=0.1, noise_seed=3)
    with pytest.raises(ValueError, match="noise"):
        style_score(worked, noise=-1)
