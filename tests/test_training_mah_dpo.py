"""MAH-DPO trainer on tiny models: accuracy rises per objective, outputs load, the reference cache,
untying, errors, the real tutoring pairs, and every CLI's --help."""
import importlib
import json
import os
from pathlib import Path

import pytest
import torch

from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from training import mah_dpo, ref_logps
from training.encode import tokenize_pairs
from training.readers import read_preferences

# Real pairs from the paper's public code, where a developer has them (not part of the repo).
# Real data from the paper's code, laid beside the checkout where the workplace provides it (not part
# of the repo; the test skips without it). MAHALO_PAPER_DATA points elsewhere.
PAPER_DATA = Path(os.environ.get("MAHALO_PAPER_DATA")
                  or Path(__file__).resolve().parents[1].parent / "shared" / "data")


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _pairs(tmp_path, n=8):
    """Per-prompt varied pairs; the two objectives prefer different kinds of answers."""
    cheers = [" Great job!", " Nice work, friend!", " Well done!", " You got it!", " Superb!",
              " Fantastic effort!", " Brilliant!", " Lovely!"]
    acc, eng = [], []
    for i in range(n):
        a, b = 3 + 5 * i, 7 + 2 * i
        prompt = f"Question: {a} + {b} = ?\nAnswer:"
        acc.append({"prompt": prompt, "chosen": f" {a + b}", "rejected": f" {a + b + 1 + i % 3}"})
        eng.append({"prompt": prompt, "chosen": cheers[i % len(cheers)], "rejected": f" {a + b}."})
    return _write(tmp_path / "acc.jsonl", acc), _write(tmp_path / "eng.jsonl", eng)


def _seq_logp(policy, prompt_ids, resp_ids, weights):
    """Independent reference: full logits from Policy.logits, log_softmax, sum over the response."""
    ids = torch.tensor([prompt_ids + resp_ids])
    logp = policy.logits(ids, head_weights=weights)[0].log_softmax(-1)
    p = len(prompt_ids)
    return sum(logp[p - 1 + j, t].item() for j, t in enumerate(resp_ids))


def _accuracy(policy, ref_policy, items, objective, weights):
    correct = 0
    rows = [it for it in items if it.objective == objective]
    for it in rows:
        margin = ((_seq_logp(policy, it.prompt, it.chosen, weights) - _seq_logp(ref_policy, it.prompt, it.chosen, None))
                  - (_seq_logp(policy, it.prompt, it.rejected, weights) - _seq_logp(ref_policy, it.prompt, it.rejected, None)))
        correct += margin > 0
    return correct / len(rows)


def test_mah_dpo_raises_each_objectives_accuracy_and_saves_loadable_policy(tmp_path):
    model = tiny_checkpoint("qwen2")
    acc, eng = _pairs(tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(model), "--data", f"acc={acc}", "--data", f"eng={eng}", "--out", str(out),
            "--ref-cache", str(tmp_path / "cache"), "--batch-size", "8", "--micro-batch-size", "4",
            "--lr", "1e-3", "--max-steps", "12", "--beta", "0.5"]
    assert mah_dpo.main(args) == 0

    from transformers import AutoTokenizer

    data = read_preferences([("acc", acc), ("eng", eng)])
    items, _ = tokenize_pairs(AutoTokenizer.from_pretrained(model), data, max_length=1024,
                              max_prompt_length=512, chat_template=False)
    ref_policy = load_policy(model)
    trained = load_policy(out)
    assert trained.objectives == ["acc", "eng"] and trained.heads.shape[0] == 2
    # the heads started as the SFT head + σ noise (σ = 1e-3) and now differ well beyond that
    assert (trained.heads[0] - trained.heads[1]).abs().max() > 0.05

    init = load_policy(model)
    init.heads = mah_dpo.init_heads(ref_policy.heads[0], 2, 1e-3, [42, 142])
    init.objectives = ["acc", "eng"]
    for i in range(2):
        onehot = [1.0 if j == i else 0.0 for j in range(2)]
        before = _accuracy(init, ref_policy, items, i, onehot)
        after = _accuracy(trained, ref_policy, items, i, onehot)
        assert after == 1.0 and before < after, (i, before, after)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and log[-1]["acc/acc"] == 1.0 and log[-1]["eng/acc"] == 1.0

    # transformers loads the backbone; its lm_head is the uniform mix of the heads
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([items[0].prompt])
    torch.testing.assert_close(hf(ids).logits, trained.logits(ids), rtol=1e-4, atol=1e-4)


