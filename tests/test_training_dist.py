"""Distributed and resumable training: DDP (and FSDP2) with 2 gloo processes equals one process with
the same global batch; --resume continues bit-identically on CPU; checkpoints are atomic."""
import json

import pytest
import torch
from safetensors.torch import load_file

from mahalo_engine.tiny import tiny_checkpoint
from training import mah_dpo
from training.checkpoint import latest_checkpoint

from torchrun import torchrun

# Two ranks sum gradients in another order than one process sums its micro-batches, so parameters
# agree to float32 rounding, amplified a little by RMSprop's normalised steps (seen: ~3e-5).
DDP_ATOL = 1e-4


def _data(tmp_path):
    rows = {"acc": [], "eng": []}
    for i in range(8):
        p = f"Question: {i} + {2 * i} = ?\nAnswer:"
        rows["acc"].append({"prompt": p, "chosen": f" {3 * i}", "rejected": f" {3 * i + 2}"})
        rows["eng"].append({"prompt": p, "chosen": " Nice one, well done!", "rejected": f" {3 * i}."})
    paths = {}
    for k, v in rows.items():
        paths[k] = tmp_path / f"{k}.jsonl"
        paths[k].write_text("".join(json.dumps(r) + "\n" for r in v))
    return paths


def _args(tmp_path, out, extra=()):
    d = _data(tmp_path)
    return ["--model", str(tiny_checkpoint("qwen2")), "--data", f"acc={d['acc']}", "--data",
            f"eng={d['eng']}", "--out", str(out), "--ref-cache", str(tmp_path / "cache"),
            "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", *extra]


