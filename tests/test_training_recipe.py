"""The MAH-DPO recipe knobs: parameter groups (a frozen backbone stays bit-unchanged, each group at
its own learning rate, resume with groups), learning-rate schedules against the hand formula,
rpo_alpha against TRL's formula, the specialisation diagnostics on a hand-built batch, mid-run
checkpoints that load as policies, --max-minutes, the DPO soup, and one-line errors."""
import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from mahalo_engine.distributed import DistInfo
from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from training import mah_dpo, soup
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.trainer import Micro, ParamGroup, Trainer, add_common_args, finish_args, lr_factor

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def _data(tmp_path, n=4):
    rows = {"acc": [], "eng": []}
    for i in range(n):
        p = f"Question: {i} + {2 * i} = ?\nAnswer:"
        rows["acc"].append({"prompt": p, "chosen": f" {3 * i}", "rejected": f" {3 * i + 2}"})
        rows["eng"].append({"prompt": p, "chosen": " Nice one, well done!", "rejected": f" {3 * i}."})
    for k, v in rows.items():
        (tmp_path / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in v))
    return [f"acc={tmp_path / 'acc.jsonl'}", f"eng={tmp_path / 'eng.jsonl'}"]


def _argv(tmp_path, out, *extra):
    d = _data(tmp_path)
    return ["--model", str(tiny_checkpoint("qwen2")), "--data", d[0], "--data", d[1], "--out", str(out),
            "--ref-cache", str(tmp_path / "cache"), "--batch-size", "4", *extra]


def _args(tmp_path, *argv):
    p = argparse.ArgumentParser()
    add_common_args(p, lr=0.1, batch_size=2)
    return finish_args(p.parse_args(["--out", str(tmp_path), *argv]))


# -- schedules ------------------------------------------------------------------------------------

def _hand_lr(step, warm, total, kind, r):
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / (total - warm)
    return {"constant": 1.0, "linear": 1 - (1 - r) * t,
            "cosine": r + (1 - r) * (1 + math.cos(math.pi * t)) / 2}[kind]


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_schedule_lr_at_each_step_equals_the_hand_formula(tmp_path, kind):
    args = _args(tmp_path, "--warmup-steps", "2", "--lr-schedule", kind, "--min-lr-ratio", "0.1")
    module = torch.nn.Linear(2, 1, bias=False)
    trainer = Trainer("toy", module, CPU, args, config={})
    micro = [Micro(lambda: (module.weight.sum(), {}), "m")]
    trainer.run(7, lambda step: micro, lambda m: {})
    logged = [json.loads(x)["lr"] for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx([0.1 * _hand_lr(s, 2, 7, kind, 0.1) for s in range(7)], rel=1e-12)
    assert lr_factor(4, warmup=2, total=7, schedule="cosine", min_ratio=0.0) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 2 / 5)))


# -- parameter groups -----------------------------------------------------------------------------

class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = torch.nn.Linear(3, 3, bias=False)
        self.heads = torch.nn.Parameter(torch.ones(2, 3))


def test_group_learning_rates_are_applied(tmp_path):
    """RMSprop's first step moves a parameter by lr * g / sqrt((1 - alpha) g^2) = 10 lr sign(g):
    each group must move by ten times its own rate."""
    toy = _Toy()
    args = _args(tmp_path, "--max-grad-norm", "0")
    trainer = Trainer("toy", toy, CPU, args, config={},
                      groups=[ParamGroup("heads", ("heads",), 1e-3), ParamGroup("backbone", ("decoder.",), 1e-5)])
    before = {k: v.detach().clone() for k, v in toy.named_parameters()}
    x = torch.tensor([1.0, -2.0, 0.5])
    micro = [Micro(lambda: ((toy.decoder(x) * torch.tensor([1.0, -1.0, 2.0])).sum() + (toy.heads * 3).sum(), {}), "m")]
    trainer.run(1, lambda step: micro, lambda m: {})
    moved_h = (before["heads"] - toy.heads.detach()).abs()
    moved_b = (before["decoder.weight"] - toy.decoder.weight.detach()).abs()
    torch.testing.assert_close(moved_h, torch.full_like(moved_h, 1e-2), rtol=1e-3, atol=0)
    torch.testing.assert_close(moved_b, torch.full_like(moved_b, 1e-4), rtol=1e-3, atol=0)
    log = json.loads((tmp_path / "log.jsonl").read_text())
    assert log["lr/heads"] == 1e-3 and log["lr/backbone"] == 1e-5


