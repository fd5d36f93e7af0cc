"""The MAH-DPO reference log-probs: each pair's (chosen, rejected) summed log-probs under the SFT
model, computed once (streamed, split over ranks) and cached on disk under a key hashing the model
files, dtype, device type, autocast and every token id, so data, tokenizer and truncation
settings are all covered and a hit skips the forward passes entirely."""
from __future__ import annotations

import hashlib
import json
import logging
from array import array
from pathlib import Path
from typing import Sequence

import torch

from mahalo_engine.distributed import DistInfo, barrier
from mahalo_engine.utils.atomic_files import atomic_directory
from mahalo_engine.utils.safetensors_io import load_safetensors
from training import distributed as D
from training.batching import micro_batches
from training.collate import collate_pairs
from training.encode import TokenizedPair
from training.logps import PolicyLogps
from training.model_io import hash_model_dir

log = logging.getLogger(__name__)

REF_CACHE_VERSION = 2


def tokens_digest(items: Sequence[TokenizedPair]) -> str:
    """sha256 of every pair's (prompt, chosen, rejected) ids, each sequence length-prefixed so no
    two different token layouts hash the same byte stream."""
    h = hashlib.sha256()
    for it in items:
        for ids in (it.prompt, it.chosen, it.rejected):
            h.update(array("q", [len(ids), *ids]).tobytes())
    return h.hexdigest()


def compute_reference_logps(decoder: torch.nn.Module, items: Sequence[TokenizedPair], *, pad_id: int,
                            batch_size: int, chunk_tokens: int, info: DistInfo,
                            autocast=None) -> torch.Tensor:
    """``[N, 2]`` float32 (chosen, rejected) summed log-probs under the decoder's own ``lm_head``,
    streamed in length-sorted batches, split over ranks and summed back together."""
    import contextlib

    from tqdm import tqdm

    ref = PolicyLogps(decoder, chunk_tokens=chunk_tokens)
    order = sorted(range(len(items)), key=lambda i: items[i].length)[info.rank::info.world_size]
    out = torch.zeros(len(items), 2, dtype=torch.float32, device=info.device)
    with torch.no_grad():
        for chunk in tqdm(micro_batches(order, batch_size), desc="reference log-probs", unit="batch",
                          disable=not info.is_main, leave=False):
            batch = collate_pairs([items[i] for i in chunk], pad_id)
            batch.head_ids.zero_()
            batch = batch.to(info.device)
            with autocast or contextlib.nullcontext():
                lp = ref(batch.input_ids, batch.attention_mask, batch.labels, batch.head_ids)
            idx = torch.tensor(chunk, device=info.device)
            out[idx, 0] = lp[:len(chunk)].float()
            out[idx, 1] = lp[len(chunk):].float()
    return D.all_reduce_sum(out, info).cpu()


def reference_logps(decoder: torch.nn.Module, items: Sequence[TokenizedPair], *, model_dir: Path,
                    cache_dir: Path, pad_id: int, batch_size: int, chunk_tokens: int,
                    info: DistInfo, bf16: bool, autocast=None) -> torch.Tensor:
    """Cached ``compute_reference_logps``: the key hashes the model files, dtype, device type,
    autocast and every token id; a hit skips the forward passes entirely."""
    from safetensors.torch import save_file

    dtype = decoder.dtype
    key_src = json.dumps({"v": REF_CACHE_VERSION, "model": hash_model_dir(model_dir),
                          "dtype": str(dtype), "device": info.device.type, "bf16": bf16,
                          "tokens": tokens_digest(items), "n": len(items)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()
    path = cache_dir / f"ref-logps-{key[:40]}" / "ref_logps.safetensors"
    # Rank 0 decides and shares, so ranks without the file (no shared disk) never diverge.
    hit = torch.tensor([float(info.is_main and path.is_file())], device=info.device)
    if D.all_reduce_sum(hit, info).item() > 0:
        ref = torch.zeros(len(items), 2, device=info.device)
        if info.is_main:
            ref = load_safetensors(path)["ref_logps"].to(info.device)
            if tuple(ref.shape) != (len(items), 2):
                raise ValueError(f"{path}: cached shape {tuple(ref.shape)}, expected ({len(items)}, 2)")
            log.info("reference log-probs: cache hit %s", path)
        return D.all_reduce_sum(ref, info).cpu()
    ref = compute_reference_logps(decoder, items, pad_id=pad_id, batch_size=batch_size,
                                  chunk_tokens=chunk_tokens, info=info, autocast=autocast)
    if info.is_main:
        with atomic_directory(path.parent) as tmp:
            save_file({"ref_logps": ref.contiguous()}, str(tmp / path.name), metadata={"key": key_src})
        log.info("reference log-probs: cached to %s", path)
    barrier(info)
    return ref
