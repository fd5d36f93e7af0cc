"""Graph vs eager at full size: `python -m bench.graph_check [--out FILE.json]` (CUDA only).

The decode graphs' first real-size test: Qwen2.5-0.5B's shape (random init, nothing downloaded;
V = 151936) in bf16, two heads, ``Engine.generate`` with and without CUDA graphs on the same
prompts, for greedy and sampled decoding on the general (distinct weights per request) and the
merged-heads (one shared weight vector) paths. Reports, per case: whether the tokens agree, where
the first disagreement is, the largest |Δ log-prob| over the common prefix (bf16 GEMMs over a
padded slot bucket may round differently from eager, so an early near-tie can flip a token: a
small Δ with a late split is rounding, a large Δ is a bug), wall times of the first call
(captures and Triton compiles included) and of a second one, each graph capture's time, and the
peak reserved memory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from bench.decode import QWEN25_05B
from mahalo_engine.engine import Engine
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.policy import Policy
from mahalo_engine.tiny import tiny_checkpoint

PROMPT_LENGTHS = (17, 64, 129, 300, 5, 250, 33)  # 7 requests: a slot bucket of 8 runs 1 padding row
NEW_TOKENS = 96


def _policy(dtype: torch.dtype, device: str = "cuda", shape: dict | None = None):
    from transformers import AutoConfig, AutoTokenizer

    cfg = ModelConfig.from_dict(AutoConfig.for_model(**(shape or QWEN25_05B)).to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = Decoder(cfg)
        for name, p in model.named_parameters():  # the published init scale, not nn defaults
            if name.endswith("norm.weight"):
                torch.nn.init.ones_(p)
            else:
                torch.nn.init.normal_(p, std=0.02)
    model = model.to(dtype).eval()
    emb = model.model.embed_tokens.weight.detach()
    heads = torch.stack([emb, emb + 0.01 * torch.randn_like(emb)])
    # Token ids are fed directly; the tiny tokenizer only decodes texts nobody reads here.
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    return Policy(model, tok, heads, ["acc", "eng"])


def _compare(a, b) -> dict:
    first, delta = None, 0.0
    for i, (ga, gb) in enumerate(zip(a, b)):
        n = next((j for j, (x, y) in enumerate(zip(ga.token_ids, gb.token_ids)) if x != y),
                 None)
        if n is None and len(ga.token_ids) != len(gb.token_ids):
            n = min(len(ga.token_ids), len(gb.token_ids))
        if n is not None and (first is None or n < first[1]):
            first = (i, n)
        m = n if n is not None else len(ga.token_ids)
        if m:
            delta = max(delta, max(abs(x - y) for x, y in zip(ga.logprobs[:m], gb.logprobs[:m])))
    return {"tokens_equal": first is None,
            "first_divergence": None if first is None else {"request": first[0], "token": first[1]},
            "max_abs_dlogprob": delta}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(device: str = "cuda", shape: dict | None = None) -> dict:
    policy = _policy(torch.bfloat16, device, shape)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, policy.config.vocab_size, (n,), generator=gen).tolist()
               for n in PROMPT_LENGTHS]
    distinct = [[1.0 - i / 8, i / 8] for i in range(len(prompts))]
    engines = {g: Engine(policy, max_batch=8, max_seq_len=512, cuda_graphs=g) for g in (True, False)}
    cases = {
        "greedy, distinct weights": dict(head_weights=distinct, temperature=0),
        "greedy, shared weights (merged)": dict(head_weights=[0.3, 0.7], temperature=0),
        "top-k 50, distinct weights": dict(head_weights=distinct, temperature=1.0, top_k=50, seed=3),
        "T=0.7, shared weights (merged)": dict(head_weights=[0.5, 0.5], temperature=0.7, seed=4),
    }
    rows = []
    for name, kw in cases.items():
        row = {"case": name}
        outs = {}
        for g, engine in engines.items():
            times = []
            for _ in range(2):
                _sync(device)
                t0 = time.perf_counter()
                outs[g] = engine.generate(prompts, max_new_tokens=NEW_TOKENS, **kw)
                _sync(device)
                times.append(time.perf_counter() - t0)
            row["graphs_s" if g else "eager_s"] = times
        row.update(_compare(outs[True], outs[False]))
        row["eager/graphs (2nd call)"] = row["eager_s"][1] / row["graphs_s"][1]
        rows.append(row)
        print(json.dumps(row), flush=True)
    runner = engines[True]._runner
    return {
        "model": "qwen2.5-0.5B-shaped (random init), bf16, 2 heads",
        "device": torch.cuda.get_device_name() if device == "cuda" else device,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompt_lengths": PROMPT_LENGTHS,
        "new_tokens": NEW_TOKENS,
        "cases": rows,
        "graphs_captured": len(runner._graphs),
        "capture_seconds": runner.capture_seconds,
        "max_memory_reserved_bytes": torch.cuda.max_memory_reserved() if device == "cuda" else 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.graph_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="JSON file for the report")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench.graph_check needs a CUDA device; torch sees none", file=sys.stderr)
        return 2
    report = run()
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    ok = all(r["tokens_equal"] or r["max_abs_dlogprob"] < 0.05 for r in report["cases"])
    print(f"graph vs eager: {'ok' if ok else 'MISMATCH'}; captures "
          f"{[round(s, 3) for s in report['capture_seconds']]} s; max reserved "
          f"{report['max_memory_reserved_bytes'] / 2**30:.2f} GiB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
