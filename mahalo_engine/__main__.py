"""Command line: ``python -m mahalo_engine search|generate ...`` (see ``--help`` of each)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _unescape(text: str) -> str:
    r"""Shell-friendly escapes: '\n\n' on the command line means two newlines."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mahalo_engine",
        description="MAHALO engine: multi-head policy generation and PRM-guided step search.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", required=True, type=Path,
                        help="policy: a Hugging Face model directory")
        sp.add_argument("--heads", type=Path, default=None,
                        help="mahalo heads file (default: <model>/mahalo_heads.safetensors if "
                             "present, else the checkpoint's lm_head)")
        src = sp.add_mutually_exclusive_group(required=True)
        src.add_argument("--prompt", help="one prompt")
        src.add_argument("--prompts", type=Path,
                         help='jsonl file, one request per line: {"prompt": str} or '
                              '{"messages": [{"role", "content"}, ...]} (chat), optionally with '
                              '"head_weights": [...]')
        sp.add_argument("--weights", type=_floats, default=None,
                        help="head weights for every prompt, e.g. 0.7,0.3 (default: uniform)")
        sp.add_argument("--chat", action="store_true",
                        help="render --prompt / 'prompt' strings as a user turn with the chat "
                             "template ('messages' always are)")
        sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on generated tokens per request (default: 256 for generate, "
                             "4096 for search)")
        sp.add_argument("--stop", action="append", default=None, type=_unescape,
                        help="stop string (repeatable; escapes such as \\n are decoded)")
        sp.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
        sp.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
        sp.add_argument("--max-batch", type=int, default=8, help="requests decoded at once")
        sp.add_argument("--max-seq-len", type=int, default=4096,
                        help="cap on prompt + generated tokens")
        sp.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
        sp.add_argument("--out", type=Path, default=None,
                        help="write one JSON result per line here instead of printing text")

    g = sub.add_parser("generate", help="sample a continuation of each prompt",
                       description="Batched generation with per-request head weights.")
    common(g)
    g.add_argument("--top-k", type=int, default=0, help="0 = no truncation")

    s = sub.add_parser("search", help="PRM-guided step search",
                       description="Per step: K candidates per request from the running cache "
                                   "until a boundary, scored by the PRM(s); the best is kept.")
    common(s)
    s.add_argument("--cache-layout", choices=("fork", "shared_prefix"), default="fork",
                   help="policy KV layout: fork = K full copies per request; shared_prefix = one "
                        "copy + K step-sized slots, cascade attention (less memory)")
    s.add_argument("--prm", action="append", type=Path, default=None,
                   help="PRM directory (repeatable: several PRMs guide together)")
    s.add_argument("--prm-weights", type=_floats, default=None,
                   help="one weight per --prm, e.g. 0.7,0.3 (default: 1 each)")
    s.add_argument("-k", "--candidates", type=int, default=5, help="candidates per step")
    s.add_argument("--boundary", action="append", type=_unescape, default=None,
                   help="where a step ends: a string such as '\\n\\n' (escapes decoded) or a "
                        "preset: math, sentence, paragraph, turn (repeatable; default '\\n\\n')")
    s.add_argument("--max-steps", type=int, default=20)
    s.add_argument("--max-step-tokens", type=int, default=512)
    s.add_argument("--top-k", type=int, default=50, help="0 = no truncation")
    s.add_argument("--selection-temperature", type=float, default=0.0,
                   help="0 = keep the best candidate; >0 = sample it from softmax(score/τ)")
    s.add_argument("--stop-boxed", action="store_true",
                   help="end a request once it holds a closed \\boxed{...} (math)")
    s.add_argument("--check-every", type=int, default=8,
                   help="decode steps between the host's all-finished checks")
    return p


def _requests(args: argparse.Namespace) -> tuple[list[Any], list[list[float]] | None]:
    if args.prompt is not None:
        return [args.prompt], None
    prompts, weights = [], []
    for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SystemExit(f"{args.prompts}:{n}: not valid JSON ({e})") from None
        if "messages" in row:
            prompts.append(row["messages"])
        elif "prompt" in row:
            prompts.append(row["prompt"])
        else:
            raise SystemExit(f"{args.prompts}:{n}: expected a 'prompt' or 'messages' field")
        weights.append(row.get("head_weights", args.weights))
    if not prompts:
        raise SystemExit(f"{args.prompts}: no requests")
    if all(w is None for w in weights):
        return prompts, None
    if any(w is None for w in weights):
        raise SystemExit(f"{args.prompts}: give head_weights on every line or on none (or use "
                         f"--weights for the rest)")
    return prompts, weights


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError) as e:  # bad input: a message, no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")


def _run(args: argparse.Namespace) -> int:
    import torch

    from mahalo_engine.engine import Engine, SearchConfig, boxed_closed
    from mahalo_engine.policy import load_policy

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    policy = load_policy(args.model, heads=args.heads, dtype=dtype, device=device)
    prompts, weights = _requests(args)
    head_weights = weights if weights is not None else args.weights
    prm = None
    if args.command == "search" and args.prm:
        from mahalo_engine.prm import load_prm

        prms = [load_prm(p, dtype=dtype, device=device) for p in args.prm]
        ws = args.prm_weights or [1.0] * len(prms)
        if len(ws) != len(prms):
            raise SystemExit(f"--prm-weights has {len(ws)} values for {len(prms)} --prm")
        prm = prms[0] if len(prms) == 1 and ws[0] == 1.0 else list(zip(prms, ws))
    engine = Engine(policy, prm=prm, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    cuda_graphs=not args.no_cuda_graphs,
                    cache_layout=getattr(args, "cache_layout", "fork"))

    if args.command == "generate":
        results = engine.generate(prompts, head_weights=head_weights,
                                  max_new_tokens=args.max_new_tokens or 256,
                                  temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                                  stop=args.stop, chat=args.chat, progress=True)
        rows = [{"prompt": p, "text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs,
                 "finish_reason": r.finish_reason} for p, r in zip(prompts, results)]
    else:
        stop = list(args.stop or []) + ([boxed_closed] if args.stop_boxed else [])
        cfg = SearchConfig(
            candidates=args.candidates, boundary=args.boundary or "\n\n",
            max_step_tokens=args.max_step_tokens, max_steps=args.max_steps,
            max_new_tokens=args.max_new_tokens or 4096, temperature=args.temperature,
            top_k=args.top_k, seed=args.seed, selection_temperature=args.selection_temperature,
            stop=stop, check_every=args.check_every)
        results = engine.search(prompts, head_weights=head_weights, config=cfg, chat=args.chat,
                                progress=True)
        rows = [{"prompt": p, "text": r.text, "token_ids": r.token_ids,
                 "finish_reason": r.finish_reason,
                 "steps": [vars(s) for s in r.steps]} for p, r in zip(prompts, results)]

    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        print(f"{len(rows)} results written to {args.out}", file=sys.stderr)
        return 0
    for i, row in enumerate(rows):
        print(f"=== request {i} ({row['finish_reason']}, {len(row['token_ids'])} tokens)")
        for j, step in enumerate(row.get("steps", [])):
            cands = ", ".join(f"{c:.4g}" for c in step["candidate_scores"])
            print(f"--- step {j + 1}: score {step['score']:.4g} (candidates {cands}; "
                  f"{step['finish_reason']})")
            print(step["text"])
        if "steps" not in row:
            print(row["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
