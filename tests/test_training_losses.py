"""MAH-DPO / PRM losses and chunked per-row-head log-probs against hand formulas."""
import math

import pytest
import torch

from training import mah_dpo_loss
from training.collate import IGNORE
from training.logps import sequence_logps
from training.losses import bradley_terry_loss, soft_bce_loss, value_mse_loss


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _rand(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(-10 * torch.rand(n, generator=g, dtype=torch.float64)) for _ in range(4)]


def _hand_per_objective(pc, pr, rc, rr, obj, beta, num_objectives, rows=None, counts=None):
    """Objective i's summed -log σ(β[(π_c - π_ref_c) - (π_r - π_ref_r)]) over ``rows`` (default:
    all) divided by ``counts[i]`` (default: its rows there), 0 for an objective without rows."""
    rows = range(len(obj)) if rows is None else rows
    out = []
    for i in range(num_objectives):
        mine = [n for n in rows if obj[n] == i]
        terms = [-math.log(_sig(beta * ((pc[n] - rc[n]) - (pr[n] - rr[n])).item())) for n in mine]
        count = len(terms) if counts is None else counts[i]
        out.append(sum(terms) / count if terms else 0.0)
    return out


def test_mah_dpo_loss_matches_hand_formula():
    pc, pr, rc, rr = _rand(7)
    obj = torch.tensor([0, 2, 1, 0, 2, 2, 0])
    beta, alphas = 0.3, [0.5, 2.0, 1.5]
    loss, per = mah_dpo_loss(pc, pr, rc, rr, obj, beta=beta, alphas=alphas)
    expected_per = _hand_per_objective(pc, pr, rc, rr, obj, beta, 3)
    assert per.tolist() == pytest.approx(expected_per, rel=1e-6)
    assert loss.item() == pytest.approx(sum(a * l for a, l in zip(alphas, expected_per)), rel=1e-6)


def test_single_objective_is_plain_dpo():
    pc, pr, rc, rr = _rand(5, seed=1)
    beta = 0.1
    loss, per = mah_dpo_loss(pc, pr, rc, rr, torch.zeros(5, dtype=torch.long), beta=beta)
    # plain sigmoid DPO (Rafailov et al.): mean_n -log σ(β[(logπ_c - logπ_ref_c) - (logπ_r - logπ_ref_r)])
    plain = -torch.nn.functional.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert per.shape == (1,)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_absent_objective_contributes_nothing_and_global_counts_split_exactly():
    pc, pr, rc, rr = _rand(6, seed=2)
    obj = torch.tensor([0, 0, 2, 2, 0, 2])
    full, per = mah_dpo_loss(pc, pr, rc, rr, obj, num_objectives=3)  # beta 0.1, alphas 1/H
    hand = _hand_per_objective(pc, pr, rc, rr, obj, 0.1, 3)  # float64; the loss is float32
    assert per[1] == 0 and per.tolist() == pytest.approx(hand, rel=1e-6)
    assert full.item() == pytest.approx((hand[0] + hand[2]) / 3, rel=1e-6)
    without = mah_dpo_loss(pc, pr, rc, rr, obj, alphas=[1.0, 0.0, 1.0])[0]
    assert without.item() == pytest.approx(hand[0] + hand[2], rel=1e-6)
    # Each half normalised by the global counts is its share of the whole batch's loss, so the
    # two halves add up to it.
    counts = torch.bincount(obj, minlength=3)
    halves = 0.0
    for s in (slice(0, 3), slice(3, 6)):
        half = mah_dpo_loss(pc[s], pr[s], rc[s], rr[s], obj[s], num_objectives=3,
                            objective_counts=counts)[0].item()
        share = _hand_per_objective(pc, pr, rc, rr, obj, 0.1, 3, rows=range(6)[s],
                                    counts=counts.tolist())
        assert half == pytest.approx(sum(share) / 3, rel=1e-6)
        halves += half
    assert halves == pytest.approx((hand[0] + hand[2]) / 3, rel=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=0.0), "beta"),
    (dict(alphas=[1.0]), r"objective_ids must lie in \[0, 1\)"),
    (dict(alphas=[1.0, -1.0, 1.0]), "alphas"),
    (dict(num_objectives=3, objective_counts=torch.tensor([1, 0, 1])), "objective_counts"),
])
def test_mah_dpo_loss_rejects_bad_arguments(kwargs, match):
    pc, pr, rc, rr = _rand(3)
    with pytest.raises(ValueError, match=match):
        mah_dpo_loss(pc, pr, rc, rr, torch.tensor([0, 2, 1]), **kwargs)
    with pytest.raises(ValueError, match="rows"):
        mah_dpo_loss(pc, pr[:2], rc, rr, torch.tensor([0, 2, 1]))