def _tensors(out):
    return {**load_file(str(out / "model.safetensors")),
            **{"heads": load_file(str(out / "mahalo_heads.safetensors"))["heads"]}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_gloo_processes_equal_one_process(tmp_path, strategy):
    one = tmp_path / "one"
    # one process, the global batch of 8 pairs as 4 accumulated micro-batches of 2
    mah_dpo.main(_args(tmp_path, one, ["--max-steps", "3", "--micro-batch-size", "2"]))
    two = tmp_path / "two"
    # two ranks of 4 pairs each, accumulated as uneven micro-batches of 3 and 1
    proc = torchrun(2, "training.mah_dpo",
                    _args(tmp_path, two, ["--max-steps", "3", "--device", "cpu", "--strategy",
                                          strategy, "--gradient-checkpointing",
                                          "--micro-batch-size", "3"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _tensors(one), _tensors(two)
    assert a.keys() == b.keys()
    moved = max((a[k] - load_file(str(tiny_checkpoint("qwen2") / "model.safetensors"))[k]).abs().max()
                for k in a if k.startswith("model.layers"))
    assert moved > 100 * DDP_ATOL  # the runs really trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=DDP_ATOL, msg=k)
    la = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], abs=1e-4)
    # RMSprop's update hardly depends on the gradient's scale, so compare the gradients' norm too:
    # a rank or micro-batch weighted wrongly changes it
    assert [r["grad_norm"] for r in la] == pytest.approx([r["grad_norm"] for r in lb], rel=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_parameter_groups_and_a_frozen_backbone_under_two_ranks(tmp_path, strategy):
    """Head and backbone groups at their own lrs (the backbone frozen) give the same heads on two
    gloo ranks as in one process, and the backbone stays bit-unchanged under DDP and FSDP2."""
    groups = ["--max-steps", "2", "--head-lr", "1e-2", "--backbone-lr", "0"]
    one, two = tmp_path / "one", tmp_path / "two"
    mah_dpo.main(_args(tmp_path, one, groups + ["--micro-batch-size", "2"]))
    proc = torchrun(2, "training.mah_dpo", _args(tmp_path, two, groups + ["--device", "cpu",
                                                                          "--strategy", strategy]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base = load_file(str(tiny_checkpoint("qwen2") / "model.safetensors"))
    a, b = _tensors(one), _tensors(two)
    for k in base:
        if k != "lm_head.weight":
            assert torch.equal(b[k], base[k].float()), k
    assert (a["heads"] - base["lm_head.weight"].float()).abs().max() > 100 * DDP_ATOL
    torch.testing.assert_close(a["heads"], b["heads"], rtol=0, atol=DDP_ATOL)


def test_resume_continues_bit_identically(tmp_path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    mah_dpo.main(_args(tmp_path, straight, ["--max-steps", "4", "--micro-batch-size", "4"]))
    mah_dpo.main(_args(tmp_path, resumed, ["--max-steps", "2", "--micro-batch-size", "4", "--save-every", "1"]))
    ckpt = latest_checkpoint(resumed)
    assert ckpt.name == "step-2" and [p.name for p in ckpt.parent.glob("step-*")] == ["step-2"]
    mah_dpo.main(_args(tmp_path, resumed, ["--max-steps", "4", "--micro-batch-size", "4", "--resume"]))
    a, b = _tensors(straight), _tensors(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = (straight / "log.jsonl").read_text().splitlines()
    lb = (resumed / "log.jsonl").read_text().splitlines()
    strip = lambda r: {k: v for k, v in json.loads(r).items() if k != "step_time_s"}  # noqa: E731
    assert [strip(r) for r in la] == [strip(r) for r in lb]
    # a run that changes the batches cannot resume from it (MAHALO_DEBUG: raise, not exit 2)
    monkeypatch.setenv("MAHALO_DEBUG", "1")
    with pytest.raises(ValueError, match="batch_size was 8, now 4"):
        mah_dpo.main(_args(tmp_path, resumed, ["--max-steps", "5", "--resume", "--batch-size", "4"]))
    # a fresh run into it would append to its log and could prune its own checkpoint
    with pytest.raises(ValueError, match=r"already holds a training run .*log\.jsonl.*--resume"):
        mah_dpo.main(_args(tmp_path, resumed, ["--max-steps", "1"]))


def test_gradients_are_clipped_and_accumulated_before_the_step(tmp_path):
    """Two micro-batches' gradients add up, the sum is clipped to --max-grad-norm, then the
    optimizer steps; bf16 autocast stays off on the CPU even though --bf16 is the default."""
    import argparse

    from mahalo_engine.distributed import DistInfo
    from training.trainer import Micro, Trainer, add_common_args, finish_args

    p = argparse.ArgumentParser()
    add_common_args(p, lr=0.1, batch_size=2)
    args = finish_args(p.parse_args(["--out", str(tmp_path), "--max-grad-norm", "0.5"]))
    module = torch.nn.Linear(3, 1, bias=False)
    trainer = Trainer("toy", module, DistInfo(0, 1, 0, torch.device("cpu")), args, config={})
    assert trainer.bf16 is False and args.bf16 is True
    seen = []
    trainer.optimizer.register_step_pre_hook(lambda *_: seen.append(module.weight.grad.clone()))
    g1, g2 = torch.tensor([3.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, -3.0])  # sum (4, 2, -2)
    micros = [Micro(lambda g=g: ((module.weight[0] * g).sum(), {}), f"m{i}") for i, g in enumerate((g1, g2))]
    trainer.run(1, lambda step: micros, lambda m: {})
    total = g1 + g2
    torch.testing.assert_close(seen[0][0], total * 0.5 / total.norm())
    log = json.loads((tmp_path / "log.jsonl").read_text())
    assert log["grad_norm"] == pytest.approx(total.norm().item())


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from training import checkpoint

    checkpoint.save_checkpoint(tmp_path, 1, {"w": torch.ones(2)}, {"trainer": "t"})
    calls = {"n": 0}
    real = torch.save

    def crash(*a, **k):  # dies while writing the second checkpoint
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, {"trainer": "t"})
    monkeypatch.setattr(torch, "save", real)
    path = latest_checkpoint(tmp_path)
    assert path.name == "step-1" and calls["n"] == 1
    state, meta = checkpoint.load_checkpoint(path)
    assert torch.equal(state["w"], torch.ones(2)) and meta["step"] == 1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-1"]


@pytest.mark.parametrize("argv,match", [
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--epochs", "0"], "--epochs must be positive"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be positive"),
])
def test_bad_trainer_arguments_are_errors(tmp_path, argv, match, monkeypatch):
    monkeypatch.setenv("MAHALO_DEBUG", "1")  # the CLI would print the message and exit 2
    with pytest.raises(ValueError, match=match):
        mah_dpo.main(_args(tmp_path, tmp_path / "out", argv))
