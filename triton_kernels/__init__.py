"""Triton kernels for the multi-head policy's per-token hot path (see docs/design.md, "Device dispatch").

``multihead_logits`` / ``multihead_sample`` call the ``torch.ops.mahalo.*`` custom ops
(``triton_kernels.ops``), whose kernels dispatch by device (CUDA → Triton; CPU → Triton's
interpreter when ``TRITON_INTERPRET=1``, else ``triton_kernels.cpu``, the efficient CPU path
tested against the readable spec ``triton_kernels.reference``).
``plan_heads`` builds a ``HeadsPlan`` (distinct weight rows, merged heads when rows share weights)
that its caller owns and passes on; ``SamplingPlan`` is a sampling call prepared once (checks,
plan, config, buffers) for a decode loop's eager steps; ``merge_shared_heads`` gives a merged
plan's operands for CUDA-graph capture and the custom ops. ``MergeCache`` keeps merged heads for
an owner, within a byte budget. Importing this package allocates nothing and reads no settings.
"""
from triton_kernels.heads_plan import HeadsPlan, merge_shared_heads, plan_heads
from triton_kernels.merge import MergeCache
from triton_kernels.multihead import SamplingPlan
from triton_kernels.ops import multihead_logits, multihead_sample

__all__ = ["multihead_logits", "multihead_sample", "SamplingPlan", "HeadsPlan", "plan_heads",
           "merge_shared_heads", "MergeCache"]