def test_prm_losses_against_hand_values():
    c, r = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    assert bradley_terry_loss(c, r).item() == pytest.approx(
        (-math.log(_sig(1.0)) - math.log(_sig(-1.0))) / 2, rel=1e-6)
    logits, labels = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([1.0, 0.25, 0.0])
    hand = [-(y * math.log(_sig(x)) + (1 - y) * math.log(1 - _sig(x)))
            for x, y in zip(logits.tolist(), labels.tolist())]
    assert soft_bce_loss(logits, labels, reduction="none").tolist() == pytest.approx(hand, rel=1e-6)
    assert soft_bce_loss(logits, labels).item() == pytest.approx(sum(hand) / 3, rel=1e-6)
    assert value_mse_loss(torch.tensor([0.5, 2.0]), torch.tensor([1.0, 0.0]),
                          reduction="sum").item() == pytest.approx(0.25 + 4.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        soft_bce_loss(logits, torch.tensor([1.0, 2.0, 0.0]))


def _full_logits_reference(hidden, heads, head_ids, labels):
    logp = torch.einsum("ntd,hvd->hntv", hidden, heads).log_softmax(-1)
    out = []
    for n in range(hidden.shape[0]):
        terms = [logp[head_ids[n], n, t - 1, labels[n, t]] for t in range(1, hidden.shape[1])
                 if labels[n, t] != IGNORE]
        out.append(torch.stack(terms).sum() if terms else hidden.new_zeros(()))
    return torch.stack(out)


def test_chunked_logps_equal_full_logits_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    n, t, d, v, h = 5, 9, 8, 23, 3
    hidden = torch.randn(n, t, d, generator=g, dtype=torch.float64, requires_grad=True)
    heads = torch.randn(h, v, d, generator=g, dtype=torch.float64, requires_grad=True)
    head_ids = torch.tensor([2, 0, 2, 1, 0])
    labels = torch.randint(0, v, (n, t), generator=g)
    labels[:, :4] = IGNORE
    labels[3, 6:] = IGNORE
    labels[4] = IGNORE  # a row without labels gets 0
    ours = sequence_logps(hidden, heads, head_ids, labels, chunk_tokens=3)
    ref = _full_logits_reference(hidden, heads, head_ids, labels)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=1e-6)
    w = torch.arange(1.0, n + 1, dtype=torch.float64)
    g_ours = torch.autograd.grad((ours.double() * w).sum(), (hidden, heads))
    g_ref = torch.autograd.grad((ref * w).sum(), (hidden, heads))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_without_rows_gets_zero_gradient():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    heads = torch.randn(3, 17, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 17, (4, 6), generator=g)
    labels[:, :2] = IGNORE
    obj = torch.tensor([0, 2])  # pairs on objectives 0 and 2; objective 1 absent
    lp = sequence_logps(hidden, heads, torch.cat([obj, obj]), labels)
    loss, _ = mah_dpo_loss(lp[:2], lp[2:], torch.zeros(2), torch.zeros(2), obj, num_objectives=3)
    loss.backward()
    assert torch.count_nonzero(heads.grad[1]) == 0
    assert torch.count_nonzero(heads.grad[0]) > 0 and torch.count_nonzero(heads.grad[2]) > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    from mahalo_engine.tiny import tiny_checkpoint
    from mahalo_engine.models.loader import load_decoder
    from training.logps import PolicyLogps, enable_gradient_checkpointing

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    labels[2, 9:] = IGNORE
    grads = []
    for ckpt in (False, True):
        dec = load_decoder(tiny_checkpoint("qwen2"), dtype=torch.float32)
        if ckpt:
            enable_gradient_checkpointing(dec)
        model = PolicyLogps(dec, chunk_tokens=4)
        model(ids, mask, labels, torch.zeros(3, dtype=torch.long)).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_default_alphas_are_the_papers_mean_over_objectives():
    """α defaults to 1/H: with a balanced batch (every objective present, counts from the batch)
    the loss is the paper code's per-objective mean, then the uniform mean over the objectives
    present - computed here in float64 by hand."""
    pc, pr, rc, rr = _rand(6, seed=4)
    obj = torch.tensor([0, 1, 2, 2, 1, 0])  # balanced: two rows per objective
    beta = 0.2
    loss, _ = mah_dpo_loss(pc, pr, rc, rr, obj, beta=beta,
                           objective_counts=torch.bincount(obj, minlength=3))
    per = []
    for i in sorted(set(obj.tolist())):
        rows = [n for n in range(6) if obj[n] == i]
        per.append(sum(-math.log(_sig(beta * ((pc[n] - rc[n]) - (pr[n] - rr[n])).item()))
                       for n in rows) / len(rows))
    assert loss.item() == pytest.approx(sum(per) / len(per), rel=1e-6)
    from training.mah_dpo import _parse_alphas

    assert _parse_alphas([], ["acc", "eng", "sty"]) == [1 / 3] * 3
    assert _parse_alphas(["eng=0.5"], ["acc", "eng"]) == [0.5, 0.5]


def test_value_mse_per_example_mean_on_ragged_steps():
    """The paper's value loss: each example's mean over its steps, then the mean over examples
    (steps per example 1, 7, 2, 5); the flat mean over all steps stays available."""
    steps = [1, 7, 2, 5]
    g = torch.Generator().manual_seed(7)
    target = torch.rand(sum(steps), generator=g, dtype=torch.float64)
    pred = target + torch.tensor([2.0] + [0.5] * 7 + [1.0] * 2 + [0.2] * 5, dtype=torch.float64)
    sq = [(p - t) ** 2 for p, t in zip(pred.tolist(), target.tolist())]
    bounds = [sum(steps[:i]) for i in range(len(steps) + 1)]
    means = [sum(sq[a:b]) / (b - a) for a, b in zip(bounds, bounds[1:])]
    paper = sum(means) / len(means)
    flat = sum(sq) / len(sq)
    assert abs(paper - flat) > 0.05  # the two reductions really differ on this example
    assert value_mse_loss(pred, target, example_steps=steps).item() == pytest.approx(paper, rel=1e-6)
    assert value_mse_loss(pred, target).item() == pytest.approx(flat, rel=1e-6)
    assert value_mse_loss(pred, target, example_steps=steps, reduction="none").tolist() == \
        pytest.approx(means, rel=1e-6)
    with pytest.raises(ValueError, match="example_steps"):
        value_mse_loss(pred, target, example_steps=[1, 7, 2])
