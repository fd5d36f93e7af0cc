"""Pure-torch definition of cascade (shared-prefix) attention, decode and extend (the readable spec).

Same signatures as the launchers in ``triton_kernels.cascade.launcher``: what the Triton kernels and
the CPU path (``triton_kernels.cascade.cpu``) are tested against.

- ``cascade_decode_attention``: one decode token per candidate over its request's shared prefix
  and its own suffix, as two partial softmaxes merged by log-sum-exp.
- ``cascade_extend_attention``: the same for a ragged run of new tokens per candidate (a PRM
  scoring candidate steps): no mask over the prefix, a causal one over the candidate's suffix.
"""
from __future__ import annotations

import torch

from triton_kernels.checks import check_cascade, check_cascade_extend


# ---- cascade (shared-prefix) decode attention ---------------------------------------------------
#
# K candidates of one request share its committed prefix; each also has its own short suffix (the
# current step's tokens). One new query token per candidate attends ``prefix[:plen[r]]`` and
# ``suffix[r, k, :slen[r, k]]``: attention is computed over each part separately, giving a partial
# output normalised within the part and its log-sum-exp, and the two merge exactly by
# ``o = e^(lse_p - lse) o_p + e^(lse_s - lse) o_s`` with ``lse = logaddexp(lse_p, lse_s)``.


