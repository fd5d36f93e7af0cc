"""PRM label builders: hindsight targets, Monte-Carlo values, judge labels, BT prefix pairs, CLI."""
import json

import pytest

from training import hindsight_targets
from mahalo_engine.text import split_steps
from training.labels import (bt_prefix_pairs, judge_prefix_labels, judge_vote_labels, main,
                             monte_carlo_values)


def test_hindsight_targets_hand_values():
    # r̃_t = r_t + γ^(n-t) z, n = 3
    assert hindsight_targets([0.0, 0.5, 0.0], 1.0, 0.9) == pytest.approx([0.81, 0.5 + 0.9, 1.0])
    assert hindsight_targets([0.1, 0.2], 0.0, 0.5) == pytest.approx([0.1, 0.2])
    assert hindsight_targets([], 1.0, 0.9) == []
    with pytest.raises(ValueError, match="gamma"):
        hindsight_targets([0.0], 1.0, 1.5)
    with pytest.raises(ValueError, match="finite"):
        hindsight_targets([float("nan")], 1.0, 0.9)


def test_monte_carlo_values_pool_only_rollouts_sampled_through_a_prefix():
    g = 0.5
    rollouts = [
        # the trajectory itself (given, prefix_len = n): only its full prefix counts
        {"prompt": "p", "steps": ["a", "b", "c"], "step_rewards": [0, 0, 0], "final_reward": 1.0,
         "prefix_len": 3},
        # two rollouts branched after "a"
        {"prompt": "p", "steps": ["a", "x"], "step_rewards": [0, 0], "final_reward": 0.0, "prefix_len": 1},
        {"prompt": "p", "steps": ["a", "b", "y"], "step_rewards": [0, 0, 0], "final_reward": 1.0,
         "prefix_len": 1},
        # one rollout branched after "a","b"
        {"prompt": "p", "steps": ["a", "b", "z"], "step_rewards": [0, 0, 0], "final_reward": 0.0,
         "prefix_len": 2},
    ]
    rows = {tuple(r["completions"]): r["labels"] for r in monte_carlo_values(rollouts, g)}
    # V(a): rollouts sampled from prefix len <= 1 through "a": x (0) and y (relabelled g^2 * 1)
    v_a = (0.0 + g ** 2) / 2
    # V(a,b): y (g * 1) and z (0); the given trajectory (prefix_len 3) does not count here
    v_ab = (g + 0.0) / 2
    assert rows[("a", "b", "c")] == pytest.approx([v_a, v_ab, 1.0])
    assert rows[("a", "x")] == pytest.approx([v_a, 0.0])
    assert rows[("a", "b", "z")] == pytest.approx([v_a, v_ab, 0.0])


def test_judge_labels_case_a_and_b():
    judge = lambda prompt, steps: float("good" in steps[-1])  # noqa: E731
    steps = ["s1", "s2"]
    conts = [[["good"], ["bad"], ["good"], ["bad"]], [["good"]]]
    assert judge_vote_labels("q", steps, conts, judge) == [0.5, 1.0]
    assert judge_prefix_labels("q", ["good", "meh", "good!"], judge) == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="one list of rollouts per step"):
        judge_vote_labels("q", steps, conts[:1], judge)


def test_split_steps_keeps_boundaries_and_bt_pairs():
    text = "First.\n\nSecond.\n\nThird"
    assert split_steps(text, "\n\n") == ["First.\n\n", "Second.\n\n", "Third"]
    assert "".join(split_steps(text, ["\n\n", "."])) == text
    pairs = bt_prefix_pairs("q", "A.\n\nB.\n\nC.", "X.\n\nY.", "\n\n")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [
        (["A.\n\n"], ["X.\n\n"]),
        (["A.\n\n", "B.\n\n"], ["X.\n\n", "Y."]),
        (["A.\n\n", "B.\n\n", "C."], ["X.\n\n", "Y."]),
    ]


