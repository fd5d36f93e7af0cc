"""The PRM-quality math (`bench.quality.prm_quality`): the Mann-Whitney AUC against a hand count
and a brute-force pair count (and scikit-learn when installed), the calibration bins, and the
grouping of rollout rows into prefixes with their continuations' labels."""
import random

import pytest

from bench.quality.prm_quality import auc, calibration, prefix_examples


def _pairwise_auc(scores, labels):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_auc_hand_example():
    # positives 0.35, 0.8; negatives 0.1, 0.4: pairs (0.35>0.1), (0.35<0.4), (0.8>0.1), (0.8>0.4)
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    # a tie between a positive and a negative counts 1/2: pairs (0.5=0.5), (0.5>0.2) -> 1.5 / 2
    assert auc([0.5, 0.5, 0.2], [1, 0, 0]) == pytest.approx(0.75)
    assert auc([0.9, 0.1], [True, False]) == 1.0 and auc([0.1, 0.9], [1, 0]) == 0.0
    assert auc([0.3] * 4, [1, 0, 1, 0]) == 0.5


def test_auc_matches_pair_count_and_sklearn():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 60)
        scores = [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        assert auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
        try:
            from sklearn.metrics import roc_auc_score
        except ImportError:
            continue
        assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_auc_bad_input():
    with pytest.raises(ValueError, match="both classes"):
        auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        auc([0.1], [1, 0])


def test_calibration_bins_by_hand():
    out = calibration([0.05, 0.15, 0.12, 0.95, 1.3, -0.2], [0.0, 0.5, 1.0, 1.0, 0.75, 0.25], bins=4)
    bins = out["bins"]
    assert [b["count"] for b in bins] == [4, 0, 0, 2]  # 1.3 -> 1.0 and -0.2 -> 0.0 (clipped)
    assert bins[0]["mean_pred"] == pytest.approx((0.05 + 0.15 + 0.12 + 0.0) / 4)
    assert bins[0]["mc_rate"] == pytest.approx((0.0 + 0.5 + 1.0 + 0.25) / 4)
    assert bins[1]["mean_pred"] is None and bins[1]["mc_rate"] is None
    assert bins[3]["mean_pred"] == pytest.approx(0.975) and bins[3]["mc_rate"] == pytest.approx(0.875)
    ece = (4 * abs(0.08 - 0.4375) + 2 * abs(0.975 - 0.875)) / 6
    assert out["ece"] == pytest.approx(ece)


def test_prefix_examples_group_continuations():
    def row(steps, k, z):
        return {"prompt": "q", "steps": steps, "prefix_len": k, "final_reward": z}

    a, b, c = "1 + 1 = 2\n\n", "2 * 3 = 6\n\n", "\\boxed{6}"
    rows = [row([a, b, c], 3, 1.0),  # the sample itself, then m = 2 continuations per prefix
            row([a, "x\n\n", "\\boxed{5}"], 1, 0.0), row([a, b, c], 1, 1.0),
            row([a, b, "\\boxed{7}"], 2, 0.0), row([a, b, c], 2, 1.0),
            row(["\\boxed{4}"], 1, 0.0)]  # a one-step sample: no proper prefix
    prefixes, finals = prefix_examples(rows, m=2)
    assert prefixes == [{"prompt": "q", "steps": [a], "labels": [0.0, 1.0]},
                        {"prompt": "q", "steps": [a, b], "labels": [0.0, 1.0]}]
    assert [f["label"] for f in finals] == [1.0, 0.0] and finals[1]["steps"] == ["\\boxed{4}"]
    with pytest.raises(ValueError, match="continuations of prefix 2"):
        prefix_examples(rows[:4] + rows[5:], m=2)


def test_reference_checks_by_hand():
    from bench.quality.chain_task import Problem
    from bench.quality.pipeline import prompt_of
    from bench.quality.prm_quality import reference_checks

    p = Problem("Ana has 2 cups. Then Ana doubles them and gets 3 more. How many cups now?", 2,
                (("*", 2), ("+", 3)), 7)
    q = prompt_of(p)
    values = [{"prompt": q, "steps": ["2 * 2 = 4\n\n"], "labels": [1, 1, 0, 1], "value": 0.9},
              {"prompt": q, "steps": ["2 * 2 = 5\n\n"], "labels": [0, 0, 0, 0], "value": 0.2},
              {"prompt": q, "steps": ["2 * 2 = 4\n\n", "4 + 3 = 7 \n\n"], "labels": [1, 1, 1, 0],
               "value": 0.1}]  # trailing space: still the reference's step
    out = reference_checks(values, [p], "\n\n")
    assert out["right_prefixes"] == 2 and out["wrong_prefixes"] == 1
    assert out["success_after_right"] == pytest.approx(6 / 8) and out["success_after_wrong"] == 0.0
    # the checker: 6 positives all scored 1; negatives: 2 scored 1, 4 scored 0 -> (6*4 + 6*2/2) / 36
    assert out["auc_reference"] == pytest.approx((24 + 6) / 36)
    # the PRM's value at telling right (0.9, 0.1) from wrong (0.2): pairs 0.9>0.2, 0.1<0.2 -> 1/2
    assert out["auc_detect_wrong"] == pytest.approx(0.5)
