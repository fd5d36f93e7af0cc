"""What every op's launcher needs to know about the device it launches on.

The facts are shared; the dispatch itself (which implementation runs for which tensors) is decided
in each op's launcher (``triton_kernels.multihead.launcher``, ``triton_kernels.cascade.launcher``)
and stated in ``docs/design.md`` ("Device dispatch").
"""
from __future__ import annotations

import functools
import os

import torch

# fp32 operands get true fp32 products (TF32 would miss the 1e-5 contract); bf16/fp16 dots ignore it.
DOT_PRECISION = "ieee"


def interpreting() -> bool:
    """Triton runs its kernels in the interpreter (``TRITON_INTERPRET=1``, set before Triton is
    imported): the only way they run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    """The SM count of a CUDA device (launch configs size their grids by it)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def upcast_dot(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether kernels upcast bf16 dot operands to fp32 (exact) before the dot: in Triton's
    interpreter only, which multiplies their raw bits (triton-lang/triton#11584)."""
    return device.type == "cpu" and dtype == torch.bfloat16
