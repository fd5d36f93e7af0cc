"""The slot KV cache: one preallocated tensor ``[L, 2, S, n_kv, T_max, head_dim]`` holding every
layer's K and V for S slots, and ``lens`` (int32 ``[S]``, on the same device): the number of valid
positions of each slot.

A slot is one running sequence. Positions ``>= lens[s]`` hold stale but finite values (the tensor
is zero-initialised, and only model K/V or copies of them are written), which matters because
attention multiplies masked-out V rows by an exact 0 and ``0 * nan`` would poison valid rows.
Writing goes through one index op on slot/position tensors, reading through a gather or (for a
contiguous slot range) a view, so both work inside CUDA graph capture; this module owns the sizes,
the allocation check and that indexing, and the slot events as methods (`KVCache.fork`, `move`,
`promote`, `append`: one batched ``mahalo_engine.ops`` launch each, graph-safe), so that callers
never unpack ``data`` and ``lens``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.ops import kv_append, kv_copy_ranges, kv_fork
from triton_kernels.argcheck import check_int, is_real


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` where it can be known (CUDA; Linux CPU via /proc/meminfo).

    On CUDA this includes what torch's caching allocator has reserved but not handed out (e.g.
    the per-tensor buffers of checkpoint loading): the driver counts it as used, yet an
    allocation reuses it."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu" and os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def kv_budget(kv_cache_bytes: int | None, kv_cache_fraction: float | None,
              device: torch.device) -> int | None:
    """Bytes of KV cache an engine may hold: ``kv_cache_bytes``, or ``kv_cache_fraction`` of the
    memory free on ``device`` now (`available_bytes`), or None (no budget) when neither is given."""
    if kv_cache_bytes is not None and kv_cache_fraction is not None:
        raise ValueError(f"give kv_cache_bytes ({kv_cache_bytes!r}) or kv_cache_fraction "
                         f"({kv_cache_fraction!r}), not both")
    if kv_cache_bytes is not None:
        check_int("kv_cache_bytes", kv_cache_bytes, 1)
        return kv_cache_bytes
    if kv_cache_fraction is None:
        return None
    if not is_real(kv_cache_fraction) or not 0 < kv_cache_fraction <= 1:
        raise ValueError(f"kv_cache_fraction must be a number in (0, 1], got "
                         f"{kv_cache_fraction!r}")
    free = available_bytes(device)
    if free is None:
        raise ValueError(f"kv_cache_fraction needs the free memory of {device}, which cannot be "
                         "read here; pass kv_cache_bytes= instead")
    return max(1, int(free * kv_cache_fraction))


@dataclass
class KVCache:
    data: torch.Tensor  # [L, 2, S, n_kv, T_max, head_dim]
    lens: torch.Tensor  # int32 [S]

    @property
    def num_layers(self) -> int:
        return self.data.shape[0]

    @property
    def num_slots(self) -> int:
        return self.data.shape[2]

    @property
    def max_len(self) -> int:
        return self.data.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @staticmethod
    def shape(config: ModelConfig, num_slots: int, max_len: int) -> tuple[int, ...]:
        return (config.num_hidden_layers, 2, num_slots, config.num_key_value_heads, max_len,
                config.head_dim)

    @staticmethod
    def nbytes(config: ModelConfig, num_slots: int, max_len: int, dtype: torch.dtype) -> int:
        """Bytes of the K/V tensor plus the lengths."""
        n = 1
        for s in KVCache.shape(config, num_slots, max_len):
            n *= s
        return n * torch.empty((), dtype=dtype).element_size() + 4 * num_slots

    @classmethod
    def allocate(cls, config: ModelConfig, num_slots: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> "KVCache":
        """A zeroed cache with all lengths 0; ValueError (bytes needed/available) if it cannot fit."""
        if not isinstance(num_slots, int) or num_slots <= 0:
            raise ValueError(f"num_slots must be a positive int, got {num_slots!r}")
        if not isinstance(max_len, int) or max_len <= 0:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        if not dtype.is_floating_point:
            raise TypeError(f"cache dtype must be a floating type, got {dtype}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        need = cls.nbytes(config, num_slots, max_len, dtype)
        shape = cls.shape(config, num_slots, max_len)
        available = available_bytes(device)
        if available is not None and need > available:
            raise ValueError(
                f"KV cache {list(shape)} {dtype} needs {need:,} bytes ({need / 2**30:.2f} GiB) but "
                f"only {available:,} bytes ({available / 2**30:.2f} GiB) are free on {device}; "
                "use fewer slots or a shorter max_len"
            )
        try:
            data = torch.zeros(shape, dtype=dtype, device=device)
        except torch.OutOfMemoryError as e:
            raise ValueError(
                f"KV cache {list(shape)} {dtype} needs {need:,} bytes ({need / 2**30:.2f} GiB); "
                f"allocation on {device} failed: {e}"
            ) from e
        return cls(data, torch.zeros(num_slots, dtype=torch.int32, device=device))

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store ``k/v [M, n_kv, hd]`` at ``(slots[m], positions[m])`` of ``layer`` (one index op)."""
        # Advanced indices around a slice put the indexed axis first: the target is [M, 2, n_kv, hd].
        self.data[layer][:, slots, :, positions] = torch.stack((k, v), dim=1)

    def read(self, layer: int, slots: torch.Tensor | slice, length: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[N, n_kv, length, hd]`` of ``slots`` (default length: max_len): gathered
        (a copy) for a tensor of slot indices, a view of the cache for ``slice(start, stop)``."""
        kv = self.data[layer, :, :, :, :length]
        kv = kv[:, slots] if isinstance(slots, slice) else kv.index_select(1, slots)
        return kv[0], kv[1]

    def reset(self, slots: torch.Tensor) -> None:
        """Empty ``slots`` (lens = 0); their stale K/V is simply overwritten later."""
        self.lens.index_fill_(0, slots, 0)

    # -- slot events (index tensors on the cache's device; no host sync) ------------------------

    def fork(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot ``dst[p]`` becomes a copy of slot ``src[p]`` (tokens and length), one launch."""
        kv_fork(self.data, self.lens, src, dst)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot ``dst[p]`` takes over slot ``src[p]``'s text (compaction); ``src`` is left as is,
        to be reused. The same copy as `fork`."""
        kv_fork(self.data, self.lens, src, dst)

    def promote(self, src: torch.Tensor, dst: torch.Tensor, start: torch.Tensor) -> None:
        """Slot ``dst[p]`` becomes a copy of slot ``src[p]`` (its group's winner) when both already
        hold the same ``[0, start[p])``: copies only ``[start[p], lens[src[p]])`` for every pair in
        one launch and sets ``lens[dst] = lens[src]``. int64 ``[P]`` indices; dst slots distinct
        and never a src."""
        new_len = self.lens.index_select(0, src)
        kv_copy_ranges(self.data, src, dst, start, new_len.to(src.dtype))
        self.lens.index_copy_(0, dst, new_len)

    def append(self, src: "KVCache", src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Append all ``src.lens[src_slots[p]]`` tokens of ``src``'s slot ``src_slots[p]`` to slot
        ``dst_slots[p]`` (a cache of other slot count/length, same model), one launch."""
        kv_append(self.data, self.lens, src.data, src.lens, src_slots, dst_slots)
