"""Answer equivalence (`bench.quality.answers`): math-verify's verdicts and the own regex
parser's on a table of hand-written answer strings, each verdict written by hand, and the
disagreement tally the report prints."""
import pytest

from bench.quality import answers
from bench.quality.chain_task import extract_answer, verify

# (text, gold, math-verify's verdict, the own parser's verdict), all written by hand
TABLE = [
    ("\\boxed{6}", 6, True, True),
    ("\\boxed{ 6 }", 6, True, True),  # spaces inside the box
    ("2 + 4 = 6\n\n\\boxed{6}", 6, True, True),
    ("2 + 4 = 6\n\n\\boxed{6}<|endoftext|>", 6, True, True),  # the EOS text after the box
    ("\\boxed{+6}", 6, True, False),  # a leading plus: the own regex reads no number
    ("\\boxed{006}", 6, True, True),  # leading zeros
    ("\\boxed{12/2}", 6, True, False),  # a fraction equal to the gold
    ("\\boxed{6.0}", 6, True, False),
    ("\\boxed{7}", 6, False, False),
    ("\\boxed{-6}", 6, False, False),
    ("\\boxed{-6}", -6, True, True),
    ("2 + 4 = 6", 6, False, False),  # no box: wrong for both (the tasks' answer format)
    ("6", 6, False, False),
    ("\\boxed{6", 6, False, False),  # an unclosed box
    ("\\boxed{x}", 6, False, False),
    ("\\boxed{}", 6, False, False),
    ("\\boxed{3}\n\n\\boxed{6}", 6, False, True),  # two boxes: a set to math-verify, last to ours
    ("\\boxed{6}\n\n\\boxed{3}", 6, False, False),
    ("\\boxed{6} \\boxed{6}", 6, True, True),  # the same answer twice
]


@pytest.mark.parametrize("text,gold,mv,own", TABLE)
def test_verdicts_against_the_hand_table(text, gold, mv, own):
    assert answers.math_verify_equal(text, gold) is mv
    assert (extract_answer(text) == gold) is own
    assert verify(text, gold) is mv  # the long task's verifier is math-verify's verdict


def test_disagreements_are_counted():
    answers.reset_cross_check()
    for text, gold, _, _ in TABLE:
        answers.equivalent(text, gold, own_parser=extract_answer)
    tally = answers.cross_check()
    expected = sum(mv != own for _, _, mv, own in TABLE)  # +6, 12/2, 6.0, two boxes
    assert expected == 4
    assert tally["checked"] == len(TABLE) and tally["disagreements"] == expected
    assert {(e["text"], e["gold"]) for e in tally["examples"]} == \
        {(t, g) for t, g, mv, own in TABLE if mv != own}
    answers.equivalent("\\boxed{+6}", 6)  # without an own parser: nothing to cross-check
    assert answers.cross_check()["checked"] == len(TABLE)
    answers.reset_cross_check()
    assert answers.cross_check() == {"checked": 0, "disagreements": 0, "examples": []}


def test_bad_gold_is_one_clear_error():
    with pytest.raises(TypeError, match="gold must be an int or a str, got float"):
        answers.equivalent("\\boxed{6}", 6.0)
    with pytest.raises(TypeError, match="got bool"):
        answers.equivalent("\\boxed{1}", True)


def test_unbounded_operators_are_judged_in_a_child_with_a_time_limit(monkeypatch, caplog):
    # sympy evaluates a power tower in one call no signal interrupts: the check must not hang
    monkeypatch.setattr(answers, "SLOW_CHECK_SECONDS", 3.0)
    assert answers.math_verify_equal("\\boxed{9^{9^{9^{9}}}}", 6) is False
    assert "judged wrong" in caplog.text
    assert answers.math_verify_equal("\\boxed{2^3}", 8) is True  # bounded: the child's verdict
    assert answers.math_verify_equal("\\boxed{3!}", 7) is False
