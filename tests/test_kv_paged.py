"""mahalo_engine.paged: kv_fork / kv_promote / kv_release on a paged KV cache against a dense-layout
reference (loops over a [L, 2, S, T, n_kv, hd] tensor), for every block size 1…32, with sequences
ending mid-block and on block edges; after every op the bookkeeping is checked (refcounts equal to
the table references, so never negative; the free stack exactly the unreferenced blocks, each
once: no block leaked or freed twice). CPU runs the C++ ops; `gpu` tests the CUDA ones, also
replayed in a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from mahalo_engine import paged
from mahalo_engine.ops import load_extension
from mahalo_engine.paged import PagedKVCache

L, NKV, HD, S, MAX_BLOCKS = 2, 2, 3, 8, 4


class Mirror:
    """A paged cache and its dense reference, driven together."""

    def __init__(self, block_size: int, seed: int, device: str = "cpu",
                 num_blocks: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.bs = block_size
        num_blocks = S * MAX_BLOCKS + 2 if num_blocks is None else num_blocks
        self.pc = PagedKVCache.allocate(num_layers=L, num_blocks=num_blocks, block_size=block_size,
                                        num_kv_heads=NKV, head_dim=HD, num_seqs=S,
                                        max_blocks_per_seq=MAX_BLOCKS, dtype=dtype, device=device)
        # Random block ids in the tables: a shuffled free stack.
        self.pc.free_stack.copy_(torch.randperm(num_blocks, generator=self.g).to(torch.int32))
        self.dense = torch.zeros(L, 2, S, MAX_BLOCKS * block_size, NKV, HD, dtype=dtype)
        self.lens = [0] * S

    def append(self, seq: int, n: int) -> None:
        kv = torch.randn(L, 2, n, NKV, HD, generator=self.g).to(self.dense.dtype)
        self.pc.append(seq, kv.to(self.pc.device))
        self.dense[:, :, seq, self.lens[seq]:self.lens[seq] + n] = kv
        self.lens[seq] += n

    def fork(self, src: list[int], dst: list[int]) -> None:
        before = self.dense.clone()
        for s, d in zip(src, dst):
            self.dense[:, :, d] = before[:, :, s]
            self.lens[d] = self.lens[s]
        paged.kv_fork(self.pc, src, dst, check=True)

    def promote(self, winners: list[int], groups: list[list[int]], start: list[int]) -> None:
        for w, members, a in zip(winners, groups, start):
            for s in members:
                self.dense[:, :, s, a:self.lens[w]] = self.dense[:, :, w, a:self.lens[w]]
                self.lens[s] = self.lens[w]
        paged.kv_promote(self.pc, winners, groups, start, check=True)

    def release(self, seqs: list[int]) -> None:
        for s in seqs:
            self.lens[s] = 0
        paged.kv_release(self.pc, seqs)

    def table(self, seq: int) -> list[int]:
        return self.pc.block_tables[seq].tolist()

    def verify(self) -> None:
        self.pc.check()
        assert self.pc.lens.tolist() == self.lens
        assert self.pc.failed_allocations() == 0
        for s in range(S):
            got = self.pc.gather(s).cpu()
            assert torch.equal(got, self.dense[:, :, s, :self.lens[s]]), f"sequence {s} differs"


def _scenario(bs: int, device: str = "cpu") -> None:
    m = Mirror(bs, seed=bs, device=device)
    n = lambda hi: int(torch.randint(0, hi + 1, (), generator=m.g))  # noqa: E731
    m.append(0, bs)  # ends on a block edge
    m.append(1, bs + max(1, bs // 2))  # mid-block (every length is an edge when bs = 1)
    m.append(2, 1 + n(2 * bs - 1))
    m.append(5, 1 + n(bs - 1))  # dst of a fork: its blocks are released
    m.verify()
    forked = list(m.lens)
    m.fork([0, 1, 2], [3, 4, 5])
    m.verify()
    for s, d in ((0, 3), (1, 4), (2, 5)):  # full blocks are shared, the partial one is not
        full = forked[s] // bs
        assert m.table(d)[:full] == m.table(s)[:full]
        if forked[s] % bs:
            assert m.table(d)[full] != m.table(s)[full]
    m.append(0, bs)  # the step: each sibling grows differently, one of them to a block edge
    for s in (1, 2, 3, 4, 5):
        m.append(s, n(bs + 1))
    m.verify()
    winners = [[0, 3][n(1)], [1, 4][n(1)], [2, 5][n(1)]]
    m.promote(winners, [[0, 3], [4, 1], [2, 5]], [forked[0], forked[1], forked[2]])
    m.verify()
    for w, members in zip(winners, ([0, 3], [1, 4], [2, 5])):
        full = m.lens[w] // bs
        assert all(m.table(s)[:full] == m.table(w)[:full] for s in members)
    # A three-way group, its members forked from a promoted sequence.
    committed = m.lens[0]
    m.fork([0, 0], [6, 7])
    for s in (0, 6, 7):
        m.append(s, n(min(bs + 1, MAX_BLOCKS * bs - committed)))
    m.verify()
    m.promote([[0, 6, 7][n(2)]], [[6, 0, 7]], [committed])
    m.verify()
    m.release([1, 4])
    m.verify()
    m.release(list(range(S)))
    m.verify()
    assert m.pc.free_blocks() == m.pc.num_blocks


@pytest.mark.parametrize("bs", range(1, 33))
def test_fork_promote_release_match_dense_reference(bs):
    _scenario(bs)


def test_promote_reuses_the_siblings_own_partial_block():
    """Copy-on-write: a sibling whose partial block at the winner's last index is its own keeps
    it and only the tokens past ``start`` are rewritten (fewer blocks taken than a fresh copy)."""
    m = Mirror(4, seed=1)
    m.append(0, 5)
    m.fork([0], [1])
    m.append(0, 2)
    m.append(1, 1)
    own = m.table(1)[1]
    free = m.pc.free_blocks()
    m.promote([0], [[0, 1]], [5])
    m.verify()
    assert m.table(1)[1] == own and m.pc.free_blocks() == free


def test_out_of_blocks_cuts_to_whole_blocks_and_is_reported():
    m = Mirror(4, seed=2, num_blocks=3)
    m.append(0, 6)  # blocks: 2 of 3
    m.append(1, 3)  # the last one
    with pytest.raises(ValueError, match="allocations failed"):
        paged.kv_fork(m.pc, [0], [2], check=True)
    m.pc.check()  # still consistent: sequence 2 got the shared full block only
    assert m.pc.lens.tolist()[2] == 4 and m.pc.failed_allocations() == 1
    assert m.table(2)[0] == m.table(0)[0]


@pytest.mark.parametrize("call, match", [
    (lambda pc: paged.kv_fork(pc, [0], [0], check=True), "distinct and none may be a src"),
    (lambda pc: paged.kv_fork(pc, [0], [S], check=True), "out of range"),
    (lambda pc: paged.kv_promote(pc, [0], [[1, 2]], [0], check=True), "exactly once"),
    (lambda pc: paged.kv_promote(pc, [0], [[0, 1]], [9], check=True), "start 9"),
    (lambda pc: paged.kv_fork(pc, [0.5], [1]), "int32/int64"),
])
def test_checks_name_the_offending_value(call, match):
    m = Mirror(4, seed=3)
    m.append(0, 5)
    with pytest.raises(ValueError, match=match):
        call(m.pc)


def test_op_metadata_errors_raise_value_error():
    load_extension()  # torch.ops.mahalo.* exist once the extension is loaded
    m = Mirror(4, seed=4)
    pc = m.pc
    with pytest.raises(ValueError, match="lens must be int32"):
        torch.ops.mahalo.kv_paged_fork(pc.data, pc.block_tables, pc.lens.long(), pc.refcounts,
                                       pc.free_stack, pc.free_state, pc.lens[:1], pc.lens[:1])
    with pytest.raises(ValueError, match="src has 1 entries but dst has 2"):
        torch.ops.mahalo.kv_paged_fork(*pc.state(), pc.lens[:1], pc.lens[:2])


def test_opcheck_and_compiled_fork_promote_equal_eager():
    load_extension()
    m = Mirror(3, seed=5)
    for s, k in ((0, 7), (1, 4)):
        m.append(s, k)
    src, dst = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.mahalo.kv_paged_fork.default, (*m.pc.state(), src, dst))
    torch.library.opcheck(torch.ops.mahalo.kv_paged_promote.default,
                          (*m.pc.state(), src, torch.tensor([[0, 1]], dtype=torch.int32).t(),
                           torch.tensor([0, 0], dtype=torch.int32)))

    def step(pc: PagedKVCache) -> None:
        paged.kv_fork(pc, src, dst)
        paged.kv_promote(pc, torch.tensor([1, 0]), torch.tensor([[0, 2], [1, 3]]).flip(0),
                         torch.tensor([4, 7]))

    eager = PagedKVCache(*(t.clone() for t in m.pc.state()))
    compiled = PagedKVCache(*(t.clone() for t in m.pc.state()))
    step(eager)
    torch.compile(step, fullgraph=True)(compiled)
    for a, b in zip(eager.state(), compiled.state()):
        assert torch.equal(a, b)
    compiled.check()


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [1, 2, 3, 7, 16, 32])
def test_cuda_ops_match_dense_reference(bs):
    _scenario(bs, device="cuda")


@pytest.mark.gpu
def test_cuda_fork_promote_replay_in_a_cuda_graph():
    """Captured once, replayed on new tables/lengths: same state as the eager CPU ops."""
    cpu, gpu = Mirror(5, seed=6), Mirror(5, seed=6, device="cuda", dtype=torch.bfloat16)
    src = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    dst = torch.tensor([2, 3], dtype=torch.int32, device="cuda")
    winners = torch.tensor([2, 1], dtype=torch.int32, device="cuda")
    groups = torch.tensor([[0, 2], [1, 3]], dtype=torch.int32, device="cuda")
    start = torch.zeros(2, dtype=torch.int32, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged.kv_fork(gpu.pc, src, dst)
        paged.kv_promote(gpu.pc, winners, groups, start)
    for rnd in range(3):
        lens = (7 + rnd, 4 + 3 * rnd)
        for m in (cpu, gpu):
            m.release(list(range(S)))
            m.append(0, lens[0])
            m.append(1, lens[1])
        paged.kv_fork(cpu.pc, src.cpu(), dst.cpu())
        paged.kv_promote(cpu.pc, winners.cpu(), groups.cpu(), start.cpu())
        graph.replay()
        gpu.pc.check()
        for a, b in zip(cpu.pc.state()[1:], gpu.pc.state()[1:]):
            assert torch.equal(a, b.cpu())
        for s in range(S):
            assert torch.equal(cpu.pc.gather(s).to(torch.bfloat16), gpu.pc.gather(s).cpu())
