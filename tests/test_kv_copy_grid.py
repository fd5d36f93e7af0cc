"""Grid emulation of the CUDA copy kernel's work mapping (``csrc/kv_copy_cuda.cu``), in numpy.

The kernel flattens each tile of pairs into a work list (pair p has ``rows * n_p`` vectors, n_p =
its range's tokens x vectors per token), gives every CTA one contiguous share (a multiple of the
block size) and lets thread t of CTA b visit ``lo_b + t + j * 256``; an index decodes to (pair,
row, vector) through the prefix sums and two multiply-high divisions. Here the same arithmetic runs
for every (block, thread) of the grid the launcher would size, and the test asserts against an
independent dense picture of the ranges that every (pair, row, token, vector) of every valid range
is visited exactly once, read from the pair's src slot, and that nothing else is touched — for
empty, 1-, 16-, 17-token and whole-slot ranges, out-of-bounds pairs, more pairs than a scan tile,
and the 64-bit path. The kernel's code itself runs under the host launch emulation in
``test_csrc_nvcc.py``; this test pins the mapping's coverage property.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

THREADS = 256
TILE = 512  # kThreads * kPairsPerThread
UNROLL = 4
BLOCKS_PER_SM = 4
MAX32 = 2**31 - 1


def fastdiv_magic(d: int) -> tuple[int, int]:
    shift = 0
    while shift < 31 and (1 << shift) < d:
        shift += 1
    return ((1 << 32) * ((1 << shift) - d)) // d + 1, shift


def fastdiv(n: np.ndarray, d: np.ndarray) -> np.ndarray:
    """The kernel's FastDiv32 on arrays: ``(umulhi(n, magic) + n) >> shift``."""
    d = np.broadcast_to(np.asarray(d, dtype=np.int64), n.shape)
    out = np.empty_like(n)
    for dv in np.unique(d):
        magic, shift = fastdiv_magic(int(dv))
        sel = d == dv
        t = (n[sel].astype(object) * magic) >> 32  # exact 64-bit product
        out[sel] = ((t + n[sel].astype(object)) >> shift).astype(np.int64)
    return out


