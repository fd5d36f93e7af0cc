"""The cascade op's CPU path: decode and extend attention through torch's fused CPU flash attention.

Same contracts as ``triton_kernels.cascade.reference`` (the readable spec), but each part — the K·G
queries of a request over its prefix, each candidate's G queries over its own suffix — runs in
``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp the merge
needs; the reference's einsums and masked copies of the prefix made the shared-prefix layout slower
than SDPA over forked copies on CPU. Keys past a length are masked by an additive ``-inf`` mask
(plus the causal mask over a candidate's suffix in extend); a query with no key at all counts as
empty (weight 0 in the merge).
"""
from __future__ import annotations

import math

import torch

from triton_kernels.checks import check_cascade, check_cascade_extend
from triton_kernels.cascade.reference import merge_partials, suffix_query_mask

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float,
          mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N,h,Q,hd]`` over the first ``lens[n]`` keys of ``k/v [N,h,T,hd]`` → float32
    ``(o [N,h,Q,hd], lse [N,h,Q])``; ``mask`` (bool ``[N,Q,T]``) narrows each query's keys;
    ``lse = -inf`` and ``o = 0`` where a query has no valid key."""
    valid = (torch.arange(k.shape[2], device=k.device)[None, :] < lens.reshape(-1, 1))[:, None]
    if mask is not None:
        valid = valid & mask  # [N, Q|1, T]
    bias = torch.zeros(valid.shape, dtype=q.dtype).masked_fill_(~valid, float("-inf"))
    o, lse = _flash_cpu(q, k, v, 0.0, False, attn_mask=bias[:, None], scale=scale)
    empty = ~valid.any(dim=-1)[:, None]  # [N, 1, Q|1]
    lse = torch.where(empty, float("-inf"), lse.float())
    return torch.where(empty[..., None], 0.0, o.float()), lse


def cascade_decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor, *,
                             scale: float | None = None) -> torch.Tensor:
    """``q [R,K,H,hd]`` over ``prefix_k/v [R,n_kv,Tp,hd]`` (``prefix_lens [R]``) and
    ``suffix_k/v [R,K,n_kv,Ts,hd]`` (``suffix_lens [R,K]``) → ``[R,K,H,hd]`` in q's dtype."""
    check_cascade(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens)
    r, k, h, hd = q.shape
    n_kv, ts = prefix_k.shape[1], suffix_k.shape[3]
    g = h // n_kv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qp = q.view(r, k, n_kv, g, hd).permute(0, 2, 1, 3, 4).reshape(r, n_kv, k * g, hd)
    o_p, lse_p = _part(qp, prefix_k, prefix_v, prefix_lens, scale)
    o_p = o_p.view(r, n_kv, k, g, hd).permute(0, 2, 1, 3, 4)
    lse_p = lse_p.view(r, n_kv, k, g).permute(0, 2, 1, 3)
    o_s, lse_s = _part(q.reshape(r * k, n_kv, g, hd), suffix_k.reshape(r * k, n_kv, ts, hd),
                       suffix_v.reshape(r * k, n_kv, ts, hd), suffix_lens, scale)
    o, _ = merge_partials(o_p, lse_p, o_s.view(r, k, n_kv, g, hd), lse_s.view(r, k, n_kv, g))
    return o.reshape(r, k, h, hd).to(q.dtype)


def cascade_extend_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor,
                             num_new: torch.Tensor, *, scale: float | None = None
                             ) -> torch.Tensor:
    """``q [R,K,T,H,hd]`` over ``prefix_k/v [R,n_kv,Tp,hd]`` (``prefix_lens [R]``) and, causally,
    ``suffix_k/v [R,K,n_kv,Ts,hd]`` (``suffix_lens [R,K]``, ``num_new [R,K]`` of them new) →
    ``[R,K,T,H,hd]`` in q's dtype, 0 at padded queries."""
    check_cascade_extend(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                         num_new)
    r, k, t, h, hd = q.shape
    n_kv, ts = prefix_k.shape[1], suffix_k.shape[3]
    g = h // n_kv
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    # The prefix part: every K·T·G query of a KV head in one call (one read of the prefix).
    qp = q.reshape(r, k, t, n_kv, g, hd).permute(0, 3, 1, 2, 4, 5).reshape(r, n_kv, k * t * g, hd)
    o_p, lse_p = _part(qp, prefix_k, prefix_v, prefix_lens, scale)
    o_p = o_p.view(r, n_kv, k, t, g, hd).permute(0, 2, 3, 1, 4, 5)
    lse_p = lse_p.view(r, n_kv, k, t, g).permute(0, 2, 3, 1, 4)
    attend, real = suffix_query_mask(suffix_lens, num_new, t, ts)
    qs = q.reshape(r * k, t, n_kv, g, hd).permute(0, 2, 1, 3, 4).reshape(r * k, n_kv, t * g, hd)
    o_s, lse_s = _part(qs, suffix_k.reshape(r * k, n_kv, ts, hd),
                       suffix_v.reshape(r * k, n_kv, ts, hd), suffix_lens, scale,
                       attend.repeat_interleave(g, dim=1))
    o_s = o_s.view(r, k, n_kv, t, g, hd).permute(0, 1, 3, 2, 4, 5)
    lse_s = lse_s.view(r, k, n_kv, t, g).permute(0, 1, 3, 2, 4)
    o, _ = merge_partials(o_p, lse_p, o_s, lse_s)
    o = torch.where(real.reshape(r, k, t, 1, 1, 1), o, 0.0)
    return o.reshape(r, k, t, h, hd).to(q.dtype)
