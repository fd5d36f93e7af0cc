"""Triton kernels for the multi-head policy's per-token hot path (see docs/design.md, "Device dispatch").

``multihead_logits`` / ``multihead_sample`` call the ``torch.ops.mahalo.*`` custom ops
(``triton_kernels.ops``), whose kernels dispatch by device (CUDA → Triton; CPU → Triton's
interpreter when ``TRITON_INTERPRET=1``, else ``triton_kernels.cpu``, the efficient CPU path
tested against the readable spec ``triton_kernels.reference``).
``SamplingPlan`` is a sampling call prepared once (checks, merge, config, buffers) for a decode
loop's eager steps. ``merge_shared_heads`` precomputes the shared-weights fast path for CUDA-graph
capture.
"""
from triton_kernels.merge import merge_cache, merge_shared_heads
from triton_kernels.multihead import SamplingPlan
from triton_kernels.ops import multihead_logits, multihead_sample

__all__ = ["multihead_logits", "multihead_sample", "SamplingPlan", "merge_shared_heads",
           "merge_cache"]
