"""mahalo_engine.ops.kv_append_ranges / kv_append (copies between two caches of different slot
lengths) against a pure-torch loop; the C++ kernel on CPU, the CUDA kernel (also in a CUDAGraph)
in `gpu` tests. Destinations start poisoned, and the whole tensor is compared bit for bit, so
untouched slots and positions are proven to keep their bits."""
import pytest
import torch

from mahalo_engine import ops

POISON = -777.0


def bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def make(dtype, device, idx_dtype, *, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(3, 2, 6, 2, 5, 24, generator=g).to(device, dtype)  # 6 short slots
    dst = torch.full((3, 2, 4, 2, 16, 24), POISON).to(device, dtype)  # 4 long slots
    dst[:, :, :, :, :3] = 1.5
    src_slot = torch.tensor([4, 0, 5, 2], dtype=idx_dtype, device=device)
    dst_slot = torch.tensor([1, 3, 0, 2], dtype=idx_dtype, device=device)
    start = torch.tensor([3, 0, 11, 16], dtype=idx_dtype, device=device)  # 16 + 0: at the end
    count = torch.tensor([5, 2, 5, 0], dtype=idx_dtype, device=device)
    return dst, src, src_slot, dst_slot, start, count


def ref_append(dst, src, src_slot, dst_slot, start, count):
    out = dst.clone()
    for s, d, a, n in zip(*(t.tolist() for t in (src_slot, dst_slot, start, count))):
        out[:, :, d, :, a:a + n] = src[:, :, s, :, :n]
    return out


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_append_ranges_matches_loop(device, dtype, idx_dtype):
    dst, src, *idx = make(dtype, device, idx_dtype)
    expected = ref_append(dst, src, *idx)
    ops.kv_append_ranges(dst, src, *idx, check=True)
    assert torch.equal(bits(dst), bits(expected))


def test_out_of_range_pairs_are_skipped_unchecked_and_named_checked():
    dst, src, src_slot, dst_slot, start, count = make(torch.float32, "cpu", torch.int64)
    start[0] = 12  # 12 + 5 > 16
    src_slot[1] = 6  # no such src slot
    expected = ref_append(dst, src, src_slot[2:], dst_slot[2:], start[2:], count[2:])
    with pytest.raises(ValueError, match="pair 1: src slot 6"):
        ops.kv_append_ranges(dst, src, src_slot, dst_slot, start, count, check=True)
    ops.kv_append_ranges(dst, src, src_slot, dst_slot, start, count)
    assert torch.equal(dst, expected)


def test_metadata_errors_raise_without_check():
    dst, src, *idx = make(torch.float32, "cpu", torch.int64)
    with pytest.raises(ValueError, match="share L, n_kv and head_dim"):
        ops.kv_append_ranges(dst, src[:, :, :, :1].contiguous(), *idx)
    with pytest.raises(ValueError, match="dtype"):
        ops.kv_append_ranges(dst, src.half(), *idx)
    with pytest.raises(ValueError, match="int32 or all int64"):
        ops.kv_append_ranges(dst, src, idx[0].int(), *idx[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_append_grows_lengths_by_the_source_lengths(device):
    dst, src, src_slot, dst_slot, _, _ = make(torch.bfloat16, device, torch.int64)
    dst_lens = torch.tensor([3, 3, 3, 3], dtype=torch.int32, device=device)
    src_lens = torch.tensor([2, 0, 1, 5, 4, 3], dtype=torch.int32, device=device)
    count = src_lens[src_slot].long()
    expected = ref_append(dst, src, src_slot, dst_slot, torch.full_like(count, 3), count)
    ops.kv_append(dst, dst_lens, src, src_lens, src_slot, dst_slot, check=True)
    assert torch.equal(bits(dst), bits(expected))
    assert dst_lens.tolist() == [3 + 3, 3 + 4, 3 + 1, 3 + 2]


@pytest.mark.gpu
def test_append_replays_in_a_cuda_graph():
    dst, src, src_slot, dst_slot, _, _ = make(torch.float16, "cuda", torch.int64)
    dst_lens = torch.full((4,), 3, dtype=torch.int32, device="cuda")
    src_lens = torch.tensor([2, 0, 1, 5, 4, 3], dtype=torch.int32, device="cuda")
    before = dst.clone()
    graph = torch.cuda.CUDAGraph()
    ops.kv_append(dst, dst_lens.clone(), src, src_lens, src_slot, dst_slot)  # warm-up
    dst.copy_(before)
    with torch.cuda.graph(graph):
        ops.kv_append(dst, dst_lens, src, src_lens, src_slot, dst_slot)
    dst.copy_(before)
    dst_lens.fill_(3)
    src_lens.copy_(torch.tensor([1, 1, 2, 2, 3, 5], dtype=torch.int32))  # read at replay
    graph.replay()
    count = src_lens[src_slot].long()
    expected = ref_append(before, src, src_slot, dst_slot, torch.full_like(count, 3), count)
    torch.cuda.synchronize()
    assert torch.equal(bits(dst), bits(expected))
