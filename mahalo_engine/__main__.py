"""Command line: ``python -m mahalo_engine search|generate ...`` (see ``--help`` of each).

The prompts run in chunks (``--chunk-size``), each one engine call; under ``torchrun`` the chunks
are sharded over ranks, one engine per rank on its device, and rank 0 writes the rows in input
order (``mahalo_engine.sharded``), so any number of processes writes the same ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from mahalo_engine.distributed import cleanup, exit_process
from mahalo_engine.models.loader import check_model_dir
from mahalo_engine.sharded import on_main, prepare_output, run_sharded, setup
from mahalo_engine.stop_conditions import boxed_closed
from mahalo_engine.utils.cli import (HelpFormatter, Interrupted, add_boundary_arg, add_debug_flag,
                                     parse_boundaries, run_cli, unescape)
from mahalo_engine.utils.outputs import (OutputLock, check_not_input, options_of,
                                         read_text_lines)

_DTYPES = ("float32", "bfloat16", "float16")
_RESULT_KEYS = ("text", "token_ids", "logprobs", "finish_reason", "steps", "generated_tokens",
                "scored_tokens", "beams")  # added to input rows
# Options that shape the rows written to --out: stored beside it (<out>.meta.json) and compared on
# --resume. Not here: where and how fast it runs (--device, --no-cuda-graphs, --check-every,
# --cache-layout, whose results are identical by design) and --prompts (checked row by row).
RESULT_OPTIONS = ("command", "model", "heads", "weights", "chat", "temperature", "seed",
                  "max_new_tokens", "stop", "dtype", "max_batch", "max_seq_len", "chunk_size",
                  "top_k", "top_p", "min_p")
SEARCH_RESULT_OPTIONS = ("prm", "prm_weights", "candidates", "beams", "subtrees", "boundary",
                         "max_steps", "max_step_tokens", "selection_temperature", "stop_boxed",
                         "candidate_head_weights")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _candidate_weights(text: str) -> float | list[list[float]]:
    """``--candidate-head-weights``: a bare number is a spread; else rows split by ';'."""
    if ";" not in text and "," not in text:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a spread in [0, 1] or rows such as "
                                             f"0.8,0.2;0.2,0.8, got {text!r}") from None
    return [_floats(row) for row in text.split(";")]


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
                             "printing text; an existing file is replaced once the first results "
                             "are ready, unless --resume; OUT.meta.json keeps the options the "
                             "results depend on, OUT.lock is held while the run writes")
        sp.add_argument("--resume", action="store_true",
                        help="keep the whole chunks --out already holds (an interrupted run) and "
                             "run the rest; refused when an option that shapes the results "
                             "differs from OUT.meta.json's")
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
    s.add_argument("-k", "--candidates", type=int, default=5,
                   help="candidates per step (per beam)")
    s.add_argument("--beams", type=int, default=1,
                   help="beam search: N partial solutions per request, each expanding -k "
                        "candidates per step; the N best of the N*K survive, finished ones are "
                        "set aside, the best finished one is the result (1 = greedy step "
                        "search). With N > 1 each row also gets \"beams\": every finished beam "
                        "{text, token_ids, score, finish_reason}, best first")
    s.add_argument("--subtrees", type=int, default=1,
                   help="diverse verifier tree search: split the --beams N beams into M "
                        "independent subtrees (M must divide N), each a beam search of N/M beams "
                        "with its own random streams; the best finished beam over all subtrees "
                        "is the result (1 = plain beam search)")
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
    s.add_argument("--candidate-head-weights", type=_candidate_weights, default=None,
                   metavar="ROWS|SPREAD",
                   help="each candidate samples with its own head weights: -k rows of one "
                        "weight per head, e.g. 0.8,0.2;0.2,0.8 (candidate k takes row k), or a "
                        "spread S in [0, 1] around each request's weights (candidate 0: the "
                        "request's; the others move toward each head in turn, the farthest by "
                        "S; see SearchConfig). The PRM scores every candidate alike (never by "
                        "its mix); each step records the winner's head_weights. Every row "
                        "carries generated_tokens (discarded candidates included) and "
                        "scored_tokens (the PRMs' prompt + candidate tokens)")
    return p


def _requests(args: argparse.Namespace) -> tuple[list[Any], list[Any] | None,
                                                list[dict[str, Any]], list[str]]:
    """(prompts, per-request head weights or None, the input rows, where each request comes from:
    ``file:line``) from --prompt / --prompts."""
    if args.prompt is not None:
        return [args.prompt], None, [{"prompt": args.prompt}], ["--prompt"]
    prompts, weights, rows, where = [], [], [], []
    for n, line in read_text_lines(args.prompts):
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
        w = row.get("head_weights", args.weights)
        if "head_weights" in row:
            _check_weights(w, f"{args.prompts}:{n}: head_weights")
        weights.append(w)
        rows.append(row)
        where.append(f"{args.prompts}:{n}")
    if not prompts:
        raise ValueError(f"{args.prompts}: no requests")
    if all(w is None for w in weights):
        return prompts, None, rows, where
    if any(w is None for w in weights):
        raise ValueError(f"{args.prompts}: give head_weights on every line or on none (or use "
                         f"--weights for the rest)")
    return prompts, weights, rows, where


def _check_weights(w: Any, what: str) -> None:
    """A list of finite numbers >= 0 (booleans are not numbers here: ``true`` is no weight)."""
    if not isinstance(w, list) or not w or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
        raise ValueError(f"{what} must be a non-empty list of numbers, got {json.dumps(w)}")
    if not all(math.isfinite(x) and x >= 0 for x in w) or not any(x > 0 for x in w):
        raise ValueError(f"{what} must be finite, >= 0 and not all zero, got {json.dumps(w)}")


def _check_candidate_weights(w: float | list[list[float]] | None, k: int) -> None:
    """--candidate-head-weights before any model loads (the head count is checked once the
    policy is loaded)."""
    if w is None:
        return
    if isinstance(w, float):
        if not (math.isfinite(w) and 0 <= w <= 1):
            raise ValueError(f"--candidate-head-weights as a spread must be in [0, 1], got {w}")
        return
    if len(w) != k:
        raise ValueError(f"--candidate-head-weights has {len(w)} rows for -k {k}: give one row "
                         f"of head weights per candidate (rows separated by ';')")
    for j, row in enumerate(w):
        _check_weights(row, f"--candidate-head-weights row {j}")
    if len({len(row) for row in w}) > 1:
        raise ValueError(f"--candidate-head-weights rows have {[len(r) for r in w]} weights: "
                         f"every row needs one weight per head")


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
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0 = no truncation), got {args.top_k}")
    if args.weights is not None:
        _check_weights(args.weights, "--weights")
    check_model_dir(args.model)
    for prm in args.prm if args.command == "search" and args.prm else ():
        check_model_dir(prm, "--prm")
    if args.out is not None:
        check_not_input(args.out, {"--prompts": args.prompts, "--model": args.model,
                                   "--heads": args.heads})
    if args.command != "search":
        return
    for name in ("candidates", "beams", "subtrees", "max_steps", "max_step_tokens",
                 "check_every"):
        if getattr(args, name) < 1:
            flag = "-k" if name == "candidates" else f"--{name.replace('_', '-')}"
            raise ValueError(f"{flag} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.selection_temperature) and args.selection_temperature >= 0):
        raise ValueError(f"--selection-temperature must be a finite number >= 0, got "
                         f"{args.selection_temperature}")
    if args.prm_weights is not None and not all(math.isfinite(w) for w in args.prm_weights):
        raise ValueError(f"--prm-weights must be finite, got {args.prm_weights}")
    if args.candidates > 1 and not args.prm:
        raise ValueError(f"search with -k {args.candidates} needs a PRM to pick the winner among "
                         f"the candidates: pass --prm DIR (or -k 1 for plain step-wise decoding)")
    if args.beams > 1 and not args.prm:
        raise ValueError(f"search with --beams {args.beams} needs a PRM to rank the beams: pass "
                         f"--prm DIR")
    if args.beams % args.subtrees:
        raise ValueError(f"--subtrees {args.subtrees} must divide --beams {args.beams} (each "
                         f"subtree is a beam search of beams / subtrees beams)")
    if args.prm_weights is not None and len(args.prm_weights) != len(args.prm or ()):
        raise ValueError(f"--prm-weights has {len(args.prm_weights)} values for "
                         f"{len(args.prm or ())} --prm")
    _check_candidate_weights(args.candidate_head_weights, args.candidates)
    parse_boundaries(args.boundary)  # a bad --boundary fails before any model loads


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    _check_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    info = setup(args.device)
    # Rank 0 writes --out, so it alone holds the lock; a refused lock stops every rank.
    lock = OutputLock(args.out) if args.out is not None else None
    try:
        on_main(lambda: lock.acquire() if lock is not None else None, info)
        return _run_rank(args, info)
    finally:
        if lock is not None:
            lock.release()
        cleanup(info)


def _options(args: argparse.Namespace, chunk: int, dtype: Any) -> dict[str, Any]:
    """The result-shaping options (`RESULT_OPTIONS`) as stored beside --out."""
    names = RESULT_OPTIONS + (SEARCH_RESULT_OPTIONS if args.command == "search" else ())
    opts = options_of(args, names)
    opts["chunk_size"] = chunk
    opts["dtype"] = str(dtype).replace("torch.", "")  # the default depends on the device
    # Where the models are, not how the paths were spelled (a resume may run from elsewhere).
    opts["model"] = str(args.model.resolve())
    opts["heads"] = None if args.heads is None else str(args.heads.resolve())
    if args.command == "search":
        opts["prm"] = [str(p.resolve()) for p in args.prm or ()]
    return opts


def _run_rank(args: argparse.Namespace, info: Any) -> int:
    """This process's part of the run: the prompts cut into chunks of --chunk-size, chunk c one
    engine call with seed --seed + c on rank ``c mod world`` (`mahalo_engine.sharded`); rank 0
    writes or prints the rows in input order. --out is only checked here: it changes when the
    first chunk's rows are ready, so an error before then leaves it as it was."""
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
    prompts, weights, inputs, where = _requests(args)
    chunk = args.chunk_size if args.chunk_size is not None else 8 * args.max_batch
    output = None
    if args.out is not None:
        def same_input(i: int, row: dict[str, Any]) -> bool:
            return all(row.get(k) == v for k, v in inputs[i].items() if k not in _RESULT_KEYS)

        output = on_main(lambda: prepare_output(
            args.out, [1] * len(prompts), same_input, resume=args.resume,
            overwrite=not args.resume, item="prompt", items="prompts",
            afresh="a run without --resume", align=chunk, options=_options(args, chunk, dtype)), info)
    done = output.done if output is not None else 0
    policy = load_policy(args.model, heads=args.heads, dtype=dtype, device=device)
    # Head weights are checked against the loaded heads before any prompt runs.
    request_weights = policy.weight_matrix(weights if weights is not None else args.weights,
                                           len(prompts) if weights is not None else 1)
    if args.command == "search" and args.candidate_head_weights is not None:
        _search_config(args, args.seed).candidate_weights(request_weights.cpu())
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
        try:
            rows = _results(args, engine, prompts[lo:hi], w, args.seed + c)
        except (ValueError, TypeError, FloatingPointError) as e:
            raise _in_file(e, lo, where) from None
        # Each output row is its input row (its "id" and any other field) plus the result.
        return [{**src, **row} for src, row in zip(inputs[lo:hi], rows)]

    written = done
    bar = tqdm(total=len(prompts), initial=done, desc=args.command, unit="prompt",
               disable=not info.is_main)

    def write(c: int, rows: list[dict[str, Any]]) -> None:
        nonlocal written
        if output is not None:
            output.append(rows)
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


