"""Command line: ``python -m mahalo_engine search|generate ...`` (see ``--help`` of each).

The prompts run in chunks (``--chunk-size``), each one engine call; under ``torchrun`` the chunks
are sharded over ranks, one engine per rank on its device, and rank 0 writes the rows in input
order (``mahalo_engine.sharded``), so any number of processes writes the same ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mahalo_engine.distributed import cleanup
from mahalo_engine.sharded import append_jsonl, on_main, prepare_output, run_sharded, setup
from mahalo_engine.stop_conditions import boxed_closed
from mahalo_engine.utils.cli import (HelpFormatter, Interrupted, add_boundary_arg, add_debug_flag,
                                     parse_boundaries, resolve_device, run_cli, unescape)

_DTYPES = ("float32", "bfloat16", "float16")
_RESULT_KEYS = ("text", "token_ids", "logprobs", "finish_reason", "steps")  # added to input rows


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mahalo_engine", formatter_class=HelpFormatter,
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
                              '"head_weights": [...]; other fields (e.g. "id") are copied to '
                              'the --out rows')
        sp.add_argument("--weights", type=_floats, default=None,
                        help="head weights for every prompt, e.g. 0.7,0.3 (default: uniform)")
        sp.add_argument("--chat", action="store_true",
                        help="render --prompt / 'prompt' strings as a user turn with the chat "
                             "template ('messages' always are)")
        sp.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        sp.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus: keep the smallest top set of tokens whose probability "
                             "reaches P (after --top-k), in (0, 1]; 1 = off")
        sp.add_argument("--min-p", type=float, default=0.0,
                        help="keep tokens with probability >= P times the top token's, in "
                             "[0, 1]; 0 = off")
        sp.add_argument("--seed", type=int, default=0, help="sampling seed")
        sp.add_argument("--max-new-tokens", type=int, default=None,
                        help="cap on generated tokens per request (default: 256 for generate, "
                             "4096 for search)")
        sp.add_argument("--stop", action="append", default=None, type=unescape,
                        help="stop string (repeatable; escapes such as \\n are decoded)")
        sp.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda if available; under torchrun each rank "
                             "uses cuda:LOCAL_RANK)")
        sp.add_argument("--dtype", choices=_DTYPES, default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
        sp.add_argument("--max-batch", type=int, default=8, help="requests decoded at once")
        sp.add_argument("--max-seq-len", type=int, default=None,
                        help="cap on prompt + generated tokens (default: the model's "
                             "max_position_embeddings, at most 4096)")
        sp.add_argument("--no-cuda-graphs", action="store_true", help="run the decode step eagerly")
        sp.add_argument("--out", type=Path, default=None,
                        help="write one JSON result per line here (in input order) instead of "
                             "printing text; replaced unless --resume")
        sp.add_argument("--resume", action="store_true",
                        help="keep the whole chunks --out already holds (an interrupted run with "
                             "the same arguments) and run the rest")
        sp.add_argument("--chunk-size", type=int, default=None,
                        help="prompts per engine call: chunk c samples with seed --seed + c, so "
                             "results depend on the chunk size (as on --max-batch) but not on the "
                             "number of torchrun processes, which run chunks in parallel "
                             "(default: 8 x --max-batch)")
        add_debug_flag(sp)

    g = sub.add_parser("generate", help="sample a continuation of each prompt",
                       formatter_class=HelpFormatter,
                       description="Batched generation with per-request head weights.")
    common(g)
    g.add_argument("--top-k", type=int, default=0, help="0 = no truncation")

    s = sub.add_parser("search", help="PRM-guided step search", formatter_class=HelpFormatter,
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
    add_boundary_arg(s)
    s.add_argument("--max-steps", type=int, default=20, help="steps per request")
    s.add_argument("--max-step-tokens", type=int, default=512, help="tokens per step")
    s.add_argument("--top-k", type=int, default=50, help="0 = no truncation")
    s.add_argument("--selection-temperature", type=float, default=0.0,
                   help="0 = keep the best candidate; >0 = sample it from softmax(score/τ)")
    s.add_argument("--stop-boxed", action="store_true",
                   help="end a request once it holds a closed \\boxed{...} (math)")
    s.add_argument("--check-every", type=int, default=8,
                   help="decode steps between the host's all-finished checks")
    return p


def _requests(args: argparse.Namespace
              ) -> tuple[list[Any], list[list[float]] | None, list[dict[str, Any]]]:
    """(prompts, per-request head weights or None, the input rows) from --prompt / --prompts."""
    if args.prompt is not None:
        return [args.prompt], None, [{"prompt": args.prompt}]
    prompts, weights, rows = [], [], []
    for n, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.prompts}:{n}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{args.prompts}:{n}: expected a JSON object, got "
                             f"{type(row).__name__}")
        if "messages" in row:
            prompts.append(row["messages"])
        elif "prompt" in row:
            prompts.append(row["prompt"])
        else:
            raise ValueError(f"{args.prompts}:{n}: expected a 'prompt' or 'messages' field")
        weights.append(row.get("head_weights", args.weights))
        rows.append(row)
    if not prompts:
        raise ValueError(f"{args.prompts}: no requests")
    if all(w is None for w in weights):
        return prompts, None, rows
    if any(w is None for w in weights):
        raise ValueError(f"{args.prompts}: give head_weights on every line or on none (or use "
                         f"--weights for the rest)")
    return prompts, weights, rows


def _check_args(args: argparse.Namespace) -> None:
    """Option errors worded for the command line, before any model is loaded."""
    if args.resume and args.out is None:
        raise ValueError("--resume continues an --out file: pass --out")
    for name in ("max_new_tokens", "max_seq_len", "max_batch", "chunk_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    # Imported here: triton_kernels imports Triton (seconds), which --help need not wait for.
    from triton_kernels.checks import check_probability

    check_probability("--top-p", args.top_p, 0.0, 1.0, True, 1, None)
    check_probability("--min-p", args.min_p, 0.0, 1.0, False, 1, None)
    for s in args.stop or ():
        if not s:
            raise ValueError("--stop: the stop string is empty; give a non-empty string such as "
                             "'\\n'")
    if args.command != "search":
        return
    if args.candidates > 1 and not args.prm:
        raise ValueError(f"search with -k {args.candidates} needs a PRM to pick the winner among "
                         f"the candidates: pass --prm DIR (or -k 1 for plain step-wise decoding)")
    if args.prm_weights is not None and len(args.prm_weights) != len(args.prm or ()):
        raise ValueError(f"--prm-weights has {len(args.prm_weights)} values for "
                         f"{len(args.prm or ())} --prm")
    parse_boundaries(args.boundary)  # a bad --boundary fails before any model loads


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    info = setup(args.device)
    try:
        return _run_rank(args, info)
    finally:
        cleanup(info)


def _run_rank(args: argparse.Namespace, info: Any) -> int:
    """This process's part of the run: the prompts cut into chunks of --chunk-size, chunk c one
    engine call with seed --seed + c on rank ``c mod world`` (`mahalo_engine.sharded`); rank 0 writes
    or prints the rows in input order."""
    import math

    import torch
    from tqdm.auto import tqdm

    # Imported here: the engine and Triton take seconds to import, which --help and a bad
    # argument need not wait for.
    from mahalo_engine.engine import Engine
    from mahalo_engine.policy import load_policy
    from mahalo_engine.value_model import load_prm

    device = info.device
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    prompts, weights, inputs = _requests(args)
    chunk = args.chunk_size if args.chunk_size is not None else 8 * args.max_batch
    done = 0
    if args.out is not None:
        def same_input(i: int, row: dict[str, Any]) -> bool:
            return all(row.get(k) == v for k, v in inputs[i].items() if k not in _RESULT_KEYS)

        done = on_main(lambda: prepare_output(
            args.out, [1] * len(prompts), same_input, resume=args.resume,
            overwrite=not args.resume, item="prompt", items="prompts",
            afresh="a run without --resume", align=chunk), info)
    policy = load_policy(args.model, heads=args.heads, dtype=dtype, device=device)
    prm = None
    if args.command == "search" and args.prm:
        prms = [load_prm(p, dtype=dtype, device=device) for p in args.prm]
        ws = args.prm_weights if args.prm_weights is not None else [1.0] * len(prms)
        prm = prms[0] if len(prms) == 1 and ws[0] == 1.0 else list(zip(prms, ws))
    engine = Engine(policy, prm=prm, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                    cuda_graphs=not args.no_cuda_graphs,
                    cache_layout=getattr(args, "cache_layout", "fork"))

    def work(c: int) -> list[dict[str, Any]]:
        lo, hi = c * chunk, min(len(prompts), (c + 1) * chunk)
        w = weights[lo:hi] if weights is not None else args.weights
        rows = _results(args, engine, prompts[lo:hi], w, args.seed + c)
        # Each output row is its input row (its "id" and any other field) plus the result.
        return [{**src, **row} for src, row in zip(inputs[lo:hi], rows)]

    written = done
    bar = tqdm(total=len(prompts), initial=done, desc=args.command, unit="prompt",
               disable=not info.is_main)

    def write(c: int, rows: list[dict[str, Any]]) -> None:
        nonlocal written
        if args.out is not None:
            append_jsonl(args.out, rows)
        else:
            _print_rows(rows, c * chunk)
        written += len(rows)
        bar.update(len(rows))

    try:
        run_sharded(math.ceil(len(prompts) / chunk), work, write, info, start=done // chunk)
    except KeyboardInterrupt:
        if info.is_main and args.out is not None:
            raise Interrupted(f"interrupted after {written} of {len(prompts)} prompts (kept in "
                              f"{args.out}); resume with --resume") from None
        raise
    finally:
        bar.close()
    if args.out is not None and info.is_main:
        print(f"{len(prompts)} results written to {args.out}", file=sys.stderr)
    return 0


def _results(args: argparse.Namespace, engine: Any, prompts: list[Any], head_weights: Any,
             seed: int) -> list[dict[str, Any]]:
    """One chunk's result rows: one engine call."""
    # Imported here, as in `_run_rank`: the engine package costs seconds to import.
    from mahalo_engine.engine import SearchConfig

    if args.command == "generate":
        max_new = 256 if args.max_new_tokens is None else args.max_new_tokens
        results = engine.generate(prompts, head_weights=head_weights, max_new_tokens=max_new,
                                  temperature=args.temperature, top_k=args.top_k,
                                  top_p=args.top_p, min_p=args.min_p, seed=seed,
                                  stop=args.stop, chat=args.chat)
        return [{"text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs,
                 "finish_reason": r.finish_reason} for r in results]
    stop = list(args.stop or []) + ([boxed_closed] if args.stop_boxed else [])
    cfg = SearchConfig(
        candidates=args.candidates,
        boundary=parse_boundaries(args.boundary),
        max_step_tokens=args.max_step_tokens, max_steps=args.max_steps,
        max_new_tokens=4096 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=seed, selection_temperature=args.selection_temperature, stop=stop,
        check_every=args.check_every)
    results = engine.search(prompts, head_weights=head_weights, config=cfg, chat=args.chat)
    return [{"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
             "steps": [vars(s) for s in r.steps]} for r in results]


def _print_rows(rows: list[dict[str, Any]], first: int) -> None:
    for i, row in enumerate(rows, first):
        print(f"=== request {i} ({row['finish_reason']}, {len(row['token_ids'])} tokens)")
        for j, step in enumerate(row.get("steps", [])):
            cands = ", ".join(f"{c:.4g}" for c in step["candidate_scores"])
            print(f"--- step {j + 1}: score {step['score']:.4g} (candidates {cands}; "
                  f"{step['finish_reason']})")
            print(step["text"])
        if "steps" not in row:
            print(row["text"])


if __name__ == "__main__":
    sys.exit(main())
