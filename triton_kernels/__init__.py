"""Triton kernels for the multi-head policy's hot paths, one folder per op (see docs/design.md,
"Device dispatch").

- ``triton_kernels.multihead``: ``multihead_logits`` / ``multihead_sample`` call the
  ``torch.ops.mahalo.*`` custom ops, whose kernels dispatch by device (CUDA → Triton; CPU →
  Triton's interpreter when ``TRITON_INTERPRET=1``, else the efficient CPU path
  ``triton_kernels.multihead.cpu``, tested against the readable spec
  ``triton_kernels.multihead.reference``). ``plan_heads`` builds a ``HeadsPlan`` (distinct weight
  rows, merged heads when rows share weights) that its caller owns and passes on;
  ``SamplingPlan`` is a sampling call prepared once (checks, plan, config, buffers) for a decode
  loop's eager steps; ``merge_shared_heads`` gives a merged plan's operands for CUDA-graph
  capture and the custom ops. ``MergeCache`` keeps merged heads for an owner, within a byte budget.
- ``triton_kernels.cascade``: cascade (shared-prefix) decode and extend attention.
- ``triton_kernels.reference``: every op's pure-torch spec; ``checks`` / ``device``: what the
  ops share (argument checks, device facts); ``argcheck``: generic argument checks for any module.

Importing this package allocates nothing and reads no settings.
"""
from triton_kernels.multihead import (HeadsPlan, MergeCache, SamplingPlan, merge_shared_heads,
                                      multihead_logits, multihead_sample, plan_heads)

__all__ = ["multihead_logits", "multihead_sample", "SamplingPlan", "HeadsPlan", "plan_heads",
           "merge_shared_heads", "MergeCache"]
