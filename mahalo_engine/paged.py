"""Paged KV caches: ``PagedKVCache`` (the block-table layout of vLLM, SGLang and FlashInfer) and
step search's ``kv_fork`` / ``kv_promote`` / ``kv_release`` on it, as ``torch.ops.mahalo.kv_paged_*``.

Layout: ``data [L, 2, num_blocks, block_size, n_kv, head_dim]``; token ``t`` of sequence ``s`` lives
in block ``block_tables[s, t // block_size]`` (int32 ``[S, max_blocks]``, -1 = none) at row
``t % block_size``; ``lens`` int32 ``[S]``; ``refcounts`` int32 ``[num_blocks]`` counts the table
entries pointing at each block. Free blocks sit on a stack: ``free_stack[:free_state[0]]``;
``free_state[1]`` counts failed allocations.

Where the bookkeeping runs: on the cache's device, in the op itself (C++ on CPU, one CUDA thread
on GPU, then a parallel copy launch), on fixed-shape state. So the ops never read device memory on
the host and are legal in CUDA-graph capture and under ``torch.compile``; the price is that running
out of free blocks cannot raise there. A sequence that needed a block then keeps only its whole
blocks (its length is cut to a block edge) and ``free_state[1]`` grows: ``check=True`` (a host
sync) raises ``ValueError`` for it, and ``PagedKVCache.failed_allocations`` reads it.

Sharing: fork shares the source's full blocks (refcount + 1) and copies only its partial last block
into a fresh one; promote points each sibling at the winner's full blocks (keeping those it already
shares), releases the rest (refcount - 1, back on the free stack at 0) and copies only the winner's
partial block (into the sibling's own block there when it has one: copy-on-write of the tokens past
``start``). Every op keeps each sequence's partial last block exclusive (refcount 1), so appending
tokens never writes into a shared block.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mahalo_engine.ops import load_extension
from triton_kernels.argcheck import check_int

_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class PagedKVCache:
    """The cache tensor and its block bookkeeping (all on one device; see the module docstring)."""

    data: torch.Tensor
    block_tables: torch.Tensor
    lens: torch.Tensor
    refcounts: torch.Tensor
    free_stack: torch.Tensor
    free_state: torch.Tensor

    @classmethod
    def allocate(cls, *, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, num_seqs: int, max_blocks_per_seq: int,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> "PagedKVCache":
        """A zeroed cache with every block free and every sequence empty."""
        sizes = dict(num_layers=num_layers, num_blocks=num_blocks, block_size=block_size,
                     num_kv_heads=num_kv_heads, head_dim=head_dim, num_seqs=num_seqs,
                     max_blocks_per_seq=max_blocks_per_seq)
        for name, value in sizes.items():
            check_int(name, value, 1)
        if num_blocks >= 2**31:
            raise ValueError(f"num_blocks must be < 2**31 (int32 block ids), got {num_blocks}")
        if dtype not in _CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {_CACHE_DTYPES}, got {dtype}")
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                        dtype=dtype, device=device),
            torch.full((num_seqs, max_blocks_per_seq), -1, **i32),
            torch.zeros(num_seqs, **i32),
            torch.zeros(num_blocks, **i32),
            # Popped from the top: block 0 is handed out first.
            torch.arange(num_blocks - 1, -1, -1, **i32),
            torch.tensor([num_blocks, 0], **i32),
        )

    @property
    def block_size(self) -> int:
        return self.data.shape[3]

    @property
    def num_blocks(self) -> int:
        return self.data.shape[2]

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]

    @property
    def device(self) -> torch.device:
        return self.data.device

    def state(self) -> tuple[torch.Tensor, ...]:
        """The six tensors in the ops' argument order."""
        return (self.data, self.block_tables, self.lens, self.refcounts, self.free_stack,
                self.free_state)

    def free_blocks(self) -> int:
        """Number of free blocks (a host read)."""
        return int(self.free_state[0])

    def failed_allocations(self) -> int:
        """Allocations that found no free block since the cache was made (a host read)."""
        return int(self.free_state[1])

    def append(self, seq: int, kv: torch.Tensor) -> None:
        """Write ``kv [L, 2, n, n_kv, head_dim]`` as the next ``n`` tokens of ``seq``, taking free
        blocks as needed. Host-side bookkeeping (syncs): for setting a cache up and for tests; a
        serving framework writes its tokens with its own attention kernels. ValueError when no
        block is free or the table is full (nothing is written then)."""
        if not 0 <= seq < self.num_seqs:
            raise ValueError(f"seq must be in [0, {self.num_seqs}), got {seq}")
        want = (self.data.shape[0], 2, kv.shape[2] if kv.dim() == 5 else -1, *self.data.shape[4:])
        if kv.dim() != 5 or tuple(kv.shape) != want:
            raise ValueError(f"kv must have shape [L, 2, n, n_kv, head_dim] = {list(want)}, got "
                             f"{list(kv.shape)}")
        bs, n = self.block_size, kv.shape[2]
        start = int(self.lens[seq])
        table = self.block_tables[seq].tolist()
        first_new = -(-start // bs)  # table index of the first block to allocate
        need = -(-(start + n) // bs) - first_new
        if -(-(start + n) // bs) > len(table):
            raise ValueError(f"sequence {seq}: {start} + {n} tokens exceed max_blocks x block_size "
                             f"= {len(table) * bs}")
        free = self.free_blocks()
        if need > free:
            raise ValueError(f"sequence {seq}: {need} more blocks needed, {free} free")
        if start % bs and int(self.refcounts[table[start // bs]]) != 1:
            raise ValueError(f"sequence {seq}: its partial last block {table[start // bs]} is "
                             "shared; the paged ops never leave it so")
        for j in range(first_new, first_new + need):
            free -= 1
            block = int(self.free_stack[free])
            self.refcounts[block] = 1
            self.block_tables[seq, j] = block
            table[j] = block
        self.free_state[0] = free
        for t in range(start, start + n):
            self.data[:, :, table[t // bs], t % bs] = kv[:, :, t - start].to(self.data.dtype)
        self.lens[seq] = start + n

    def gather(self, seq: int) -> torch.Tensor:
        """Dense copy of the tokens of ``seq``: ``[L, 2, lens[seq], n_kv, head_dim]``."""
        n = int(self.lens[seq])
        t = torch.arange(n, device=self.device)
        blocks = self.block_tables[seq].long()[t // self.block_size]
        return self.data[:, :, blocks, t % self.block_size]

    def check(self) -> None:
        """Host check of the bookkeeping (syncs); ValueError naming the first broken invariant:
        every sequence's blocks valid and -1 past its length, refcounts = table references
        (so never negative), free stack = exactly the blocks at refcount 0, each once."""
        bs, nb = self.block_size, self.num_blocks
        counts = [0] * nb
        for s, (row, n) in enumerate(zip(self.block_tables.tolist(), self.lens.tolist())):
            used = -(-n // bs)
            if not 0 <= n <= len(row) * bs:
                raise ValueError(f"sequence {s}: length {n} outside [0, {len(row) * bs}]")
            for j, b in enumerate(row):
                if j < used and not 0 <= b < nb:
                    raise ValueError(f"sequence {s}: block_tables[{s}, {j}] = {b} is not a block")
                if j >= used and b != -1:
                    raise ValueError(f"sequence {s}: block_tables[{s}, {j}] = {b} past its length "
                                     f"{n} (expected -1)")
                if j < used:
                    counts[b] += 1
        refs = self.refcounts.tolist()
        for b, (want, got) in enumerate(zip(counts, refs)):
            if want != got:
                raise ValueError(f"block {b}: refcount {got} but {want} table references")
        num_free = int(self.free_state[0])
        free = self.free_stack[:num_free].tolist()
        if len(set(free)) != len(free):
            raise ValueError(f"free stack holds a block twice: {sorted(free)}")
        unused = [b for b in range(nb) if counts[b] == 0]
        if sorted(free) != unused:
            raise ValueError(f"free stack {sorted(free)} differs from the unreferenced blocks "
                             f"{unused} (leaked or in use)")


def _index(cache: PagedKVCache, values, name: str, dim: int = 1) -> torch.Tensor:
    t = torch.as_tensor(values, device=cache.device)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != dim:
        raise ValueError(f"{name} must be a {dim}-D int32/int64 tensor or list, got {t.dtype} "
                         f"shape {list(t.shape)}")
    return t.to(torch.int32).contiguous()


def kv_fork(cache: PagedKVCache, src, dst, *, check: bool = False) -> None:
    """Sequence ``dst[p]`` becomes a copy of ``src[p]`` (its old blocks released): full blocks
    shared, the partial last block copied. dst sequences distinct and never a src.
    ``check=True``: validate on the host and raise ValueError if a block ran out (syncs)."""
    load_extension()
    src, dst = _index(cache, src, "src"), _index(cache, dst, "dst")
    if check:
        _check_pairs(cache, src.tolist(), dst.tolist())
    failed = cache.failed_allocations() if check else 0
    torch.ops.mahalo.kv_paged_fork(*cache.state(), src, dst)
    if check:
        _check_no_failure(cache, failed, "kv_fork")


def kv_promote(cache: PagedKVCache, winners, groups, start, *, check: bool = False) -> None:
    """Every sequence of ``groups[g]`` (``[G, K]``, winner included) becomes a copy of
    ``winners[g]``; ``start[g]`` is the length every member of the group already shares with the
    winner (the committed length before the step), so only tokens past it are copied.
    ``check=True``: validate on the host and raise ValueError if a block ran out (syncs)."""
    load_extension()
    winners = _index(cache, winners, "winners")
    groups = _index(cache, groups, "groups", dim=2)
    start = _index(cache, start, "start")
    if check:
        _check_groups(cache, winners.tolist(), groups.tolist(), start.tolist())
    failed = cache.failed_allocations() if check else 0
    torch.ops.mahalo.kv_paged_promote(*cache.state(), winners, groups, start)
    if check:
        _check_no_failure(cache, failed, "kv_promote")


def kv_release(cache: PagedKVCache, seqs) -> None:
    """Empty the sequences ``seqs``: their blocks' refcounts drop, blocks at 0 become free."""
    load_extension()
    torch.ops.mahalo.kv_paged_release(*cache.state(), _index(cache, seqs, "seqs"))


# ---- checks (check=True only: they read index values on the host) ----

def _check_seq(cache: PagedKVCache, what: str, seq: int) -> None:
    if not 0 <= seq < cache.num_seqs:
        raise ValueError(f"{what}: sequence {seq} is out of range [0, {cache.num_seqs})")


def _check_pairs(cache: PagedKVCache, src: list[int], dst: list[int]) -> None:
    if len(src) != len(dst):
        raise ValueError(f"src has {len(src)} entries but dst has {len(dst)}")
    for p, (s, d) in enumerate(zip(src, dst)):
        _check_seq(cache, f"pair {p} src", s)
        _check_seq(cache, f"pair {p} dst", d)
    if len(set(dst)) != len(dst) or set(dst) & set(src):
        raise ValueError(f"dst sequences {dst} must be distinct and none may be a src ({src})")


def _check_groups(cache: PagedKVCache, winners: list[int], groups: list[list[int]],
                  start: list[int]) -> None:
    if not len(winners) == len(groups) == len(start):
        raise ValueError(f"groups has {len(groups)} groups but winners has {len(winners)} and "
                         f"start {len(start)} entries; expected one per group")
    lens = cache.lens.tolist()
    seen: set[int] = set()
    for g, (w, members, a) in enumerate(zip(winners, groups, start)):
        for s in members:
            _check_seq(cache, f"group {g}", s)
            if s in seen:
                raise ValueError(f"group {g}: sequence {s} appears twice; sequences must be distinct")
            seen.add(s)
            if not 0 <= a <= lens[s]:
                raise ValueError(f"group {g}: start {a} must be in [0, lens[{s}] = {lens[s]}]")
        if members.count(w) != 1:
            raise ValueError(f"group {g}: winner {w} must appear exactly once in {members}")


def _check_no_failure(cache: PagedKVCache, before: int, op: str) -> None:
    failed = cache.failed_allocations() - before
    if failed:
        raise ValueError(f"{op}: {failed} block allocations failed ({cache.free_blocks()} free "
                         f"of {cache.num_blocks}); the sequences concerned were cut to whole "
                         "blocks. Allocate more blocks")
