"""The multi-head op: ``Σ_i w[b,i] · W_i h[b]`` for H LM heads, fused with sampling.

One folder, one op: ``kernels.py`` (Triton: projection, sampling partials, finish and filter),
``launcher.py`` (launch configs, `SamplingPlan`, the device dispatch), ``custom_ops.py``
(``torch.ops.mahalo.multihead_*`` and the public functions that call them), ``cpu.py`` (the CPU
path), ``reference.py`` (the pure-torch spec), ``heads_plan.py`` / ``merge.py`` /
``merge_kernel.py`` (the shared-weights plan and the merge of heads it reads).
"""
from triton_kernels.multihead.custom_ops import multihead_logits, multihead_sample
from triton_kernels.multihead.heads_plan import HeadsPlan, merge_shared_heads, plan_heads
from triton_kernels.multihead.launcher import SamplingPlan
from triton_kernels.multihead.merge import MergeCache

__all__ = ["multihead_logits", "multihead_sample", "SamplingPlan", "HeadsPlan", "plan_heads",
           "merge_shared_heads", "MergeCache"]