def test_frozen_backbone_is_bit_unchanged_and_checkpoints_load_as_policies(tmp_path):
    out = tmp_path / "out"
    model = tiny_checkpoint("qwen2")
    assert mah_dpo.main(_argv(tmp_path, out, "--backbone-lr", "0", "--head-lr", "1e-2",
                              "--max-steps", "3", "--save-every", "2", "--keep-checkpoints", "2")) == 0
    base, saved = load_file(str(model / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k, v in base.items():
        if k != "lm_head.weight":
            assert torch.equal(saved[k], v.float()), k
    heads = load_file(str(out / "mahalo_heads.safetensors"))["heads"]
    assert (heads - base["lm_head.weight"].float()).abs().max() > 1e-2  # the heads trained
    # the checkpoint of step 2 holds no optimizer state for the backbone, and loads as a policy
    ckpt = out / "checkpoints" / "step-2"
    model_state, state = load_checkpoint(ckpt)
    assert set(state["optimizer"]["state"]) == {"heads"}
    policy = load_policy(ckpt)
    assert policy.objectives == ["acc", "eng"]
    assert torch.equal(policy.heads, model_state["heads"])
    final = load_policy(out)
    assert not torch.equal(final.heads, policy.heads)  # step 3 moved on from step 2


def test_resume_with_groups_is_bit_identical_and_other_group_lrs_are_refused(tmp_path, monkeypatch):
    groups = ("--backbone-lr", "1e-4", "--head-lr", "1e-2")
    straight, resumed = tmp_path / "a", tmp_path / "b"
    mah_dpo.main(_argv(tmp_path, straight, *groups, "--max-steps", "4"))
    mah_dpo.main(_argv(tmp_path, resumed, *groups, "--max-steps", "2", "--save-every", "1"))
    monkeypatch.setenv("MAHALO_DEBUG", "1")  # raise instead of exit 2
    with pytest.raises(ValueError, match=r"heads lr was 0\.01, now 0\.02"):
        mah_dpo.main(_argv(tmp_path, resumed, "--backbone-lr", "1e-4", "--head-lr", "2e-2",
                           "--max-steps", "4", "--resume"))
    with pytest.raises(ValueError, match=r"lr_schedule was 'constant', now 'cosine'"):
        mah_dpo.main(_argv(tmp_path, resumed, *groups, "--lr-schedule", "cosine", "--max-steps", "4",
                           "--resume"))
    mah_dpo.main(_argv(tmp_path, resumed, *groups, "--max-steps", "4", "--resume"))
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(load_file(str(straight / "mahalo_heads.safetensors"))["heads"],
                       load_file(str(resumed / "mahalo_heads.safetensors"))["heads"])


def test_max_minutes_checkpoints_then_stops_like_ctrl_c(tmp_path, capsys):
    out = tmp_path / "out"
    rc = mah_dpo.main(_argv(tmp_path, out, "--max-steps", "50", "--max-minutes", "1e-6"))
    assert rc == 130
    assert "stopped by --max-minutes 1e-06 at step 1; resume with --resume" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "step-1"
    assert load_policy(latest_checkpoint(out)).objectives == ["acc", "eng"]


# -- losses and diagnostics -----------------------------------------------------------------------

def test_rpo_alpha_equals_trls_formula():
    """TRL: losses = dpo_losses + rpo_alpha * nll_loss, nll_loss = cross-entropy mean over the
    chosen answers' tokens of the batch; per objective here (one objective = TRL exactly), then
    the mean over objectives."""
    from mahalo_engine.models.loader import load_decoder
    from training.collate import IGNORE, collate
    from training.logps import PolicyLogps
    from training.losses import mah_dpo_loss

    torch.manual_seed(0)
    dec = load_decoder(tiny_checkpoint("qwen2"), dtype=torch.float32)
    heads = dec.lm_head.weight.detach().clone()[None].repeat(2, 1, 1) + 0.01 * torch.randn(2, *dec.lm_head.weight.shape)
    module = PolicyLogps(dec, heads)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [3, 4]]
    chosen = [[20, 21], [22, 23, 24], [25], [26, 27, 28, 29]]
    rejected = [[30], [31, 32], [33, 34, 35], [36]]
    obj = [0, 1, 0, 0]
    batch = collate([(p, c) for p, c in zip(prompts, chosen)] + [(p, r) for p, r in zip(prompts, rejected)],
                    obj * 2, 0)
    logps = module(batch.input_ids, batch.attention_mask, batch.labels, batch.head_ids)
    ref = torch.randn(2, 4)
    n, beta, a = 4, 0.1, 0.7
    ids = torch.tensor(obj)
    loss, per = mah_dpo_loss(logps[:n], logps[n:], ref[0], ref[1], ids, beta=beta, alphas=[0.5, 0.5],
                             rpo_alpha=a, chosen_tokens=torch.tensor([float(len(c)) for c in chosen]))
    # TRL's formula, written out from full logits
    hidden = dec(batch.input_ids, batch.attention_mask)
    expected = []
    for o in (0, 1):
        rows = [i for i in range(n) if obj[i] == o]
        logits = torch.stack([hidden[i] @ heads[o].T for i in rows])  # chosen rows only
        labels = batch.labels[rows]
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)
        m = (logps[rows] - ref[0, rows]) - (logps[[n + i for i in rows]] - ref[1, rows])
        expected.append((-F.logsigmoid(beta * m)).mean() + a * nll)
    torch.testing.assert_close(per, torch.stack(expected), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, 0.5 * (expected[0] + expected[1]), rtol=1e-6, atol=1e-6)


