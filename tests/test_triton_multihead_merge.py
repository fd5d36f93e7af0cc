"""The Triton merge kernel (triton_kernels.multihead.merge_kernel) against the torch merge and float64.

Runs in Triton's interpreter on CPU (TRITON_INTERPRET=1) or on CUDA; odd shapes so blocks end
mid-head, heads at a stride from each other, zero and negative weights, U not a power of two.
"""
import os

import pytest
import torch

from far_views import far_view
from triton_kernels.multihead.merge import merge_heads, merge_heads_torch
from triton_kernels.multihead.merge_kernel import merge_heads_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    DEVICE.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="Triton kernels need a CUDA device or TRITON_INTERPRET=1")
# One rounding to the output dtype after fp32 accumulation: at most one ulp apart from float64.
ULP = {torch.float32: 2**-22, torch.bfloat16: 2**-7, torch.float16: 2**-10}


def make(H, V, d, U, dtype, *, seed=0, gap=False):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2 * H if gap else H, V, d, generator=g)
    heads = (base[::2] if gap else base).to(DEVICE, dtype)  # gap: heads 2·V·d apart
    rows = torch.randn(U, H, generator=g)
    rows[0, 0] = 0.0  # a zero weight (the torch merge skips it)
    return heads, rows


def merge64(heads, rows):
    return torch.einsum("uh,hvd->uvd", rows.double(), heads.double().cpu())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,V,d,U,gap", [(3, 37, 13, 1, False), (5, 29, 7, 3, True),
                                         (2, 300, 17, 1, True), (4, 11, 3, 3, False)])
def test_merge_kernel_matches_torch_merge_and_float64(H, V, d, U, gap, dtype):
    heads, rows = make(H, V, d, U, dtype, gap=gap)
    got = merge_heads_triton(heads, rows)
    assert got.dtype == dtype and got.shape == (U, V, d)
    want64 = merge64(heads, rows)
    scale = want64.abs().amax(dim=(1, 2), keepdim=True)
    err = ((got.double().cpu() - want64).abs() / scale).max().item()
    assert err <= 2 * ULP[dtype], err
    torch_merge = merge_heads_torch(heads, rows)
    assert ((got.double() - torch_merge.double()).abs().cpu() / scale).max().item() <= 2 * ULP[dtype]
    if dtype == torch.float32 and DEVICE.type == "cpu":
        # Same fp32 operations in the same order, no fused multiply-add in the interpreter.
        torch.testing.assert_close(got, torch_merge, rtol=1e-6, atol=1e-7)


def test_merge_dispatch_uses_the_kernel_and_rejects_bad_rows():
    heads, rows = make(3, 20, 5, 2, torch.float32)
    torch.testing.assert_close(merge_heads(heads, rows), merge_heads_triton(heads, rows))
    with pytest.raises(ValueError, match=r"rows must have shape \[U, 3\]"):
        merge_heads_triton(heads, rows[:, :2])
    with pytest.raises(ValueError, match="needs each head contiguous"):
        merge_heads_triton(heads.transpose(1, 2), rows)


def test_merge_kernel_head_offsets_past_int32():
    # Heads 2**30 + 2**20 elements apart (a stride that still fits int32, so Triton passes it as
    # i32): head 2 starts past 2**31 elements, as head 4 of a 7B model's [V, d] does
    # (152064 · 3584 · 4 > 2**31). An int32 `i * stride` wraps and reads the wrong head.
    H, V, d, U = 3, 24, 8, 2
    stride = 2**30 + 2**20
    assert stride < 2**31 <= (H - 1) * stride
    heads = far_view((H, V, d), (stride, d, 1), torch.float16, device=DEVICE)
    g = torch.Generator().manual_seed(3)
    heads.copy_(torch.randn(H, V, d, generator=g).to(heads.dtype))
    rows = torch.randn(U, H, generator=g)
    got = merge_heads_triton(heads, rows)
    want64 = merge64(heads, rows)
    scale = want64.abs().amax(dim=(1, 2), keepdim=True)
    err = ((got.double().cpu() - want64).abs() / scale).max().item()
    assert err <= 2 * ULP[torch.float16], err
