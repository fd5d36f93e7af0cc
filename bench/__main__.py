"""`python -m bench [--quick] [--device cuda] [--sections decode,heads,...] [--model DIR]`.

Runs each benchmark section, prints a markdown table per section and writes every row, with the
device name, torch version and date, to ``bench/results/local/bench-<device>-<date>.json`` (ignored
by git; recorded runs are copied to ``bench/results/``). The JSON is rewritten (atomically) after
every row a section yields and after every section, so a run cut short keeps what it measured: a
section interrupted (Ctrl-C, SIGINT/SIGTERM from a time limit) keeps its rows so far, marked
``"interrupted"``; one past its ``--budget`` is stopped between rows, marked ``"cut"``; one that
fails keeps its rows and its error. Each section records its wall time and, on CUDA, the peak
reserved memory.

A section (``bench/<name>.py``) exposes ``run(ctx)``: a generator of rows (each reaches the JSON as
it is produced) or a list of rows (written when the section returns).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import json
import sys
import time
from pathlib import Path

import torch

from tqdm.auto import tqdm

from bench.common import BenchContext, markdown_table, set_progress
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag, resolve_device, run_cli
from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.outputs import OutputLock, check_not_input

# Local runs land in an ignored folder, so `python -m bench` never dirties `git status`;
# bench/results/ itself holds recorded runs only (GPU runs with the card named, full quality runs).
LOCAL_RESULTS = Path(__file__).resolve().parent / "results" / "local"

# Section name -> what it compares. Each lives in bench/<name>.py and exposes run(ctx) -> rows.
SECTIONS = {
    "decode": "decode-step latency: our slot-cache decoder vs transformers, same weights and batch",
    "heads": "the multihead op (triton_kernels.multihead): fused H-head projection + sampling vs "
             "torch eager paths",
    "kv": "KV-cache promote cost vs prefix length: ours vs deepcopy vs whole-slot copies; a "
          "beam-search promote with 0, 1 and N-1 beams changing source, in both layouts",
    "train": "MAH-DPO step time/memory: ours vs the reference structure",
    "search": "PRM-guided step search: ours vs re-encode vs the paper's loop",
    "quality": "the paper's results in miniature: SFT, DPO/MAH-DPO, MC-value PRM, guided search "
               "on generated arithmetic problems (acc vs style)",
    "attention": "the cascade op (triton_kernels.cascade): K-candidate decode attention vs prefix "
                 "length, cascade (shared prefix) vs SDPA on the forked layout, with the bandwidth "
                 "floor",
    "scaling": "accuracy vs generated tokens of every test-time method (sampling, majority vote, "
               "best-of-N, step search, beam search, per-candidate head weights) on the quality "
               "task; runs only when named",
}
# Sections left out of the default list: they run only when --sections names them (scaling trains
# the quality pipeline's artefacts from an empty cache and measures for many minutes).
ON_REQUEST = ("scaling",)


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
                   help=f"comma-separated subset of: {','.join(SECTIONS)} (default: all but "
                   f"{','.join(ON_REQUEST)}, which run only when named; quality then runs its "
                   "quick form, its full 3-seed form when named here without --quick; scaling "
                   "runs its full 3-seed form unless --quick)")
    p.add_argument("--model", type=Path, default=None,
                   help="Hugging Face model directory for the model-level sections "
                   "(default: the built-in tiny Qwen2-shaped checkpoint, built locally)")
    p.add_argument("--large", action="store_true",
                   help="on CPU, also run the rows at real model shapes (decode: Qwen2.5-0.5B-shaped "
                   "engine steps; about 9 more minutes on 2 cores); always on with --device cuda")
    p.add_argument("--keep-going", action="store_true",
                   help="after a section fails, record its error in the JSON and run the next "
                   "ones (exit status 1 at the end); default: stop at the first failure")
    p.add_argument("--budget", type=_budgets, default={}, metavar="SECONDS|NAME=SECONDS,...",
                   help="wall-time budget per section: a bare number for every section, or "
                   "name=seconds pairs (e.g. decode=45,search=25). A section that yields its "
                   "rows is stopped at the first row past its budget and keeps its rows (marked "
                   "'cut'); one that returns a list cannot be stopped early (default: none)")
    p.add_argument("--append", action="store_true",
                   help="keep the sections already in --out (a run split over several calls)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: bench/results/local/bench-<device>-<date>.json, "
                   "ignored by git); the quality section writes its markdown, PNG and generations "
                   "beside it, the scaling section its .md and PNGs")
    p.add_argument("--no-cache", action="store_true",
                   help="quality and scaling sections: retrain their cached artefacts instead of "
                   "reusing them")
    add_debug_flag(p)
    return p.parse_args(argv)


def _budgets(spec: str) -> dict[str, float]:
    """``--budget``: "60" -> {"*": 60.0}; "decode=45,search=25" -> per section."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.rpartition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if seconds <= 0 or (name and name not in SECTIONS):
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected SECONDS > 0 or NAME=SECONDS with NAME one of "
                f"{','.join(SECTIONS)}")
        out[name or "*"] = seconds
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    device = resolve_device(args.device)
    default = ",".join(s for s in SECTIONS if s not in ON_REQUEST)
    names = [s.strip() for s in (args.sections or default).split(",") if s.strip()]
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
    check_not_input(out, {"--model": args.model})
    lock = OutputLock(out)
    lock.acquire()
    try:
        return _run_sections(args, ctx, names, report, out)
    finally:
        lock.release()


