"""``python -m training.data``: data utilities. ``convert-pairs`` turns the paper's preference
JSON arrays into TRL jsonl; ``check`` validates a preference file and reports its token lengths
and truncation under the trainers' settings."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag, run_cli
from training.encode import TRUNCATE_KEEP, tokenize_pairs
from training.readers import paper_pairs_to_trl, parse_data_spec, read_preferences


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.data", formatter_class=HelpFormatter,
        description="Data utilities: convert the paper's preference JSON arrays to TRL jsonl, or "
        "check a training file (rows, token lengths, truncation under --max-length).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-pairs", formatter_class=HelpFormatter, help='paper JSON array [{"question","chosen","rejected"}] '
                       '-> TRL jsonl {"prompt","chosen","rejected"[,"objective"]}')
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--objective", default=None, help="add this objective field to every row")
    c.add_argument("--limit", type=int, default=None, help="keep the first N rows (default: all)")
    add_debug_flag(c)
    s = sub.add_parser("check", formatter_class=HelpFormatter,
                       help="validate a preference file and report token lengths")
    s.add_argument("--model", type=Path, required=True, help="directory with the tokenizer")
    s.add_argument("--data", action="append", required=True, help="OBJECTIVE=FILE or FILE")
    s.add_argument("--max-length", type=int, default=1024, help="max tokens per sequence")
    s.add_argument("--max-prompt-length", type=int, default=None,
                   help="default: max-length // 2 (as the trainers)")
    s.add_argument("--truncate", choices=TRUNCATE_KEEP, default="start",
                   help="which part of an over-long prompt is kept (as the trainers)")
    s.add_argument("--chat-template", action="store_true",
                   help="wrap string prompts in the tokenizer's chat template")
    add_debug_flag(s)
    args = p.parse_args(argv)
    if args.cmd == "convert-pairs":
        rows = paper_pairs_to_trl(args.src)[:args.limit]
        if args.objective is not None:
            rows = [{**r, "objective": args.objective} for r in rows]
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {args.out}")
        return 0
    from transformers import AutoTokenizer

    data = read_preferences([parse_data_spec(s) for s in args.data])
    tok = AutoTokenizer.from_pretrained(args.model)
    items, stats = tokenize_pairs(tok, data, max_length=args.max_length,
                                  max_prompt_length=(args.max_length // 2 if args.max_prompt_length
                                                     is None else args.max_prompt_length),
                                  chat_template=args.chat_template, keep_prompt=args.truncate)
    for i, name in enumerate(data.objectives):
        lens = sorted(it.length for it in items if it.objective == i)
        print(f"{name}: {len(lens)} pairs, tokens median {lens[len(lens) // 2]}, max {lens[-1]}")
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
