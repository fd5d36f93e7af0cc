"""A tiny value PRM on disk for engine and CLI tests: a tiny checkpoint's backbone and a seeded
value head."""
from pathlib import Path

import torch


def save_tiny_prm(out: Path, backbone_dir: Path, *, kind: str = "value", seed: int = 0) -> Path:
    from transformers import AutoTokenizer

    from mahalo_engine.value_model import ValueHead, save_prm
    from mahalo_engine.models.loader import load_decoder

    torch.manual_seed(seed)
    backbone = load_decoder(backbone_dir, dtype=torch.float32)
    save_prm(out, backbone, ValueHead(backbone.config.hidden_size), kind,
             AutoTokenizer.from_pretrained(backbone_dir))
    return out
