"""Collation: tokenised examples as right-padded batch tensors for the trainers' forwards."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mahalo_engine.utils.padding import pad_right
from training.encode import TokenizedPair, TokenizedSteps

IGNORE = -100  # label value of positions that carry no loss


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, T] right-padded
    attention_mask: torch.Tensor  # [N, T] 1 on real tokens
    labels: torch.Tensor  # [N, T] token id where the token carries loss, else IGNORE
    head_ids: torch.Tensor  # [N] objective head of each row

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.labels, self.head_ids)))


def collate(sequences: Sequence[tuple[list[int], list[int]]], head_ids: Sequence[int],
            pad_id: int) -> Batch:
    """Right-pad ``(prompt ids, response ids)`` rows; labels cover the response tokens only."""
    input_ids, lens = pad_right([p + r for p, r in sequences], pad_id)
    mask = _mask(input_ids, lens)
    labels = torch.full_like(input_ids, IGNORE)
    for i, (p, _) in enumerate(sequences):
        n = int(lens[i])
        labels[i, len(p):n] = input_ids[i, len(p):n]
    return Batch(input_ids, mask, labels, torch.tensor(list(head_ids), dtype=torch.long))


def _mask(input_ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """1 on real tokens, 0 on padding (int64, as the decoder takes it)."""
    return (torch.arange(input_ids.shape[1])[None, :] < lens[:, None]).long()


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> Batch:
    """One batch for one forward: the n chosen rows, then the n rejected rows, each on its head."""
    seqs = [(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items]
    heads = [it.objective for it in items] * 2
    return collate(seqs, heads, pad_id)


def pad_id_of(tokenizer, config_pad: int | None = None) -> int:
    """Padding id (its value never matters: padded positions are masked and carry no loss)."""
    for v in (tokenizer.pad_token_id, config_pad, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


@dataclass
class ReadBatch:
    """A PRM batch: right-padded rows and the ``(row, column)`` positions the value head reads."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    rows: torch.Tensor  # [M]
    cols: torch.Tensor  # [M]


def collate_steps(items: Sequence[TokenizedSteps], pad_id: int) -> ReadBatch:
    """Step data: one row per example, read at each step's last token (label order)."""
    input_ids, lens = pad_right([it.ids for it in items], pad_id)
    rows = torch.tensor([i for i, it in enumerate(items) for _ in it.positions], dtype=torch.long)
    cols = torch.tensor([p for it in items for p in it.positions], dtype=torch.long)
    return ReadBatch(input_ids, _mask(input_ids, lens), rows, cols)


def collate_step_pairs(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> ReadBatch:
    """Bradley–Terry pairs: the n chosen rows, then the n rejected rows, each read at its last
    token."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    input_ids, lens = pad_right(seqs, pad_id)
    return ReadBatch(input_ids, _mask(input_ids, lens), torch.arange(len(seqs)), lens - 1)
