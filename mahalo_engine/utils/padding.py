"""Right-padding of token-id lists into one batch tensor (the engine's prefill and PRM scoring,
the trainers' collation)."""
from __future__ import annotations

from typing import Sequence

import torch


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [N, T], lens [N])`` int64 on the CPU: row i holds ``seqs[i]`` then ``pad_id`` up to
    the longest row's length ``T``. Padded positions must be masked by the caller (``lens``)."""
    if not seqs:
        raise ValueError("pad_right needs at least one sequence")
    lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    ids = torch.full((len(seqs), int(lens.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    return ids, lens
