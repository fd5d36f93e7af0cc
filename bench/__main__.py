"""`python -m bench [--quick] [--device cuda] [--sections decode,heads,...] [--model DIR]`.

Runs each benchmark section, prints a markdown table per section and writes every row, with the
device name, torch version and date, to ``bench/results/bench-<device>-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import sys
from pathlib import Path

import torch

from bench.common import BenchContext, markdown_table

# Section name -> what it compares. Each lives in bench/<name>.py and exposes run(ctx) -> rows.
SECTIONS = {
    "decode": "decode-step latency: our slot-cache decoder vs transformers, same weights and batch",
    "heads": "fused H-head projection + sampling vs torch eager paths",
    "kv": "KV-cache promote cost vs prefix length: ours vs deepcopy vs whole-slot copies",
    "train": "MAH-DPO step time/memory: ours vs the reference structure",
    "search": "PRM-guided step search: ours vs re-encode vs the paper's loop",
    "quality": "the paper's results in miniature: SFT, DPO/MAH-DPO, MC-value PRM, guided search "
               "on generated arithmetic problems (acc vs style)",
}


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
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
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output path (default: bench/results/bench-<device>-<date>.json); "
                   "the quality section writes its markdown, PNG and generations beside it")
    p.add_argument("--no-cache", action="store_true",
                   help="quality section: retrain its cached artefacts instead of reusing them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given, but torch sees no CUDA device")
    names = [s.strip() for s in (args.sections or ",".join(SECTIONS)).split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")

    if device.type == "cpu":
        # Two shared cores make multi-threaded CPU timings swing wildly; one thread is steadier and
        # fair to both sides of every comparison.
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its weight-loading bars clutter the tables
    model_dir = args.model
    if model_dir is None:
        from mahalo_engine.tiny import tiny_checkpoint

        model_dir = tiny_checkpoint("qwen2")
    ctx = BenchContext(device=device, quick=args.quick, model_dir=Path(model_dir),
                       no_cache=args.no_cache, all_sections=args.sections is None)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out = args.out
    if out is None:
        tag = "cuda-" + ctx.device_name.replace(" ", "_") if ctx.is_cuda else "cpu"
        out = Path(__file__).resolve().parent / "results" / f"bench-{tag}-{stamp:%Y%m%d-%H%M%S}.json"
    ctx.out = out
    report = {
        "device": ctx.device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": stamp.isoformat(timespec="seconds"),
        "quick": args.quick,
        "model": str(model_dir),
        "sections": {},
    }
    print(f"# MAHALO bench — {ctx.device_name}, torch {torch.__version__}, {report['date']}\n")
    for name in names:
        module = importlib.import_module(f"bench.{name}")
        ctx.notes = []
        print(f"## {name}: {SECTIONS[name]}\n", flush=True)
        rows = module.run(ctx)
        print(markdown_table(rows))
        for n in ctx.notes:
            print(f"\n> {n}")
        print(flush=True)
        report["sections"][name] = {"rows": rows, "notes": list(ctx.notes)}

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