def attend_partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor,
                   scale: float, mask: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [N, n_kv, Q, hd]`` over the first ``lens[n]`` keys of
    ``k/v [N, n_kv, T, hd]`` → float32 ``(o [N, n_kv, Q, hd], lse [N, n_kv, Q])``.

    ``mask`` (bool ``[N, Q, T]``, True = attend) narrows each query's keys further (a causal
    mask). Keys at ``>= lens[n]`` are never read into the result (masked with ``where``, so
    NaN/inf there cannot leak); a query with no key gives ``o = 0``, ``lse = -inf``.
    """
    valid = torch.arange(k.shape[2], device=k.device)[None, :] < lens.reshape(-1, 1)  # [N, T]
    kf = torch.where(valid[:, None, :, None], k.float(), 0.0)
    vf = torch.where(valid[:, None, :, None], v.float(), 0.0)
    attend = valid[:, None, :] if mask is None else valid[:, None, :] & mask  # [N, Q|1, T]
    s = torch.einsum("nhqd,nhtd->nhqt", q.float(), kf) * scale
    s = s.masked_fill(~attend[:, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf on an empty row
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # exp(-inf) = 0
    return torch.einsum("nhqt,nhtd->nhqd", p, vf), lse


def merge_partials(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised partial attentions ``o [..., hd]`` with log-sum-exps ``lse [...]``.

    Exact when one side is empty (``lse = -inf``): its weight is ``exp(-inf) = 0`` and the other's
    ``exp(0) = 1``. Both empty → ``o = 0``, ``lse = -inf``.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    ref = torch.where(torch.isinf(lse), 0.0, lse)
    w_a = torch.exp(lse_a - ref)[..., None]
    w_b = torch.exp(lse_b - ref)[..., None]
    return w_a * o_a + w_b * o_b, lse


def cascade_decode_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor, *,
                             scale: float | None = None) -> torch.Tensor:
    """One decode token per candidate over a shared prefix and a per-candidate suffix.

    ``q [R, K, H, hd]`` (R requests × K candidates, H = n_kv·G query heads, head ``h = kv·G + g``);
    ``prefix_k/v [R, n_kv, Tp, hd]`` with ``prefix_lens`` int ``[R]``; ``suffix_k/v [R, K, n_kv,
    Ts, hd]`` with ``suffix_lens`` int ``[R, K]`` (the current token's K/V already written).
    Returns ``[R, K, H, hd]`` in ``q``'s dtype: ``softmax(q·[Kp; Ks]ᵀ·scale)·[Vp; Vs]`` over the
    valid positions of both parts (default ``scale = hd^-0.5``).
    """
    check_cascade(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens)
    r, k, h, hd = q.shape
    n_kv = prefix_k.shape[1]
    g = h // n_kv
    scale = hd ** -0.5 if scale is None else scale
    # Prefix: all K·G queries of a KV head at once (the prefix read once per request).
    qp = q.reshape(r, k, n_kv, g, hd).permute(0, 2, 1, 3, 4).reshape(r, n_kv, k * g, hd)
    o_p, lse_p = attend_partial(qp, prefix_k, prefix_v, prefix_lens, scale)
    o_p = o_p.reshape(r, n_kv, k, g, hd).permute(0, 2, 1, 3, 4)  # [R, K, n_kv, G, hd]
    lse_p = lse_p.reshape(r, n_kv, k, g).permute(0, 2, 1, 3)
    # Suffix: each candidate's G queries per KV head over its own tokens.
    qs = q.reshape(r * k, n_kv, g, hd)
    ts = suffix_k.shape[3]
    o_s, lse_s = attend_partial(qs, suffix_k.reshape(r * k, n_kv, ts, hd),
                                suffix_v.reshape(r * k, n_kv, ts, hd), suffix_lens.reshape(-1),
                                scale)
    o, _ = merge_partials(o_p, lse_p, o_s.reshape(r, k, n_kv, g, hd), lse_s.reshape(r, k, n_kv, g))
    return o.reshape(r, k, h, hd).to(q.dtype)


# ---- cascade extend attention (several new tokens per candidate) --------------------------------
#
# A PRM scoring K candidate steps appends each candidate's ``num_new[r, k]`` step tokens (ragged,
# right-padded to T) after the request's shared prefix. New token t of candidate (r, k) sits at
# suffix position ``suffix_lens[r, k] - num_new[r, k] + t`` (``suffix_lens`` counts the new tokens)
# and attends the whole prefix (it is entirely before) and the suffix positions up to its own.


def suffix_query_mask(suffix_lens: torch.Tensor, num_new: torch.Tensor, t: int, ts: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(attend [N, T, Ts], real [N, T])`` for ``N`` candidates (lens flattened): query t of
    candidate n sees suffix key j iff ``j <= suffix_lens[n] - num_new[n] + t``; it is a real
    token iff ``t < num_new[n]`` (padded queries see nothing)."""
    slen, new = suffix_lens.reshape(-1, 1).long(), num_new.reshape(-1, 1).long()
    offs = torch.arange(t, device=slen.device)[None, :]
    real = offs < new  # [N, T]
    pos = slen - new + offs  # each query's own suffix position
    keys = torch.arange(ts, device=slen.device)[None, None, :]
    return (keys <= pos[:, :, None]) & real[:, :, None], real


def cascade_extend_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                             prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                             suffix_v: torch.Tensor, suffix_lens: torch.Tensor,
                             num_new: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Ragged new tokens per candidate over a shared prefix and a per-candidate causal suffix.

    ``q [R, K, T, H, hd]`` (head ``h = kv·G + g``); ``prefix_k/v [R, n_kv, Tp, hd]`` with
    ``prefix_lens [R]``; ``suffix_k/v [R, K, n_kv, Ts, hd]`` with ``suffix_lens [R, K]`` (the new
    tokens' K/V already written, and counted); ``num_new [R, K]`` new tokens per candidate (0..T).
    Returns ``[R, K, T, H, hd]`` in q's dtype: for ``t < num_new[r, k]``,
    ``softmax(q·[Kp; Ks]ᵀ·scale)·[Vp; Vs]`` over ``prefix[:plen]`` and ``suffix[:pos + 1]`` with
    ``pos = suffix_lens - num_new + t``; 0 for padded queries (``t >= num_new``). With T = 1 and
    ``num_new = 1`` this is `cascade_decode_attention`.
    """
    check_cascade_extend(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, suffix_lens,
                         num_new)
    r, k, t, h, hd = q.shape
    n_kv, ts = prefix_k.shape[1], suffix_k.shape[3]
    g = h // n_kv
    scale = hd ** -0.5 if scale is None else scale
    # Prefix: all K·T·G queries of a KV head at once (the prefix read once per request), unmasked.
    qp = q.reshape(r, k, t, n_kv, g, hd).permute(0, 3, 1, 2, 4, 5).reshape(r, n_kv, k * t * g, hd)
    o_p, lse_p = attend_partial(qp, prefix_k, prefix_v, prefix_lens, scale)
    o_p = o_p.reshape(r, n_kv, k, t, g, hd).permute(0, 2, 3, 1, 4, 5)  # [R, K, T, n_kv, G, hd]
    lse_p = lse_p.reshape(r, n_kv, k, t, g).permute(0, 2, 3, 1, 4)
    # Suffix: each candidate's T·G queries per KV head over its own tokens, causally.
    attend, real = suffix_query_mask(suffix_lens, num_new, t, ts)
    qs = q.reshape(r * k, t, n_kv, g, hd).permute(0, 2, 1, 3, 4).reshape(r * k, n_kv, t * g, hd)
    o_s, lse_s = attend_partial(qs, suffix_k.reshape(r * k, n_kv, ts, hd),
                                suffix_v.reshape(r * k, n_kv, ts, hd), suffix_lens.reshape(-1),
                                scale, attend.repeat_interleave(g, dim=1))
    o_s = o_s.reshape(r, k, n_kv, t, g, hd).permute(0, 1, 3, 2, 4, 5)
    lse_s = lse_s.reshape(r, k, n_kv, t, g).permute(0, 1, 3, 2, 4)
    o, _ = merge_partials(o_p, lse_p, o_s, lse_s)
    o = torch.where(real.reshape(r, k, t, 1, 1, 1), o, 0.0)
    return o.reshape(r, k, t, h, hd).to(q.dtype)
