"""The multi-head file ``mahalo_heads.safetensors``: one tensor ``heads [H, V, d]`` (H bias-free LM
heads, one per objective) with metadata ``format=mahalo-heads-v1`` and ``objectives=a,b,...``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.utils.safetensors_io import open_safetensors

HEADS_FILE = "mahalo_heads.safetensors"
HEADS_FORMAT = "mahalo-heads-v1"


def _check_objectives(objectives: list[str], num_heads: int) -> None:
    if len(objectives) != num_heads:
        raise ValueError(f"{num_heads} heads but {len(objectives)} objectives: {objectives}")
    for name in objectives:
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            raise ValueError(f"objective names must be non-empty strings without commas or "
                             f"surrounding spaces, got {name!r}")
    if len(set(objectives)) != len(objectives):
        raise ValueError(f"objective names must be distinct, got {objectives}")


def check_heads(heads: torch.Tensor, config: ModelConfig, what: str = "heads") -> None:
    """ValueError unless ``heads`` is a floating ``[H, vocab_size, hidden_size]`` tensor for
    ``config``, H >= 1 (``what`` names them in the message)."""
    v, d = config.vocab_size, config.hidden_size
    if heads.dim() != 3 or heads.shape[0] < 1 or tuple(heads.shape[1:]) != (v, d):
        raise ValueError(f"{what} must have shape [H, {v}, {d}] (H >= 1) for this model, got "
                         f"{tuple(heads.shape)}")
    if not heads.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {heads.dtype}")


def save_heads(path: str | Path, heads: torch.Tensor, objectives: list[str]) -> Path:
    """Write ``heads [H,V,d]`` and its objective names; ``path`` may be a directory."""
    p = Path(path)
    if p.is_dir():
        p = p / HEADS_FILE
    if heads.dim() != 3:
        raise ValueError(f"heads must be [H, V, d], got shape {tuple(heads.shape)}")
    _check_objectives(list(objectives), heads.shape[0])
    meta = {"format": HEADS_FORMAT, "objectives": ",".join(objectives)}
    save_file({"heads": heads.detach().to("cpu").contiguous()}, str(p), metadata=meta)
    return p


def load_heads(path: str | Path, *, device: torch.device | str = "cpu"
               ) -> tuple[torch.Tensor, list[str]]:
    """``(heads [H,V,d], objectives)`` from a heads file (or a directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / HEADS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no heads file at {p}")
    with open_safetensors(p, device) as f:
        meta = f.metadata() or {}
        if meta.get("format") != HEADS_FORMAT:
            raise ValueError(f"{p}: metadata format is {meta.get('format')!r}, expected {HEADS_FORMAT!r}")
        keys = list(f.keys())
        if keys != ["heads"]:
            raise ValueError(f"{p}: expected exactly one tensor 'heads', found {keys}")
        heads = f.get_tensor("heads")
    if heads.dim() != 3:
        raise ValueError(f"{p}: heads must be [H, V, d], got shape {tuple(heads.shape)}")
    objectives = meta.get("objectives", "").split(",") if meta.get("objectives") else []
    _check_objectives(objectives, heads.shape[0])
    return heads, objectives
