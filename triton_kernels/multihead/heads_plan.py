"""The shared-weights plan: which rows share a weight vector, and the heads the kernels read.

``plan_heads`` is the one place that decides "do the rows of ``weights [B,H]`` share weight
vectors, so that heads can be merged?". It returns a ``HeadsPlan``: the distinct rows ``[U,H]``,
each row's index into them, and the kernels' operands — ``(merged [U,V,d], one_hot [B,U])`` when
U < H and merging is wanted (see ``triton_kernels.multihead.merge`` for why that is exact and when it pays),
else ``(heads, fp32 weights)``.

A plan is an object its caller owns and passes on explicitly: the engine's ``Sampler`` keeps one
per row count (and the merged heads in its own ``MergeCache``), ``Policy.logits`` builds one per
call, ``SamplingPlan`` holds one. Nothing is remembered at module level. A plan binds the values
of the heads and weights it was built from: after either changes, build a new one
(``is_current`` says whether they changed in place; inference tensors have no version counter,
so their in-place changes go unseen).

The launchers (``multihead_logits``/``multihead_sample``, their custom ops, ``triton_kernels.multihead.cpu``)
called without a plan build a one-off plan with ``merge=False``: one device-to-host copy of the
weights (it checks them for non-finite values; a synchronisation on CUDA) and the general H-head
path, because a merge read once costs more than it saves (H + U head transfers against H - U).
Under CUDA-graph capture nothing can be read on the host: the plan is the general path on the
tensors given; capture with a plan's ``heads``/``weights`` (``merge_shared_heads``) instead.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from triton_kernels.checks import check_finite_weights, check_mixture
from triton_kernels.multihead.merge import HeadsKey, MergeCache, merge_heads, row_key, tensor_version


@dataclass(eq=False)
class HeadsPlan:
    """One ``(heads, weights)`` pair planned: see the module docstring."""

    heads: torch.Tensor  # what the kernels read: merged [U,V,d], or the source heads [H,V,d]
    weights: torch.Tensor  # their fp32 weights: one-hot [B,U], or the source weights [B,H]
    source: torch.Tensor  # the heads [H,V,d] the plan was built from
    source_weights: torch.Tensor  # the weights [B,H] it was built from
    host_weights: torch.Tensor | None  # their fp32 values on the host (None: built in a capture)
    heads_key: HeadsKey  # the source heads when the plan was built
    weights_version: int | None  # the source weights' version counter then
    # (rows, index), found when merging or on first use: a one-off general plan never needs them.
    distinct: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @property
    def rows(self) -> torch.Tensor:
        """fp32 ``[U,H]`` on the host: the distinct weight rows."""
        return self._distinct()[0]

    @property
    def index(self) -> torch.Tensor:
        """int64 ``[B]`` on the host: row b's weights are ``rows[index[b]]``."""
        return self._distinct()[1]

    def _distinct(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.distinct is None:
            if self.host_weights is None:
                raise ValueError("a plan built under CUDA-graph capture has no distinct rows")
            self.distinct = distinct_rows(self.host_weights)
        return self.distinct

    @property
    def merged(self) -> bool:
        """Whether the kernels read U < H merged heads."""
        return self.heads is not self.source

    def is_current(self) -> bool:
        """False once the source heads or weights were changed in place (or re-pointed) since
        the plan was built. Inference tensors carry no version: their changes go unseen."""
        # Called on every SamplingPlan step: two version reads and a pointer (a version of None
        # was an inference tensor when built, and stays one).
        heads_version, weights_version = self.heads_key.version, self.weights_version
        return ((heads_version is None or self.source._version == heads_version)
                and (weights_version is None or self.source_weights._version == weights_version)
                and self.source.data_ptr() == self.heads_key.data_ptr)

    def check(self, heads: torch.Tensor, weights: torch.Tensor) -> None:
        """Raise ``ValueError`` unless this plan was built from ``heads`` and weights of
        ``weights``' shape and both are unchanged since."""
        if heads is not self.source or tuple(weights.shape) != tuple(self.source_weights.shape):
            raise ValueError(f"this plan was built for heads {tuple(self.source.shape)} and "
                             f"weights {tuple(self.source_weights.shape)}, not for the heads and "
                             f"weights {tuple(weights.shape)} given; build one with plan_heads")
        if not self.is_current():
            raise ValueError("the plan is stale: its heads or weights were changed in place since "
                             "it was built; build a new one with plan_heads")

    def key(self) -> tuple:
        """What a CUDA graph captured with ``(heads, weights)`` depends on, as a hashable key.
        Merged plans: every row's weight vector and the source heads' storage and version (a graph
        holds the merged tensor it was captured with, so new head values must miss it). The
        general path: the heads' storage only (a graph reads the heads and weights in place)."""
        if not self.merged:
            return (self.heads_key.data_ptr,)
        return (row_key(self.rows), tuple(self.index.tolist()), self.heads_key.data_ptr,
                self.heads_key.version)

    def mixed_head(self, u: int) -> torch.Tensor:
        """``Σ_i rows[u,i]·W_i`` as one ``[V,d]`` head in the heads' dtype: the merged head u of
        a merged plan; the source head itself for a one-hot row (no copy); else merged now (one
        pass over the heads it weights; memory: one head)."""
        if self.merged:
            return self.heads[u]
        row = self.rows[u]
        nonzero = row.nonzero().flatten()
        if len(nonzero) == 1 and row[nonzero[0]] == 1.0:
            return self.source[int(nonzero[0])]
        return merge_heads(self.source, row[None])[0]


def distinct_rows(host_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [U,H], index [B])`` of host weights ``[B,H]``: ``host_weights == rows[index]``."""
    return torch.unique(host_weights, dim=0, return_inverse=True)


def plan_heads(heads: torch.Tensor, weights: torch.Tensor, *, merge: bool = True,
               cache: MergeCache | None = None,
               host_weights: torch.Tensor | None = None) -> HeadsPlan:
    """Plan ``heads [H,V,d]`` mixed by ``weights [B,H]``: read the weights on the host (rejecting
    non-finite ones), and when ``merge``, find the U distinct rows and, if U < H, merge the heads —
    through the owner's ``cache`` if given (None from it: over its budget, general path), else
    now. ``host_weights``: the weights' values already on the host (skips the device read).
    Under CUDA-graph capture: the general path, no host read."""
    check_mixture(heads, weights)
    general = dict(heads=heads, weights=weights.detach().to(torch.float32).contiguous(),
                   source=heads, source_weights=weights, heads_key=HeadsKey.of(heads),
                   weights_version=tensor_version(weights))
    if weights.is_cuda and torch.cuda.is_current_stream_capturing():
        return HeadsPlan(host_weights=None, **general)
    if host_weights is None:
        host_weights = weights.detach().to("cpu", torch.float32)
    elif tuple(host_weights.shape) != tuple(weights.shape) or host_weights.device.type != "cpu":
        raise ValueError(f"host_weights must be a CPU tensor of the weights' shape "
                         f"{tuple(weights.shape)}, got {tuple(host_weights.shape)} on "
                         f"{host_weights.device}")
    host_weights = host_weights.to(torch.float32)
    check_finite_weights(host_weights)
    if not merge:
        return HeadsPlan(host_weights=host_weights, **general)
    rows, index = distinct_rows(host_weights)
    merged = None
    if rows.shape[0] < heads.shape[0]:
        merged = cache.get(heads, rows) if cache is not None else merge_heads(heads, rows)
    if merged is None:
        return HeadsPlan(host_weights=host_weights, distinct=(rows, index), **general)
    one_hot = torch.nn.functional.one_hot(index, rows.shape[0]).to(weights.device, torch.float32)
    return HeadsPlan(**{**general, "heads": merged, "weights": one_hot},
                     host_weights=host_weights, distinct=(rows, index))


def checked_plan(heads: torch.Tensor, weights: torch.Tensor, plan: HeadsPlan | None, *,
                 merge: bool) -> HeadsPlan:
    """A launcher's plan: the caller's ``plan`` checked against ``(heads, weights)``
    (``HeadsPlan.check``), else a new one (``merge=False`` for a one-off call)."""
    if plan is None:
        return plan_heads(heads, weights, merge=merge)
    plan.check(heads, weights)
    return plan


def merge_shared_heads(heads: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged plan's operands, for CUDA-graph capture and for the custom ops (which take
    tensors, not plans): ``(heads_eff, weights_eff)`` to pass to ``multihead_logits`` /
    ``multihead_sample`` in place of ``(heads, weights)`` — U merged heads and one-hot weights when
    the rows share U < H weight vectors, else the heads and fp32 weights. Merges every call (no
    cache): call it once, outside capture, and keep both tensors alive while a graph replays."""
    plan = plan_heads(heads, weights)
    return plan.heads, plan.weights
