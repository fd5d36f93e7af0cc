"""PRM format (strict value-head loading, score_full, scores_from_hidden) and the PRM trainer."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mahalo_engine.value_model import ValueHead, ValueModel, load_prm, save_prm
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder
from training import prm as prm_train


def _tiny_prm(tmp_path, kind="value", arch="mlp"):
    from transformers import AutoTokenizer

    model_dir = tiny_checkpoint("qwen2")
    decoder = load_decoder(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    head = ValueHead(decoder.config.hidden_size, arch, 16 if arch == "mlp" else None)
    out = tmp_path / f"prm-{kind}-{arch}"
    save_prm(out, decoder, head, kind, AutoTokenizer.from_pretrained(model_dir))
    return out, head


@pytest.mark.parametrize("kind,arch", [("value", "mlp"), ("binary", "linear"), ("bt", "mlp")])
def test_score_full_matches_transformers_hidden_states(tmp_path, kind, arch):
    from transformers import AutoModelForCausalLM

    out, head = _tiny_prm(tmp_path, kind, arch)
    prm = load_prm(out)
    assert isinstance(prm, ValueModel) and prm.kind == kind and prm.value_head.arch == arch
    seqs = [[5, 17, 42, 9], [3, 3], [100, 200, 300, 7, 8, 9, 1]]
    scores = prm.score_full(seqs, batch_size=2)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = []
    for s in seqs:
        with torch.no_grad():  # transformers' last hidden state is post final norm
            h = hf(torch.tensor([s]), output_hidden_states=True).hidden_states[-1][0, -1]
            raw = head(h).item()
        expected.append(1 / (1 + torch.exp(torch.tensor(-raw)).item()) if kind == "binary" else raw)
    assert scores.dtype == torch.float32
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    hidden = torch.randn(2, 3, prm.config.hidden_size)
    assert prm.scores_from_hidden(hidden).shape == (2, 3)


def test_value_head_loading_is_strict(tmp_path):
    out, _ = _tiny_prm(tmp_path)
    f = out / "value_head.safetensors"
    tensors = load_file(str(f))
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    assert meta["format"] == "mahalo-value-head-v1" and meta["arch"] == "mlp" and meta["mlp_hidden"] == "16"

    def broken(ts, md, match):
        save_file(ts, str(f), metadata=md)
        with pytest.raises(ValueError, match=match):
            load_prm(out)

    broken({k: v for k, v in tensors.items() if k != "2.bias"}, meta, r"missing tensors: \['2.bias'\]")
    broken({**tensors, "3.weight": torch.zeros(1)}, meta, r"unexpected tensors: \['3.weight'\]")
    broken(tensors, {**meta, "mlp_hidden": "8"}, r"mis-shaped tensors: .*'0.weight: \(16, 64\), expected \(8, 64\)'")
    broken(tensors, {**meta, "kind": "reward"}, "kind='reward'")
    broken(tensors, {**meta, "format": "other"}, "format='other'")
    broken({"0.weight": torch.zeros(1, 32), "0.bias": torch.zeros(1)},
           {**meta, "arch": "linear", "hidden_size": "32"}, "hidden size 32")


def _steps(tmp_path, n=12):
    rows = []
    for i in range(n):
        good = i % 2 == 0
        steps = [f"Step 1: {i} + {i} = {2 * i}.", "Step 2: so the answer is " + (f"{2 * i}." if good else "a banana.")]
        rows.append({"prompt": f"Question {i}: what is {i} + {i}?", "completions": steps,
                     "labels": [0.9 if good else 0.3, 1.0 if good else 0.0]})
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prm_mse_training_lowers_loss_and_saves_loadable_value_model(tmp_path):
    data = _steps(tmp_path)
    out = tmp_path / "out"
    assert prm_train.main(["--model", str(tiny_checkpoint("qwen2")), "--data", str(data), "--loss", "mse",
                           "--out", str(out), "--max-steps", "15", "--batch-size", "12", "--lr", "3e-3",
                           "--micro-batch-size", "5"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    prm = load_prm(out)
    assert prm.kind == "value"
    # the backbone was frozen: identical to the input checkpoint
    base = load_file(str(tiny_checkpoint("qwen2") / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(base[k], saved[k]) for k in base)

    # the trained head, read at each step's last token, fits the targets better than predicting 0
    from training.encode import tokenize_steps
    from training.readers import read_steps

    items, _ = tokenize_steps(prm.tokenizer, read_steps(data), max_length=2048, max_prompt_length=1024,
                              chat_template=False, step_separator="\n\n")
    preds, targets = [], []
    for it in items:
        for pos, label in zip(it.positions, it.labels):
            preds.append(prm.score_full([it.ids[:pos + 1]]).item())
            targets.append(label)
    err = sum((p - t) ** 2 for p, t in zip(preds, targets)) / len(targets)
    assert err == pytest.approx(log[-1]["mse"], rel=0.5)
    assert err < 0.5 * sum(t * t for t in targets) / len(targets)


@pytest.mark.parametrize("loss,kind", [("bce", "binary"), ("bt", "bt")])
def test_prm_bce_and_bt_first_step_loss_matches_hand_value(tmp_path, loss, kind):
    """With lr 0, the logged loss is the hand BCE / BT loss of the initial head's raw outputs."""
    model = tiny_checkpoint("qwen2")
    if loss == "bce":
        data = _steps(tmp_path, n=4)
    else:
        data = tmp_path / "pairs.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Q{i}:", "chosen": ["Right.\n\n", "Done."],
                                            "rejected": "Wrong."}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    prm_train.main(["--model", str(model), "--data", str(data), "--loss", loss, "--out", str(out),
                    "--max-steps", "1", "--batch-size", "4", "--lr", "0", "--head", "linear"])
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    prm = load_prm(out)
    assert prm.kind == kind
    tok = prm.tokenizer
    raw = lambda ids: prm.value_head(prm.model(torch.tensor([ids]))[0, -1]).item()  # noqa: E731
    terms = []
    import math

    for r in map(json.loads, data.read_text().splitlines()):
        p = tok(r["prompt"])["input_ids"]
        if loss == "bce":
            ids = list(p)
            for step, y in zip(r["completions"], r["labels"]):
                ids += tok(step + "\n\n", add_special_tokens=False)["input_ids"]
                z = raw(ids)
                terms.append(-(y * math.log(1 / (1 + math.exp(-z))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-z)))))
        else:
            c = p + tok("Right.\n\n", add_special_tokens=False)["input_ids"] + tok("Done.\n\n", add_special_tokens=False)["input_ids"]
            rj = p + tok("Wrong.\n\n", add_special_tokens=False)["input_ids"]
            terms.append(-math.log(1 / (1 + math.exp(-(raw(c) - raw(rj))))))
    assert log[loss] == pytest.approx(sum(terms) / len(terms), rel=1e-4)


