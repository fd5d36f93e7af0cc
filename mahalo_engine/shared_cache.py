"""The ``shared_prefix`` cache layout: per request one prefix slot and K short candidate slots.

Step search keeps K candidates per request that differ only in the current step's tokens. Here
request group g owns slot g of ``prefix`` (a `KVCache` of ``max_len`` positions: the committed
text) and slots ``g*K .. g*K+K-1`` of ``suffix`` (a `KVCache` of ``step_len`` positions: each
candidate's tokens of the current step). KV memory per request is ``max_len + K * step_len``
positions instead of the ``fork`` layout's ``K * max_len``, and a decode step reads each prefix
once for all K candidates (cascade attention, ``triton_kernels.cascade``).

Candidate slot s = g*K + k has total length ``prefix.lens[g] + suffix.lens[s]`` (``lens``, computed
on the device) and its tokens sit at those absolute positions (rotary). Starting a step empties the
suffixes (no copy); committing a winner appends its suffix to the prefix with one
``kv_append`` launch for all groups; moving a group copies its prefix. Everything is index ops on
device tensors with fixed shapes: graph-safe, no host sync.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mahalo_engine.cache import KVCache, available_bytes
from mahalo_engine.model_config import ModelConfig
from triton_kernels.argcheck import check_int


@dataclass
class SharedPrefixCache:
    prefix: KVCache  # [L, 2, G, n_kv, max_len, hd]
    suffix: KVCache  # [L, 2, G*K, n_kv, step_len, hd]
    k: int  # candidates per group

    @property
    def num_groups(self) -> int:
        return self.prefix.num_slots

    @property
    def num_slots(self) -> int:
        """Candidate slots (``G * K``): what a decode step runs over."""
        return self.suffix.num_slots

    @property
    def max_len(self) -> int:
        """Total positions a candidate may reach (prefix + step)."""
        return self.prefix.max_len

    @property
    def step_len(self) -> int:
        return self.suffix.max_len

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix.dtype

    @property
    def device(self) -> torch.device:
        return self.prefix.device

    @property
    def lens(self) -> torch.Tensor:
        """Total length of every candidate slot, int32 ``[G*K]`` (a new tensor: read-only)."""
        return self.prefix.lens.repeat_interleave(self.k) + self.suffix.lens

    @staticmethod
    def nbytes(config: ModelConfig, num_groups: int, k: int, max_len: int, step_len: int,
               dtype: torch.dtype) -> int:
        """Bytes of both caches: ``num_groups * (max_len + k * step_len)`` positions."""
        return KVCache.nbytes(config, num_groups, max_len, dtype) \
            + KVCache.nbytes(config, num_groups * k, step_len, dtype)

    @classmethod
    def allocate(cls, config: ModelConfig, num_groups: int, k: int, max_len: int, step_len: int,
                 *, dtype: torch.dtype, device: torch.device | str) -> "SharedPrefixCache":
        """Zeroed caches; ValueError (bytes needed/available) if both together cannot fit."""
        for name, value in (("num_groups", num_groups), ("k", k), ("step_len", step_len)):
            check_int(name, value, 1)
        need = cls.nbytes(config, num_groups, k, max_len, step_len, dtype)
        available = available_bytes(torch.device(device))
        if available is not None and need > available:
            raise ValueError(
                f"shared-prefix KV cache ({num_groups} groups x (max_len={max_len} + {k} x "
                f"step_len={step_len}) positions, {dtype}) needs {need:,} bytes but only "
                f"{available:,} bytes are free on {device}")
        prefix = KVCache.allocate(config, num_groups, max_len, dtype=dtype, device=device)
        suffix = KVCache.allocate(config, num_groups * k, step_len, dtype=dtype, device=device)
        return cls(prefix, suffix, k)

    def candidate_slots(self, groups: torch.Tensor) -> torch.Tensor:
        """``[G', K]`` candidate slots of ``groups [G']``."""
        return groups.long()[:, None] * self.k + torch.arange(self.k, device=groups.device)

    def begin_step(self, slots: torch.Tensor) -> None:
        """Empty the suffixes of candidate ``slots`` (their stale K/V is overwritten later)."""
        self.suffix.reset(slots)

    def commit(self, winners: torch.Tensor, groups: torch.Tensor) -> None:
        """Append each winner candidate slot's step to its group's prefix (one launch), then empty
        the groups' suffixes. ``winners [G']`` candidate slots, ``groups [G']`` distinct."""
        self.prefix.append(self.suffix, winners.long(), groups.long())
        self.suffix.reset(self.candidate_slots(groups).reshape(-1))

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Group ``dst[i]`` takes over group ``src[i]``'s committed prefix (suffixes emptied)."""
        self.prefix.move(src.long(), dst.long())
        self.suffix.reset(self.candidate_slots(dst).reshape(-1))
