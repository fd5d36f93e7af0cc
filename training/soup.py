"""``python -m training.soup``: a weight soup of policies with the same architecture.

``--models A B ... --weights w_A w_B ...`` writes ``Σ_m w_m θ_m`` parameter by parameter (float32)
as a normal policy directory ``load_policy`` reads: the paper's *DPO Soup* baseline is
``λ·DPO[acc] + (1−λ)·DPO[style]``, one soup per λ, against MAH-DPO's one run with head weights
chosen at inference. The weights must sum to 1 (an interpolation, not an extrapolation) and the
models must hold the same tensors with the same shapes; heads files (``mahalo_heads.safetensors``)
are mixed too, head by head, when every model has one with the same number of heads (head i of
the soup is named like the models' head i, or ``"acc+style"`` when their names differ, as for the
DPO Soup of two single-objective models). The config and tokenizer are the first model's.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from mahalo_engine.heads import HEADS_FILE, load_heads
from mahalo_engine.models.loader import load_decoder
from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag, run_cli
from training.model_io import build_decoder, save_policy_dir

WEIGHT_SUM_TOL = 1e-6


def check_weights(weights: Sequence[float], n_models: int) -> list[float]:
    """One finite weight >= 0 per model, summing to 1 (within ``WEIGHT_SUM_TOL``)."""
    w = [float(x) for x in weights]
    if len(w) != n_models:
        raise ValueError(f"--weights needs one weight per model ({n_models}), got {len(w)}: {w}")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"--weights must be finite numbers >= 0, got {w}")
    if abs(sum(w) - 1.0) > WEIGHT_SUM_TOL:
        raise ValueError(f"--weights must sum to 1, got {w} (sum {sum(w):.6g})")
    return w


def soup_tensors(states: Sequence[dict[str, torch.Tensor]], weights: Sequence[float],
                 names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``Σ_m w_m state_m[k]`` in float32 for every tensor name ``k`` (same names and shapes in
    every state, else a ValueError naming the first difference; ``names`` label the states)."""
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if state.keys() != first.keys():
            extra = sorted(state.keys() - first.keys())[:3]
            missing = sorted(first.keys() - state.keys())[:3]
            raise ValueError(f"{name} and {names[0]} hold different tensors (only in {name}: "
                             f"{extra}; only in {names[0]}: {missing})")
        for k, t in state.items():
            if t.shape != first[k].shape:
                raise ValueError(f"models have different shapes: {k} is {list(first[k].shape)} in "
                                 f"{names[0]} but {list(t.shape)} in {name}")
    return {k: sum(w * s[k].float() for w, s in zip(weights, states)) for k in first}


def make_soup(models: Sequence[str | Path], weights: Sequence[float], out: str | Path) -> Path:
    """Write the soup of ``models`` with ``weights`` to ``out`` (a policy directory)."""
    from transformers import AutoTokenizer  # seconds to import: not for --help or a bad argument

    if len(models) < 2:
        raise ValueError(f"--models needs at least two policy directories, got {len(models)}")
    w = check_weights(weights, len(models))
    names = [str(m) for m in models]
    decoders = [load_decoder(m, dtype=torch.float32) for m in models]
    configs = [d.config for d in decoders]
    for c, name in zip(configs[1:], names[1:]):
        if c.tie_word_embeddings != configs[0].tie_word_embeddings:
            raise ValueError(f"{name} and {names[0]} differ in tie_word_embeddings")
    mixed = soup_tensors([d.state_dict() for d in decoders], w, names)
    heads = _soup_heads(models, w, names)
    model = build_decoder(configs[0], mixed)
    tokenizer = AutoTokenizer.from_pretrained(models[0])
    if heads is None:
        return save_policy_dir(out, model, tokenizer)
    return save_policy_dir(out, model, tokenizer, heads[0], heads[1])


def _soup_heads(models: Sequence[str | Path], w: list[float],
                names: list[str]) -> tuple[torch.Tensor, list[str]] | None:
    files = [Path(m) / HEADS_FILE for m in models]
    have = [f.is_file() for f in files]
    if not any(have):
        return None
    if not all(have):
        raise ValueError(f"only some models have {HEADS_FILE}: "
                         f"{[n for n, h in zip(names, have) if h]}; mix like with like")
    loaded = [load_heads(f) for f in files]
    mixed = soup_tensors([{"heads": h} for h, _ in loaded], w, names)["heads"]  # checks the counts
    objectives = ["+".join(dict.fromkeys(objs[i] for _, objs in loaded))
                  for i in range(len(loaded[0][1]))]
    return mixed, objectives


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.soup", formatter_class=HelpFormatter,
        description="Parameter-wise weighted average of policies with the same architecture "
        "(e.g. the DPO Soup baseline: --models DPO_ACC DPO_STYLE --weights 0.3 0.7), written as "
        "a policy directory load_policy reads.")
    p.add_argument("--models", nargs="+", required=True, type=Path,
                   help="two or more policy directories (Hugging Face, optional heads file)")
    p.add_argument("--weights", nargs="+", required=True, type=float,
                   help="one weight >= 0 per model, summing to 1")
    p.add_argument("--out", required=True, type=Path,
                   help="output directory (must not exist or be empty)")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    check_weights(args.weights, len(args.models))  # before loading anything
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise ValueError(f"--out {args.out} already exists and is not an empty directory; "
                         f"choose another")
    make_soup(args.models, args.weights, args.out)
    print(f"wrote {args.out}: " + " + ".join(f"{w:g} x {m}" for w, m in zip(args.weights, args.models)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