def test_prm_with_trained_backbone_moves_the_backbone_and_scores_as_saved(tmp_path):
    model = tiny_checkpoint("qwen2")
    out = tmp_path / "out"
    prm_train.main(["--model", str(model), "--data", str(_steps(tmp_path, n=4)), "--loss", "mse",
                    "--out", str(out), "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2",
                    "--train-backbone", "--head", "linear"])
    base = load_file(str(model / "model.safetensors"))
    saved = load_file(str(out / "model.safetensors"))
    assert not torch.equal(base["model.layers.0.mlp.up_proj.weight"], saved["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(base["lm_head.weight"], saved["lm_head.weight"])  # unused by a PRM: frozen
    prm = load_prm(out)
    assert prm.kind == "value"  # mse: the raw head output is the score
    ids = [5, 17, 42, 9]
    # The loaded PRM scores with the trained backbone and head, both read independently here:
    # transformers' last (post-norm) hidden state, and the linear head's tensors from the file.
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        h = AutoModelForCausalLM.from_pretrained(out).eval()(
            torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    head = load_file(str(out / "value_head.safetensors"))
    expected = (h.double() @ head["0.weight"][0].double() + head["0.bias"][0].double()).item()
    assert prm.score_full([ids]).item() == pytest.approx(expected, abs=1e-5)


def test_bce_rejects_labels_outside_unit_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("MAHALO_DEBUG", "1")  # the CLI would print the message and exit 2
    data = tmp_path / "s.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completions": ["a"], "labels": [2.0]}) + "\n")
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]; .*s\.jsonl:1 has 2\.0"):
        prm_train.main(["--model", str(tiny_checkpoint("qwen2")), "--data", str(data), "--loss", "bce",
                        "--out", str(tmp_path / "o"), "--batch-size", "1"])