def test_diagnostics_on_a_hand_built_batch():
    from training.collate import IGNORE
    from training.logps import head_diagnostics

    # 2 heads over a vocabulary of 3, d = 2: hidden rows pick the heads' logits directly
    heads = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]],
                          [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    hidden = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0]],
                           [[1.0, 1.0], [0.0, 1.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE, 0, 2], [IGNORE, 1, IGNORE]])
    all_logps, kl = head_diagnostics(hidden, heads, labels)

    def logp(h, x):
        return (heads[h] @ x).log_softmax(-1)

    exp = torch.tensor([[logp(k, hidden[0, 0])[0] + logp(k, hidden[0, 1])[2], logp(k, hidden[1, 0])[1]]
                        for k in (0, 1)])
    torch.testing.assert_close(all_logps, exp)
    for r in (0, 1):
        p0, p1 = logp(0, hidden[r, 0]), logp(1, hidden[r, 0])
        hand = 0.5 * ((p0.exp() * (p0 - p1)).sum() + (p1.exp() * (p1 - p0)).sum())
        torch.testing.assert_close(kl[r], hand)

    # the cross-head sums: head k on objective j's pairs
    chosen_all = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -1.0, -2.0]])  # [H=2, n=3]
    rejected_all = torch.tensor([[-2.0, -1.0, -3.5], [-3.0, -3.0, -1.0]])
    ref_c, ref_r = torch.tensor([-1.5, -1.5, -3.0]), torch.tensor([-1.5, -1.5, -3.0])
    obj = torch.tensor([0, 1, 0])
    m = mah_dpo.cross_head_metrics(torch.cat([chosen_all, rejected_all], 1), torch.tensor([0.1, 0.2, 0.3, 9, 9, 9]),
                                   ref_c, ref_r, obj, beta=0.5)
    margins = chosen_all - rejected_all  # references cancel: equal for chosen and rejected here
    hand_correct = torch.tensor([[float(margins[k, 0] > 0) + float(margins[k, 2] > 0), float(margins[k, 1] > 0)]
                                 for k in (0, 1)])
    assert torch.equal(m["cross_correct"], hand_correct)
    torch.testing.assert_close(m["cross_margin_sum"], torch.tensor(
        [[0.5 * (margins[k, 0] + margins[k, 2]), 0.5 * margins[k, 1]] for k in (0, 1)]))
    torch.testing.assert_close(m["chosen_drift_sum"], torch.tensor([(-1 + 1.5) + (-3 + 3.0), -1 + 1.5]))
    torch.testing.assert_close(m["rejected_drift_sum"], torch.tensor([(-2 + 1.5) + (-3.5 + 3.0), -3 + 1.5]))
    assert m["first_kl_sum"].item() == pytest.approx(0.6)
    m["count"] = torch.tensor([2.0, 1.0])
    m |= {k: torch.zeros(2) for k in ("loss_sum", "margin_sum", "correct", "chosen_nll_sum", "chosen_tokens")}
    logged = mah_dpo.summarize(m, ["acc", "eng"])
    assert logged["eng_head_on_acc/reward_acc"] == hand_correct[1, 0] / 2
    assert logged["acc/chosen_drift"] == pytest.approx(0.25)
    assert logged["first_token_kl"] == pytest.approx(0.2)