def _run_sections(args: argparse.Namespace, ctx: BenchContext, names: list[str], report: dict,
                  out: Path) -> int:
    if args.append:
        if args.out is None:
            raise ValueError("--append needs --out FILE.json (the file to add sections to)")
        if out.exists():
            report["sections"] = json.loads(out.read_text()).get("sections", {})
    failed: list[str] = []
    print(f"# MAHALO bench — {ctx.device_name}, torch {torch.__version__}, {report['date']}\n")
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        budget = args.budget.get(name, args.budget.get("*"))
        print(f"## {name}: {SECTIONS[name]}\n", flush=True)
        bar = tqdm(desc=f"{name}: measurements", unit="", leave=False, file=sys.stderr)
        set_progress(bar)
        try:
            _run_section(ctx, module, name, budget, report, out)
        except Exception:
            if not args.keep_going:
                raise
            import traceback

            traceback.print_exc()
            failed.append(name)
        finally:
            set_progress(None)
            bar.close()
    print(f"files written: {out}" + "".join(f", {f}" for f in ctx.files))
    if failed:
        print(f"sections that failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _run_section(ctx: BenchContext, module, name: str, budget: float | None, report: dict,
                 out: Path) -> None:
    """Run one section into ``report["sections"][name]``, rewriting ``out`` after each row it
    yields; on an interrupt or an error the rows so far are written first, then it propagates."""
    ctx.notes = []
    if ctx.is_cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    started = time.perf_counter()
    rows: list[dict] = []

    def save(**status) -> None:
        report["sections"][name] = {
            "rows": rows, "notes": list(ctx.notes), **status,
            "seconds": round(time.perf_counter() - started, 2),
            "max_memory_reserved": torch.cuda.max_memory_reserved(ctx.device) if ctx.is_cuda
            else None,
        }
        _write_json(out, report)

    try:
        produced = module.run(ctx)
        if not inspect.isgenerator(produced):
            rows.extend(produced)
        else:
            for row in produced:
                rows.append(row)
                save(partial=True)
                if budget is not None and time.perf_counter() - started > budget:
                    produced.close()  # stops the section at this row (its finally blocks run)
                    ctx.note(f"cut at its {budget:g} s budget after {len(rows)} rows")
                    save(cut=f"budget {budget:g} s")
                    print(markdown_table(rows), f"\n\n> cut at its {budget:g} s budget\n",
                          flush=True)
                    return
    except KeyboardInterrupt:
        save(interrupted=True)
        print(markdown_table(rows), f"\n\n> {name} interrupted after {len(rows)} rows "
              f"(kept in {out})", flush=True)
        raise
    except Exception as e:
        save(error=f"{type(e).__name__}: {e}")
        raise
    print(markdown_table(rows))
    for n in ctx.notes:
        print(f"\n> {n}")
    print(flush=True)
    save()


def _write_json(path: Path, report: dict) -> None:
    """Replace ``path`` atomically: a reader (or a run killed mid-write) never sees half a file."""
    atomic_write_text(path, json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