@pytest.mark.gpu
def test_score_full_bf16_on_cuda_matches_cpu(tmp_path):
    out, _ = _tiny_prm(tmp_path)
    seqs = [[5, 17, 42, 9], [3, 3, 8]]
    cpu = load_prm(out).score_full(seqs)
    gpu = load_prm(out, dtype=torch.bfloat16, device="cuda").score_full(seqs)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.05, atol=0.05)


# -- multi-objective PRM (one backbone, one output per objective) --------------------------------


def test_multi_objective_value_head_roundtrip_and_weighting(tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from mahalo_engine.value_model import objective_weights

    model_dir = tiny_checkpoint("qwen2")
    decoder = load_decoder(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    head = ValueHead(decoder.config.hidden_size, "mlp", 16, objectives=["acc", "style"])
    out = tmp_path / "multi"
    save_prm(out, decoder, head, "value", AutoTokenizer.from_pretrained(model_dir))
    with safe_open(str(out / "value_head.safetensors"), framework="pt") as f:
        assert f.metadata()["objectives"] == "acc,style"
    prm = load_prm(out)
    assert prm.objectives == ["acc", "style"]
    seqs = [[5, 17, 42, 9], [3, 3, 8]]
    # Reference: the head's two outputs by hand in float64 from the backbone's hidden state.
    per = []
    for s in seqs:
        with torch.no_grad():
            h = decoder(torch.tensor([s]))[0, -1].double()
        w0, b0, w2, b2 = (head[0].weight.double(), head[0].bias.double(), head[2].weight.double(),
                          head[2].bias.double())
        per.append((torch.relu(h @ w0.T + b0) @ w2.T + b2).tolist())
    per = torch.tensor(per, dtype=torch.float64)  # [N, 2]
    for spec, w in ((None, [0.5, 0.5]), ("acc", [1, 0]), ("style", [0, 1]),
                    ({"acc": 0.3, "style": 0.7}, [0.3, 0.7]), ({"style": 2.0}, [0, 2]), ([1, -1], [1, -1])):
        got = prm.score_full(seqs, objectives=spec)
        assert got.tolist() == pytest.approx((per @ torch.tensor(w, dtype=torch.float64)).tolist(), abs=1e-5)
    assert prm.raw_scores(torch.randn(3, decoder.config.hidden_size)).shape == (3, 2)
    for bad, match in (("eng", "unknown PRM objective"), ({"eng": 1}, "unknown"), ([1.0], "2 objectives"),
                       ({"acc": 0}, "all zero"), ([float("nan"), 1], "finite")):
        with pytest.raises(ValueError, match=match):
            prm.score_full(seqs, objectives=bad)
    assert objective_weights(None, None) is None
    with pytest.raises(ValueError, match="single-output"):
        objective_weights(None, "acc")
    with pytest.raises(ValueError, match="objectives"):
        ValueHead(8, objectives=["a", "a"])

    # The metadata fixes the output count: a head file claiming 3 objectives with 2 rows fails.
    f = out / "value_head.safetensors"
    tensors = load_file(str(f))
    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    save_file(tensors, str(f), metadata={**meta, "objectives": "acc,style,help"})
    with pytest.raises(ValueError, match="mis-shaped"):
        load_prm(out)


def test_multi_objective_prm_training_fits_each_objective(tmp_path, capsys):
    rows = []
    for i in range(24):  # objective 0 follows the step count, objective 1 a word in the step
        steps = [f"step {j} {'good' if (i + j) % 2 else 'bad'}" for j in range(1 + i % 3)]
        rows.append({"prompt": f"Problem {i}:", "completions": steps,
                     "labels": [[0.3 * (j + 1), 1.0 if (i + j) % 2 else -1.0] for j in range(len(steps))]})
    data = tmp_path / "multi.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert prm_train.main(["--model", str(tiny_checkpoint("qwen2")), "--data", str(data), "--loss", "mse",
                           "--objectives", "acc,style", "--out", str(out), "--max-steps", "40",
                           "--batch-size", "12", "--lr", "3e-3"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["mse"] < 0.5 * log[0]["mse"]
    prm = load_prm(out)
    assert prm.objectives == ["acc", "style"]
    from training.encode import tokenize_steps
    from training.readers import read_steps

    items, _ = tokenize_steps(prm.tokenizer, read_steps(data, num_objectives=2), max_length=2048,
                              max_prompt_length=1024, chat_template=False, step_separator="\n\n")
    for k, name in enumerate(("acc", "style")):  # each output fits its own column better than 0
        err = tot = 0.0
        for it in items:
            for pos, label in zip(it.positions, it.labels):
                err += (prm.score_full([it.ids[:pos + 1]], objectives=name).item() - label[k]) ** 2
                tot += label[k] ** 2
        assert err < 0.5 * tot, name
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a"], "labels": [0.5]}) + "\n")
    # User errors end the CLI with a one-line message and a non-zero status.
    for loss, match, out_dir in (("mse", "list of 2 floats", "o2"), ("bce", "needs --loss mse", "o3")):
        rc = prm_train.main(["--model", str(tiny_checkpoint("qwen2")), "--data", str(bad), "--loss", loss,
                             "--objectives", "acc,style", "--out", str(tmp_path / out_dir),
                             "--max-steps", "1"])
        assert rc != 0 and match in capsys.readouterr().err


@pytest.mark.parametrize("reduction", ["examples", "steps"])
def test_prm_mse_reduction_on_ragged_steps_matches_hand_value(tmp_path, reduction):
    """With lr 0 the logged MSE is, by default, each example's mean over its steps then the mean
    over examples (the paper's); --mse-reduction steps is one flat mean. Steps per example: 1, 3."""
    import math

    model = tiny_checkpoint("qwen2")
    rows = [{"prompt": "Q0:", "completions": ["A."], "labels": [2.0]},
            {"prompt": "Q1:", "completions": ["B.", "C.", "D."], "labels": [0.0, 0.5, -1.0]}]
    data = tmp_path / "steps.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert prm_train.main(["--model", str(model), "--data", str(data), "--loss", "mse", "--out", str(out),
                           "--max-steps", "1", "--batch-size", "2", "--lr", "0", "--head", "linear",
                           "--mse-reduction", reduction]) == 0
    log = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    prm = load_prm(out)
    tok = prm.tokenizer
    per_example = []
    for r in rows:
        ids = tok(r["prompt"])["input_ids"]
        errs = []
        for step, y in zip(r["completions"], r["labels"]):
            ids = ids + tok(step + "\n\n", add_special_tokens=False)["input_ids"]
            errs.append((prm.value_head(prm.model(torch.tensor([ids]))[0, -1]).item() - y) ** 2)
        per_example.append(errs)
    if reduction == "examples":
        hand = sum(sum(e) / len(e) for e in per_example) / len(per_example)
    else:
        hand = sum(sum(e) for e in per_example) / sum(len(e) for e in per_example)
    assert math.isfinite(hand)
    assert log["mse"] == pytest.approx(hand, rel=1e-4)
    assert log["loss"] == pytest.approx(hand, rel=1e-4)