def _in_file(e: Exception, first: int, where: list[str]) -> Exception:
    """An engine error about "prompt i" of a chunk, renamed to the request's place in the input
    (its index and ``file:line``)."""
    def name(m: re.Match) -> str:
        i = first + int(m.group(1))
        return f"prompt {i} ({where[i]})" if i < len(where) else m.group(0)

    return type(e)(re.sub(r"\bprompt (\d+)\b", name, str(e), count=1))


def _results(args: argparse.Namespace, engine: Any, prompts: list[Any], head_weights: Any,
             seed: int) -> list[dict[str, Any]]:
    """One chunk's result rows: one engine call."""
    if args.command == "generate":
        max_new = 256 if args.max_new_tokens is None else args.max_new_tokens
        try:
            results = engine.generate(prompts, head_weights=head_weights, max_new_tokens=max_new,
                                      temperature=args.temperature, top_k=args.top_k,
                                      top_p=args.top_p, min_p=args.min_p, seed=seed,
                                      stop=args.stop, chat=args.chat)
        except FloatingPointError as e:
            raise FloatingPointError(f"model {args.model}: {e}; check its weights and "
                                     f"config.json (or use --dtype float32)") from None
        for i, r in enumerate(results):
            bad = next((t for t, lp in enumerate(r.logprobs) if not math.isfinite(lp)), None)
            if bad is not None:
                raise FloatingPointError(
                    f"prompt {i}: model {args.model} produced non-finite logits (log-prob "
                    f"{r.logprobs[bad]}) at generated token {bad}; check its weights and "
                    f"config.json (or use --dtype float32)")
        return [{"text": r.text, "token_ids": r.token_ids, "logprobs": r.logprobs,
                 "finish_reason": r.finish_reason, "generated_tokens": r.generated_tokens}
                for r in results]
    cfg = _search_config(args, seed)
    try:
        results = engine.search(prompts, head_weights=head_weights, config=cfg, chat=args.chat)
    except FloatingPointError as e:
        raise FloatingPointError(f"model {args.model}: {e}; check its weights and config.json (or "
                                 f"use --dtype float32)") from None
    rows = [{"text": r.text, "token_ids": r.token_ids, "finish_reason": r.finish_reason,
             "generated_tokens": r.generated_tokens, "scored_tokens": r.scored_tokens,
             "steps": [_step_row(args, i, vars(s)) for s in r.steps]}
            for i, r in enumerate(results)]
    if args.beams > 1:  # (one beam: the row itself; rows stay as they were before beams)
        for row, r in zip(rows, results):
            row["beams"] = [{"text": b.text, "token_ids": b.token_ids, "score": _finite(b.score),
                             "finish_reason": b.finish_reason} for b in r.beams]
    return rows