def test_training_log_holds_the_diagnostics_on_logged_steps_only(tmp_path):
    out = tmp_path / "out"
    mah_dpo.main(_argv(tmp_path, out, "--max-steps", "3", "--log-every", "2", "--lr", "1e-3"))
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 3]
    for r in recs:
        for key in ("acc_head_on_eng/reward_acc", "eng_head_on_acc/margin", "acc/chosen_drift",
                    "eng/rejected_drift", "first_token_kl"):
            assert key in r and math.isfinite(r[key])
        assert r["first_token_kl"] > 0  # the heads start from different noise


# -- soup -----------------------------------------------------------------------------------------

def test_soup_equals_a_hand_interpolation(tmp_path):
    a, b = tiny_checkpoint("qwen2", seed=1), tiny_checkpoint("qwen2", seed=2)
    out = tmp_path / "soup"
    assert soup.main(["--models", str(a), str(b), "--weights", "0.3", "0.7", "--out", str(out)]) == 0
    wa, wb, ws = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert wa.keys() == ws.keys()
    for k in wa:
        torch.testing.assert_close(ws[k].float(), 0.3 * wa[k].float() + 0.7 * wb[k].float(), rtol=0, atol=1e-6)
    assert load_policy(out).heads.shape[0] == 1


@pytest.mark.parametrize("argv, match", [
    (["--weights", "0.3", "0.6"], r"--weights must sum to 1, got \[0\.3, 0\.6\]"),
    (["--weights", "1.5", "-0.5"], r"--weights must be finite numbers >= 0"),
    (["--weights", "1"], r"one weight per model \(2\)"),
])
def test_soup_bad_weights_are_one_line(tmp_path, capsys, argv, match):
    a, b = tiny_checkpoint("qwen2", seed=1), tiny_checkpoint("qwen2", seed=2)
    capsys.readouterr()
    assert soup.main(["--models", str(a), str(b), "--out", str(tmp_path / "s"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    import re
    assert re.search(match, err), err


def test_soup_of_models_of_different_shapes_is_one_line(tmp_path, capsys):
    a, b = tiny_checkpoint("qwen2"), tiny_checkpoint("qwen2", hidden_size=32, intermediate_size=64)
    capsys.readouterr()  # (building the tiny checkpoints may print progress)
    assert soup.main(["--models", str(a), str(b), "--weights", "0.5", "0.5", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models have different shapes" in err, err


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [
    (["--head-lr=-1e-3"], r"--head-lr must be a finite number >= 0, got -0\.001"),
    (["--backbone-lr", "nan"], r"--backbone-lr must be a finite number >= 0, got nan"),
    (["--lr", "inf"], r"--lr must be a finite number >= 0, got inf"),
    (["--rpo-alpha=-0.5"], r"--rpo-alpha must be a finite number >= 0, got -0\.5"),
    (["--min-lr-ratio", "2"], r"--min-lr-ratio must lie in \[0, 1\], got 2"),
    (["--max-minutes", "0"], r"--max-minutes must be a positive number, got 0"),
])
def test_bad_recipe_arguments_are_one_line(tmp_path, capsys, flags, match):
    import re

    argv = _argv(tmp_path, tmp_path / "o", "--max-steps", "1", *flags)
    capsys.readouterr()
    assert mah_dpo.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err


def test_sft_and_prm_checkpoints_load_like_their_final_outputs(tmp_path):
    """(Before, a checkpoint held only the trainer's module state: `decoder.*` names, no
    config.json or tokenizer, so neither loader could read it.)"""
    from mahalo_engine import load_prm
    from training import prm, sft

    model = tiny_checkpoint("qwen2")
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}."}) + "\n" for i in range(4)))
    sft.main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "sft"),
              "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "2", "--lr", "1e-3"])
    ckpt = tmp_path / "sft" / "checkpoints" / "step-1"
    state, _ = load_checkpoint(ckpt)
    torch.testing.assert_close(load_policy(ckpt).model.model.norm.weight, state["decoder.model.norm.weight"])
    steps = tmp_path / "steps.jsonl"
    steps.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completions": ["A.", "B."], "labels": [0.5, 1.0]})
                             + "\n" for i in range(4)))
    prm.main(["--model", str(model), "--data", str(steps), "--loss", "mse", "--out", str(tmp_path / "prm"),
              "--batch-size", "2", "--max-steps", "2", "--save-every", "1", "--keep-checkpoints", "2", "--head", "linear"])
    assert load_prm(tmp_path / "prm" / "checkpoints" / "step-1").kind == "value"
