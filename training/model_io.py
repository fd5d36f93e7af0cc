"""Model files the trainers read and write: hashing a checkpoint for cache keys, untying, and
publishing a trained backbone (plus heads) as the Hugging Face directory ``load_policy`` reads."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import torch
from torch import nn

from mahalo_engine.heads import save_heads
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.models.loader import check_tensor_shapes, save_checkpoint
from mahalo_engine.utils.atomic_files import publish_files, staging_dir

log = logging.getLogger(__name__)


def hash_model_dir(path: str | Path) -> str:
    """sha256 over config.json and every safetensors file (and index) of a checkpoint directory."""
    root = Path(path)
    files = sorted([root / "config.json", *root.glob("*.safetensors"),
                    *root.glob("*.safetensors.index.json")])
    h = hashlib.sha256()
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing")
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def untied_config(config: ModelConfig) -> ModelConfig:
    """The same config with separate input embedding and LM head."""
    return dataclasses.replace(config, tie_word_embeddings=False,
                               raw={**config.raw, "tie_word_embeddings": False})


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError(f"no tensor starts with {prefix!r} in {sorted(state)[:5]}...")
    return out


def build_decoder(config: ModelConfig, state: dict[str, torch.Tensor]) -> Decoder:
    """A CPU float32 ``Decoder`` holding ``state`` (HF names), loaded strictly."""
    with torch.device("meta"):
        model = Decoder(config)
    model = model.to_empty(device="cpu")  # no random init of weights about to be overwritten
    model.tie_weights()
    check_tensor_shapes("state for the decoder", {k: v.shape for k, v in state.items()},
                        {k: v.shape for k, v in model.state_dict().items()},
                        {"lm_head.weight"} if config.tie_word_embeddings else ())
    if (config.tie_word_embeddings and "lm_head.weight" in state
            and not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])):
        raise ValueError("the config ties embeddings but lm_head.weight differs from "
                         "model.embed_tokens.weight (one would silently overwrite the other)")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return model


def write_policy_files(out_dir: str | Path, model: Decoder, tokenizer, heads: torch.Tensor | None = None,
                       objectives: list[str] | None = None) -> None:
    """Write ``model`` (+ ``mahalo_heads.safetensors`` when ``heads`` is given) into ``out_dir``
    as the Hugging Face directory ``load_policy`` reads (not atomic: see `save_policy_dir`).

    With heads the saved ``lm_head`` is their mean (the untied model's uniform mix, which is what
    ``load_policy`` gives with ``head_weights=None``), so plain transformers loads the default
    mixed policy."""
    if heads is not None:
        if objectives is None:
            raise ValueError("objectives are required with heads")
        if model.config.tie_word_embeddings:
            raise ValueError("a multi-head policy needs an untied backbone (untied_config)")
        with torch.no_grad():
            model.lm_head.weight.copy_(heads.float().mean(0))
    save_checkpoint(out_dir, model, tokenizer)
    if heads is not None:
        save_heads(Path(out_dir) / "mahalo_heads.safetensors", heads.float(), objectives)


def save_policy_dir(out_dir: str | Path, model: Decoder, tokenizer, heads: torch.Tensor | None = None,
                    objectives: list[str] | None = None) -> Path:
    """`write_policy_files` into a staging directory, then move the files into ``out_dir`` one by
    one with ``os.replace`` (each appears whole or not at all)."""
    tmp = staging_dir(out_dir)
    try:
        write_policy_files(tmp, model, tokenizer, heads, objectives)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_files(tmp, out_dir)
    log.info("saved %s", out_dir)
    return Path(out_dir)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
