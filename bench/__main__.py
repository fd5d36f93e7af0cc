"""`python -m bench [--quick] [--device cuda] [--sections decode,heads,...] [--model DIR]`.

Runs each benchmark section, prints a markdown table per section and writes every row, with the
device name, torch version and date, to ``bench/results/local/bench-<device>-<date>.json`` (ignored
by git; recorded runs are copied to ``bench/results/``). The JSON is
rewritten after every section (atomically), so a run cut short keeps the sections it finished;
each section records its wall time and, on CUDA, the peak reserved memory.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import BenchContext, markdown_table
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag, resolve_device, run_cli

# Local runs land in an ignored folder, so `python -m bench` never dirties `git status`;
# bench/results/ itself holds recorded runs only (GPU runs with the card named, full quality runs).
LOCAL_RESULTS = Path(__file__).resolve().parent / "results" / "local"

# Section name -> what it compares. Each lives in bench/<name>.py and exposes run(ctx) -> rows.
SECTIONS = {
    "decode": "decode-step latency: our slot-cache decoder vs transformers, same weights and batch",
    "heads": "the multihead op (triton_kernels.multihead): fused H-head projection + sampling vs "
             "torch eager paths",
    "kv": "KV-cache promote cost vs prefix length: ours vs deepcopy vs whole-slot copies",
    "train": "MAH-DPO step time/memory: ours vs the reference structure",
    "search": "PRM-guided step search: ours vs re-encode vs the paper's loop",
    "quality": "the paper's results in miniature: SFT, DPO/MAH-DPO, MC-value PRM, guided search "
               "on generated arithmetic problems (acc vs style)",
    "attention": "the cascade op (triton_kernels.cascade): K-candidate decode attention vs prefix "
                 "length, cascade (shared prefix) vs SDPA on the forked layout, with the bandwidth "
                 "floor",
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=HelpFormatter,
        description="Latency/memory comparisons of the MAHALO engine against the baselines it "
        "replaces. Sections: " + "; ".join(f"{k}: {v}" for k, v in SECTIONS.items()),
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (CPU: < 2 minutes)")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of: {','.join(SECTIONS)} (default: all; quality "
                   "then runs its quick form, its full 3-seed form when named here without --quick)")
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory for the model-level sections "
                   "(default: the built-in tiny Qwen2-shaped checkpoint, built locally)")
    p.add_argument("--large", action="store_true",
                   help="on CPU, also run the rows at real model shapes (decode: Qwen2.5-0.5B-shaped "
                   "engine steps; about 9 more minutes on 2 cores); always on with --device cuda")
    p.add_argument("--keep-going", action="store_true",
                   help="after a section fails, record its error in the JSON and run the next "
                   "ones (exit status 1 at the end); default: stop at the first failure")
    p.add_argument("--append", action="store_true",
                   help="keep the sections already in --out (a run split over several calls)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: bench/results/local/bench-<device>-<date>.json, "
                   "ignored by git); the quality section writes its markdown, PNG and generations "
                   "beside it")
    p.add_argument("--no-cache", action="store_true",
                   help="quality section: retrain its cached artefacts instead of reusing them")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    device = resolve_device(args.device)
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if args.model is not None and not (args.model / "config.json").is_file():
        what = "no config.json in" if args.model.is_dir() else "no such model directory:"
        raise FileNotFoundError(f"--model: {what} {args.model} (a local Hugging Face model "
                                f"directory; nothing is downloaded)")

    if device.type == "cpu":
        # Two shared cores make multi-threaded CPU timings swing wildly; one thread is steadier and
        # fair to both sides of every comparison.
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bars clutter the tables
    model_dir = args.model
    if model_dir is None:
        model_dir = tiny_checkpoint("qwen2")
    ctx = BenchContext(device=device, quick=args.quick, model_dir=Path(model_dir), large=args.large,
                       no_cache=args.no_cache, all_sections=args.sections is None)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    report = {
        "device": ctx.device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": stamp.isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": str(model_dir),
        "sections": {},
    }
    out = args.out
    if out is None:
        tag = "cuda-" + ctx.device_name.replace(" ", "_") if ctx.is_cuda else "cpu"
        out = LOCAL_RESULTS / f"bench-{tag}-{stamp:%Y%m%d-%H%M%S}.json"
    ctx.out = out
    if args.append:
        if args.out is None:
            raise ValueError("--append needs --out FILE.json (the file to add sections to)")
        if out.exists():
            report["sections"] = json.loads(out.read_text()).get("sections", {})
    failed: list[str] = []
    print(f"# MAHALO bench — {ctx.device_name}, torch {torch.__version__}, {report['date']}\n")
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        ctx.notes = []
        print(f"## {name}: {SECTIONS[name]}\n", flush=True)
        if ctx.is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        try:
            rows = module.run(ctx)
        except Exception as e:
            if not args.keep_going:
                raise
            import traceback

            traceback.print_exc()
            failed.append(name)
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}",
                                        "seconds": round(time.perf_counter() - started, 2)}
            _write_json(out, report)
            continue
        print(markdown_table(rows))
        for n in ctx.notes:
            print(f"\n> {n}")
        print(flush=True)
        report["sections"][name] = {
            "rows": rows, "notes": list(ctx.notes),
            "seconds": round(time.perf_counter() - started, 2),
            "max_memory_reserved": torch.cuda.max_memory_reserved(device) if ctx.is_cuda else None,
        }
        _write_json(out, report)
    print(f"results written to {out}")
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _write_json(path: Path, report: dict) -> None:
    """Replace ``path`` atomically: a reader (or a run killed mid-write) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