def test_reference_logps_cached_equal_recomputed(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mahalo_engine.models.loader import load_decoder
    from mahalo_engine.distributed import DistInfo

    model = tiny_checkpoint("qwen2")
    acc, eng = _pairs(tmp_path, n=5)
    tok = AutoTokenizer.from_pretrained(model)
    items, _ = tokenize_pairs(tok, read_preferences([("acc", acc), ("eng", eng)]), max_length=64,
                              max_prompt_length=32, chat_template=False)
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    kw = dict(model_dir=model, cache_dir=tmp_path / "cache", pad_id=0, batch_size=3, chunk_tokens=7,
              info=info, bf16=False)
    decoder = load_decoder(model, dtype=torch.float32)
    first = ref_logps.reference_logps(decoder, items, **kw)

    hf = AutoModelForCausalLM.from_pretrained(model).eval()  # an independent forward
    for n, it in enumerate(items):
        for col, resp in enumerate((it.chosen, it.rejected)):
            with torch.no_grad():
                logp = hf(torch.tensor([it.prompt + resp])).logits[0].log_softmax(-1)
            p = len(it.prompt)
            expected = sum(logp[p - 1 + j, t].item() for j, t in enumerate(resp))
            assert first[n, col].item() == pytest.approx(expected, abs=1e-4)

    def fail(*a, **k):
        raise AssertionError("cache miss: reference log-probs recomputed")

    monkeypatch.setattr(ref_logps, "compute_reference_logps", fail)
    assert torch.equal(ref_logps.reference_logps(decoder, items, **kw), first)
    shorter = [type(it)(it.prompt[1:], it.chosen, it.rejected, it.objective) for it in items]
    with pytest.raises(AssertionError, match="cache miss"):  # other tokens, other key
        ref_logps.reference_logps(decoder, shorter, **kw)
    # the same tokens split differently between prompt and response: other key
    moved = [type(it)(it.prompt[:-1], it.prompt[-1:] + it.chosen, it.prompt[-1:] + it.rejected,
                      it.objective) for it in items]
    with pytest.raises(AssertionError, match="cache miss"):
        ref_logps.reference_logps(decoder, moved, **kw)
    # other weights (one tensor nudged), or another config, under the same directory name: other key
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other_model"
    shutil.copytree(model, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1e-3
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AssertionError, match="cache miss"):
        ref_logps.reference_logps(decoder, items, **{**kw, "model_dir": other})
    shutil.copy(model / "model.safetensors", other / "model.safetensors")
    assert torch.equal(ref_logps.reference_logps(decoder, items, **{**kw, "model_dir": other}), first)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    with pytest.raises(AssertionError, match="cache miss"):
        ref_logps.reference_logps(decoder, items, **{**kw, "model_dir": other})


def test_tied_checkpoint_is_untied_and_embedding_untouched(tmp_path):
    from safetensors.torch import load_file

    model = tiny_checkpoint("qwen2", tie_word_embeddings=True)
    acc, eng = _pairs(tmp_path, n=2)
    out = tmp_path / "out"
    mah_dpo.main(["--model", str(model), "--data", f"acc={acc}", "--data", f"eng={eng}", "--out",
                  str(out), "--ref-cache", str(tmp_path / "c"), "--batch-size", "2",
                  "--backbone-lr", "0", "--head-lr", "1e-9", "--max-steps", "1"])
    embed = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"]
    saved = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert torch.equal(saved["model.embed_tokens.weight"], embed)  # the noise went to the heads only
    policy = load_policy(out)
    noise = policy.heads - embed  # heads started from the (tied) SFT head
    assert noise.std(dim=(1, 2)).tolist() == pytest.approx([1e-3, 1e-3], rel=0.05)
    assert not torch.equal(policy.heads[0], policy.heads[1])


def test_nonfinite_loss_names_step_and_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("MAHALO_DEBUG", "1")  # the CLI would print the message and exit 2
    acc, eng = _pairs(tmp_path, n=4)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 2, .*(acc|eng)\.jsonl:\d"):
        mah_dpo.main(["--model", str(tiny_checkpoint("qwen2")), "--data", f"acc={acc}", "--data",
                      f"eng={eng}", "--out", str(tmp_path / "o"), "--ref-cache", str(tmp_path / "c"),
                      "--batch-size", "4", "--lr", "1e37", "--max-steps", "3"])


@pytest.mark.skipif(not (PAPER_DATA / "sm_acc_pairs.json").is_file(),
                    reason="$MAHALO_PAPER_DATA/sm_acc_pairs.json is absent (not part of the repo)")
def test_real_tutoring_pairs_run_through_mah_dpo(tmp_path, caplog):
    from training.data import main as data_main

    trl = tmp_path / "sm_acc.jsonl"
    assert data_main(["convert-pairs", str(PAPER_DATA / "sm_acc_pairs.json"), str(trl),
                      "--limit", "12"]) == 0
    rows = [json.loads(line) for line in trl.read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"prompt", "chosen", "rejected"}
    assert rows[0]["prompt"].rstrip().endswith("Assistant:")
    out = tmp_path / "out"
    caplog.set_level("INFO")
    mah_dpo.main(["--model", str(tiny_checkpoint("qwen2")), "--data", f"acc={trl}", "--out", str(out),
                  "--ref-cache", str(tmp_path / "c"), "--batch-size", "4", "--max-length", "256",
                  "--max-steps", "2", "--lr", "1e-4"])
    assert "12/12 prompts truncated" in caplog.text  # long real dialogues, 256-token budget
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert load_policy(out).objectives == ["acc"]


@pytest.mark.parametrize("name", ["sft", "mah_dpo", "prm", "labels", "convert", "data", "checkpoint", "soup"])
def test_every_cli_has_help(name, capsys):
    mod = importlib.import_module(f"training.{name}")
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    assert f"python -m training.{name}" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("launch", ["plain", "torchrun-fsdp2"])
def test_mah_dpo_on_cuda_bf16(tmp_path, launch):
    """bf16 autocast (plain) or FSDP2 with bf16 mixed precision over NCCL (one rank) on the GPU."""
    import os
    import subprocess
    import sys

    acc, eng = _pairs(tmp_path)
    out = tmp_path / "out"
    args = ["--model", str(tiny_checkpoint("qwen2")), "--data", f"acc={acc}", "--data", f"eng={eng}",
            "--out", str(out), "--ref-cache", str(tmp_path / "cache"), "--batch-size", "8",
            "--lr", "1e-3", "--max-steps", "12", "--beta", "0.5", "--device", "cuda"]
    if launch == "plain":
        mah_dpo.main(args)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
               "--master_port", "29571", "-m", "training.mah_dpo", *args, "--strategy", "fsdp2",
               "--gradient-checkpointing"]
        # Inside the device check's per-test limit (90 s): a hung NCCL start fails here, with its log.
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=80, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    assert log[-1]["acc/acc"] >= 0.75 and log[-1]["eng/acc"] >= 0.75
    policy = load_policy(out, device="cuda")
    assert policy.objectives == ["acc", "eng"]
    assert torch.isfinite(policy.logits(torch.tensor([[1, 2, 3]]))).all()