def _search_config(args: argparse.Namespace, seed: int) -> Any:
    """The `SearchConfig` of the search options (one chunk's ``seed``)."""
    # Imported here, as in `_run_rank`: the engine package costs seconds to import.
    from mahalo_engine.engine import SearchConfig

    stop = list(args.stop or []) + ([boxed_closed] if args.stop_boxed else [])
    return SearchConfig(
        candidates=args.candidates, beams=args.beams, subtrees=args.subtrees,
        boundary=parse_boundaries(args.boundary),
        max_step_tokens=args.max_step_tokens, max_steps=args.max_steps,
        max_new_tokens=4096 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        seed=seed, selection_temperature=args.selection_temperature, stop=stop,
        check_every=args.check_every, candidate_head_weights=args.candidate_head_weights)


def _step_row(args: argparse.Namespace, i: int, step: dict[str, Any]) -> dict[str, Any]:
    """A search step for JSON, where NaN and infinity cannot go: a score that is not a number is
    null (no PRM: -k 1 keeps no score; an unscorable candidate: -inf), but a NaN from a PRM is an
    error naming it."""
    scores = [step["score"], *step["candidate_scores"]]
    if args.prm and any(isinstance(x, float) and math.isnan(x) for x in scores):
        raise FloatingPointError(f"prompt {i}: the PRM ({', '.join(map(str, args.prm))}) gave a "
                                 f"NaN score; check its weights")
    return {**step, "score": _finite(step["score"]),
            "candidate_scores": [_finite(x) for x in step["candidate_scores"]]}