def launch_grid(num_pairs: int, rows: int, max_len: int, vpt: int, sms: int,
                max32: int = MAX32) -> tuple[int, int, bool]:
    """(CTAs, pairs per scan tile, 32-bit path) as the host launcher picks them: shapes only."""
    pair_max = rows * max_len * vpt
    narrow = pair_max <= max32
    tile = min(TILE, max32 // pair_max) if narrow else TILE
    tile_max = min(num_pairs, tile) * pair_max
    return max(1, min(sms * BLOCKS_PER_SM, math.ceil(tile_max / THREADS))), tile, narrow


def emulate(layout: tuple[int, int, int, int], vpt: int, src, dst, start, end, sms: int,
            max32: int = MAX32):
    """Every visit of the grid: (pair, src vector address, dst vector address) arrays."""
    planes, slots, heads, max_len = layout
    rows = planes * heads
    head_stride = max_len * vpt
    slot_stride = heads * head_stride
    plane_stride = slots * slot_stride
    src, dst, start, end = (np.asarray(x, dtype=np.int64) for x in (src, dst, start, end))
    num_pairs = len(src)
    grid, tile, narrow = launch_grid(num_pairs, rows, max_len, vpt, sms, max32)
    visits = []
    for tile0 in range(0, num_pairs, tile):
        s, d = src[tile0:tile0 + tile], dst[tile0:tile0 + tile]
        a, b = start[tile0:tile0 + tile], end[tile0:tile0 + tile]
        ok = (s >= 0) & (s < slots) & (d >= 0) & (d < slots) & (a >= 0) & (a < b) & (b <= max_len)
        n = np.where(ok, (b - a) * vpt, 0)
        end_of = np.cumsum(n * rows)
        begin = end_of - n * rows
        first = np.where(ok, a, 0) * vpt
        total = int(end_of[-1])
        if narrow:
            assert total <= max32
        share = math.ceil(math.ceil(total / grid) / THREADS) * THREADS
        tid = np.arange(THREADS)
        for block in range(grid):
            lo, hi = block * share, min(block * share + share, total)
            steps = max(0, math.ceil((hi - lo) / (UNROLL * THREADS)))
            for j in range(steps):
                for u in range(UNROLL):
                    x = lo + tid + j * UNROLL * THREADS + u * THREADS
                    x = x[x < hi]
                    if not len(x):
                        continue
                    p = np.searchsorted(end_of, x, side="right")  # first q with end_of[q] > x
                    local = x - begin[p]
                    per_row = np.maximum(n[p], 1)
                    row = fastdiv(local, per_row) if narrow else local // per_row
                    at = local - row * per_row + first[p]
                    plane = fastdiv(row, heads)
                    head = row - plane * heads
                    base = plane * plane_stride + head * head_stride + at
                    visits.append((tile0 + p, base + s[p] * slot_stride, base + d[p] * slot_stride))
    if not visits:
        return (np.zeros(0, np.int64),) * 3
    return tuple(np.concatenate(v) for v in zip(*visits))


def check_coverage(layout, vpt, src, dst, start, end, sms, max32=MAX32):
    planes, slots, heads, max_len = layout
    pair, read, wrote = emulate(layout, vpt, src, dst, start, end, sms, max32)
    # Independent dense picture: which vector of the cache each pair must write, and from where.
    want = np.zeros((planes, slots, heads, max_len * vpt), dtype=np.int64)
    owner = np.full(want.shape, -1, dtype=np.int64)
    for p, (s, d, a, b) in enumerate(zip(src, dst, start, end)):
        if 0 <= s < slots and 0 <= d < slots and 0 <= a <= b <= max_len:
            want[:, d, :, a * vpt:b * vpt] += 1
            owner[:, d, :, a * vpt:b * vpt] = p
    got = np.bincount(wrote, minlength=want.size)
    assert got.size == want.size, "a write past the end of the cache"
    np.testing.assert_array_equal(got.reshape(want.shape), want)  # exactly once, nothing else
    np.testing.assert_array_equal(owner.reshape(-1)[wrote], pair)  # the pair owning the vector
    slot_stride = heads * max_len * vpt
    np.testing.assert_array_equal(read - wrote,
                                  (np.asarray(src)[pair] - np.asarray(dst)[pair]) * slot_stride)


def _pairs(rng, slots: int, num_pairs: int, max_len: int, length: int | None):
    perm = rng.permutation(slots)
    dst, src = perm[:num_pairs], rng.choice(perm[num_pairs:], num_pairs)
    if length is None:
        x, y = rng.integers(0, max_len + 1, (2, num_pairs))
        start, end = np.minimum(x, y), np.maximum(x, y)
    else:
        start = rng.integers(0, max_len - length + 1, num_pairs)
        end = start + length
    return src, dst, start, end


@pytest.mark.parametrize("length", [0, 1, 16, 17, 90, None], ids=lambda x: f"len{x}")
@pytest.mark.parametrize("sms", [1, 132])
def test_promote_shapes_covered_exactly_once(length, sms):
    # 0.5B-like rows (24 layers x 2 x 2 heads, 16-byte vectors of a 64-dim bf16 head) cut to
    # 6 layers; K = 5 candidates x 4 groups = 20 pairs.
    rng = np.random.default_rng(length or 7)
    layout = (12, 24, 2, 90)
    src, dst, start, end = _pairs(rng, 24, 20, 90, length)
    check_coverage(layout, 8, src, dst, start, end, sms)


def test_edge_ranges_and_out_of_bounds_pairs():
    layout = (4, 12, 3, 37)
    src = [7, 8, 9, 10, 11, 7, 8, 9, -1, 8]
    dst = [0, 1, 2, 3, 4, 5, 6, 12, 5, 6]  # the last three pairs are skipped (bad slot/range)
    start = [0, 18, 36, 1, 5, 36, 3, 0, 0, 40]
    end = [37, 18, 37, 2, 4, 37, 20, 3, 3, 41]
    for vpt, sms in ((1, 1), (3, 132), (8, 7)):
        check_coverage(layout, vpt, src, dst, start, end, sms)


def test_more_pairs_than_a_tile():
    rng = np.random.default_rng(3)
    src, dst, start, end = _pairs(rng, 2500, 1200, 5, None)
    check_coverage((2, 2500, 1, 5), 2, src, dst, start, end, 132)


def test_small_tiles_and_64_bit_path():
    # A lowered 32-bit limit: tiles of a few pairs (narrow) and, below one pair's work, the
    # 64-bit path with plain division; the coverage must not change.
    rng = np.random.default_rng(5)
    src, dst, start, end = _pairs(rng, 30, 12, 20, None)
    layout = (2, 30, 2, 20)
    for max32 in (700, 79):  # pair_max = 4 rows x 20 x 2 = 160: tile 4, then 64-bit
        assert launch_grid(12, 4, 20, 2, 1, max32)[2] == (max32 >= 160)
        check_coverage(layout, 2, src, dst, start, end, 3, max32)


def test_fastdiv_matches_division():
    rng = np.random.default_rng(0)
    ds = np.array([1, 2, 3, 7, 96, 128, 129, 65537, 2**30 - 1, 2**30, 2**30 + 1, 2**31 - 1])
    for d in ds:
        n = np.concatenate([rng.integers(0, 2**31, 500), [0, 1, d - 1, d, 2**31 - 1]]).astype(np.int64)
        np.testing.assert_array_equal(fastdiv(n, int(d)), n // int(d))


def test_grid_depends_on_shapes_only():
    # Same shapes, different lengths: same launch; short ranges never size the grid from T_max
    # alone (one wave at most: SMs x 4).
    assert launch_grid(40, 96, 4097, 8, 132) == (528, 512, True)
    assert launch_grid(1, 2, 3, 1, 132)[0] == 1
