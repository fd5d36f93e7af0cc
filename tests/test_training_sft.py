"""SFT trainer: completion-only NLL equals an independent transformers computation, the loss falls,
and the output directory loads with load_policy and transformers (a tied checkpoint stays tied)."""
import json

import pytest
import torch

from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from training import sft


def test_sft_loss_is_completion_nll_falls_and_output_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tiny_checkpoint("qwen2", tie_word_embeddings=True)
    rows = [{"prompt": f"Question: {i} + {i} =", "completion": f" {2 * i}. The answer is {2 * i}."}
            for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert sft.main(["--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "4",
                     "--micro-batch-size", "3", "--lr", "3e-3", "--max-steps", "8"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]

    # step 1's loss = mean NLL of completion tokens (+ EOS) under the initial model, by transformers
    tok = AutoTokenizer.from_pretrained(model)
    hf = AutoModelForCausalLM.from_pretrained(model).eval()
    nll, count = 0.0, 0
    for r in rows:
        p = tok(r["prompt"])["input_ids"]
        c = tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logp = hf(torch.tensor([p + c])).logits[0].log_softmax(-1)
        nll -= sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))
        count += len(c)
    assert log[0]["nll_per_token"] == pytest.approx(nll / count, rel=1e-5)
    assert log[0]["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]

    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    policy = load_policy(out)
    trained_hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([tok(rows[0]["prompt"])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(trained_hf(ids).logits, policy.logits(ids), rtol=1e-4, atol=1e-4)
    assert not torch.equal(policy.heads[0], load_policy(model).heads[0])