def _finite(x: Any) -> Any:
    """A score for JSON: a non-finite float (no score, or unscorable) is null."""
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _score(x: float | None) -> str:
    return "unscorable" if x is None else f"{x:.4g}"


def _print_rows(rows: list[dict[str, Any]], first: int) -> None:
    for i, row in enumerate(rows, first):
        spent = f"; generated {row['generated_tokens']}" + (
            f", scored {row['scored_tokens']}" if "scored_tokens" in row else "")
        print(f"=== request {i} ({row['finish_reason']}, {len(row['token_ids'])} tokens{spent})")
        for j, step in enumerate(row.get("steps", [])):
            cands = ", ".join(_score(c) for c in step["candidate_scores"])
            mix = ",".join(f"{w:.3g}" for w in step["head_weights"])
            print(f"--- step {j + 1}: score {_score(step['score'])} (candidates {cands}; "
                  f"{step['finish_reason']}; head weights {mix})")
            print(step["text"])
        if "steps" not in row:
            print(row["text"])
        for j, beam in enumerate(row.get("beams", [])):
            print(f"--- finished beam {j + 1}: score {_score(beam['score'])} "
                  f"({beam['finish_reason']}, {len(beam['token_ids'])} tokens)")


if __name__ == "__main__":
    exit_process(main())
