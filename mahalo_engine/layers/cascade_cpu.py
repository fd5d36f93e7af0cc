"""Cascade decode attention on CPU through torch's fused CPU flash-attention op.

Same contract as ``triton_kernels.reference.cascade_decode_attention`` (its readable spec), but
each part — the K·G queries of a request over its prefix, each candidate's G queries over its own
suffix — runs in ``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the
log-sum-exp the merge needs; the reference's einsums and masked copies of the prefix made the
shared-prefix layout slower than SDPA over forked copies on CPU. Keys past a length are masked by
an additive ``-inf`` mask; a part with no key at all counts as empty (weight 0 in the merge).
"""
from __future__ import annotations

import math

import torch

from triton_kernels.checks import check_cascade
from triton_kernels.reference import merge_partials

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor, scale: float
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [N,h,Q,hd]`` over the first ``lens[n]`` keys of ``k/v [N,h,T,hd]`` → float32
    ``(o [N,h,Q,hd], lse [N,h,Q])``; ``lse = -inf`` and ``o = 0`` where no key is valid."""
    valid = torch.arange(k.shape[2], device=k.device)[None, :] < lens.reshape(-1, 1)
    bias = torch.zeros(valid.shape, dtype=q.dtype).masked_fill_(~valid, float("-inf"))
    o, lse = _flash_cpu(q, k, v, 0.0, False, attn_mask=bias[:, None, None, :], scale=scale)
    empty = (lens.reshape(-1) <= 0)[:, None, None]
    lse = torch.where(empty, float("-inf"), lse.float())
    return torch.where(empty[..., None], 0.0, o.float()), lse


def cascade_decode_attention_cpu(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
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