def test_labels_cli_mc_and_bt_pairs(tmp_path):
    roll = tmp_path / "r.jsonl"
    roll.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "p", "steps": ["a", "b"], "step_rewards": [0, 0], "final_reward": 1.0},
        {"prompt": "p", "steps": ["a", "c"], "step_rewards": [0, 0], "final_reward": 0.0},
    ]) + "\n")
    out = tmp_path / "steps.jsonl"
    assert main(["mc", "--rollouts", str(roll), "--gamma", "0.9", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["labels"] == pytest.approx([0.45, 1.0])
    assert rows[1]["labels"] == pytest.approx([0.45, 0.0])

    prefs = tmp_path / "p.jsonl"
    prefs.write_text(json.dumps({"prompt": "q", "chosen": "A.\n\nB.", "rejected": "X."}) + "\n")
    out = tmp_path / "pairs.jsonl"
    assert main(["bt-pairs", "--data", str(prefs), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "q", "chosen": ["A.\n\n"], "rejected": ["X."]},
                    {"prompt": "q", "chosen": ["A.\n\n", "B."], "rejected": ["X."]}]


def test_rollouts_and_judge_votes_sampled_by_the_engine(tmp_path, monkeypatch):
    from mahalo_engine.tiny import tiny_checkpoint

    (tmp_path / "rules.py").write_text(
        "def verifier(prompt, steps):\n    return float(steps[-1] == 'It is 4.')\n"
        "def judge(prompt, steps):\n    return float(len(steps) == 2)\n")
    monkeypatch.chdir(tmp_path)
    traj = tmp_path / "traj.jsonl"
    traj.write_text(json.dumps({"prompt": "Question: 2 + 2 = ?", "steps": ["We add.\n\n", "It is 4."]}) + "\n")
    policy = str(tiny_checkpoint("qwen2"))
    common = ["--policy", policy, "--data", str(traj), "--m", "3", "--max-new-tokens", "8", "--seed", "1"]
    assert main(["rollouts", *common, "--verifier", "rules:verifier", "--out", "roll.jsonl"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "roll.jsonl").read_text().splitlines()]
    assert len(rows) == 1 + 3  # the trajectory + M rollouts after its one proper prefix
    assert rows[0]["steps"] == ["We add.\n\n", "It is 4."] and rows[0]["prefix_len"] == 2
    assert rows[0]["final_reward"] == 1.0
    for r in rows[1:]:
        assert r["prefix_len"] == 1 and r["steps"][0] == "We add.\n\n"
        assert r["final_reward"] == float(r["steps"][-1] == "It is 4.")
    assert main(["mc", "--rollouts", "roll.jsonl", "--out", "mc.jsonl"]) == 0
    v1 = [json.loads(line) for line in (tmp_path / "mc.jsonl").read_text().splitlines()][0]["labels"]
    expected_v1 = sum(0.9 ** (len(r["steps"]) - 1) * r["final_reward"] for r in rows[1:]) / 3
    assert v1 == pytest.approx([expected_v1, 1.0])

    assert main(["judge-votes", *common, "--judge", "rules:judge", "--out", "votes.jsonl"]) == 0
    (row,) = [json.loads(line) for line in (tmp_path / "votes.jsonl").read_text().splitlines()]
    # prefix 1: the judge's votes over the same 3 samples (same seed); prefix 2: the judge on itself
    assert row["labels"] == pytest.approx([sum(float(len(r["steps"]) == 2) for r in rows[1:]) / 3, 1.0])

    # --top-p reaches the engine: a nucleus of one token makes the M rollouts one greedy rollout;
    # an out-of-range value is refused before the policy loads.
    assert main(["rollouts", *common, "--verifier", "rules:verifier", "--top-p", "1e-6",
                 "--out", "greedy.jsonl"]) == 0
    greedy = [json.loads(line) for line in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert len({json.dumps(r["steps"]) for r in greedy[1:]}) == 1
    assert main(["rollouts", *common, "--verifier", "rules:verifier", "--top-p", "0",
                 "--out", "bad.jsonl"]) == 2
