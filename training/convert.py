"""``python -m training.convert``: the reference implementation's ``policy.pt`` -> our format.

The reference (pearls-lab/multiobj-align, after eric-mitchell/direct-preference-optimization)
saves ``torch.save({"step_idx", "state": state_dict, "metrics"})``. A multi-head (MAH-DPO) state
has ``base_model.model.*`` backbone keys, ``base_model.lm_head.weight`` (the same tensor as
``heads.0.weight``) and ``heads.{i}.weight``; an SFT state has plain Hugging Face keys. The file
is read with ``torch.load(weights_only=True)``: tensors and plain values only, never arbitrary
pickled objects. ``policy.pt`` carries no config or tokenizer, so ``--base`` names the Hugging
Face directory of the model it was trained from. Every tensor is accounted for: a missing,
unexpected or mis-shaped one is an error naming it (the reference loaded with ``strict=False``,
which silently loaded nothing for mismatched keys).
"""
from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
from pathlib import Path

import torch

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag, run_cli
from training.model_io import build_decoder, save_policy_dir, untied_config

log = logging.getLogger(__name__)

_HEAD = re.compile(r"^heads\.(\d+)\.weight$")


def load_reference_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state`` dict of a reference ``policy.pt``, loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors and plain values; refusing to "
                         f"unpickle it (weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("state"), dict):
        raise ValueError(f"{path}: expected a dict with a 'state' state_dict (the reference "
                         f"policy.pt layout), got {type(obj).__name__} with keys "
                         f"{sorted(obj) if isinstance(obj, dict) else '-'}")
    state = obj["state"]
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: state entries that are not named tensors: {bad[:5]}")
    return state


def split_reference_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                    torch.Tensor | None]:
    """``(backbone state with HF names, heads [H,V,d] or None)``."""
    if not any(k.startswith(("base_model.", "heads.")) for k in state):
        return dict(state), None  # an SFT policy.pt: already HF names
    backbone, heads = {}, {}
    for k, v in state.items():
        if k.startswith("base_model.model."):
            backbone[k[len("base_model."):]] = v
        elif k == "base_model.lm_head.weight":
            continue  # the same tensor as heads.0.weight (checked below)
        elif m := _HEAD.match(k):
            heads[int(m.group(1))] = v
        else:
            raise ValueError(f"unexpected tensor {k!r} in a multi-head state (expected "
                             f"base_model.model.*, base_model.lm_head.weight, heads.N.weight; "
                             f"GPT-2 style base_model.transformer.* is not supported)")
    if not heads:
        raise ValueError("multi-head state without heads.N.weight tensors")
    if sorted(heads) != list(range(len(heads))):
        raise ValueError(f"head indices must be 0..H-1, got {sorted(heads)}")
    shapes = {f"heads.{i}.weight": tuple(w.shape) for i, w in sorted(heads.items())}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"heads of different shapes: {shapes}")
    stacked = torch.stack([heads[i] for i in range(len(heads))])
    lm = state.get("base_model.lm_head.weight")
    if lm is not None and not torch.equal(lm, stacked[0]):
        raise ValueError("base_model.lm_head.weight differs from heads.0.weight; the reference "
                         "stores them as one tensor, so this file is not a reference checkpoint")
    return backbone, stacked


def convert(policy_pt: str | Path, base: str | Path, out: str | Path, *,
            objectives: list[str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write ``out`` as a Hugging Face directory (+ ``mahalo_heads.safetensors`` for a multi-head
    checkpoint) from the reference ``policy_pt`` and the config/tokenizer of ``base``."""
    from transformers import AutoTokenizer

    config = ModelConfig.from_pretrained(base)
    backbone, heads = split_reference_state(load_reference_state(policy_pt))
    if dtype is None:
        dtype = backbone["model.embed_tokens.weight"].dtype if "model.embed_tokens.weight" in backbone \
            else torch.float32
    if heads is not None:
        if objectives is None or len(objectives) != heads.shape[0]:
            raise ValueError(f"{policy_pt} holds {heads.shape[0]} heads: pass --objectives with "
                             f"{heads.shape[0]} comma-separated names, got {objectives}")
        if tuple(heads.shape[1:]) != (config.vocab_size, config.hidden_size):
            raise ValueError(f"heads.N.weight are {tuple(heads.shape[1:])}, but {base}/config.json "
                             f"expects ({config.vocab_size}, {config.hidden_size})")
        config = untied_config(config)
        backbone["lm_head.weight"] = heads.float().mean(0)
    model = build_decoder(config, backbone).to(dtype)
    tokenizer = AutoTokenizer.from_pretrained(base)
    return save_policy_dir(out, model, tokenizer, heads.to(dtype) if heads is not None else None,
                           objectives)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(
        prog="python -m training.convert", formatter_class=HelpFormatter,
        description="Convert the reference implementation's policy.pt (multi-head or SFT) into a "
        "Hugging Face directory (+ mahalo_heads.safetensors) that load_policy reads. Loads with "
        "torch.load(weights_only=True).")
    p.add_argument("--policy-pt", type=Path, required=True, help="the reference policy.pt")
    p.add_argument("--base", type=Path, required=True,
                   help="Hugging Face directory of the base model (config.json + tokenizer)")
    p.add_argument("--objectives", default=None,
                   help="comma-separated objective names, one per head, in head order")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="saved dtype (default: the checkpoint's)")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    add_debug_flag(p)
    args = p.parse_args(argv)
    convert(args.policy_pt, args.base, args.out,
            objectives=args.objectives.split(",") if args.objectives is not None else None,
            dtype=getattr(torch, args.dtype) if args.dtype else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
