"""Triton kernels of cascade (shared-prefix) decode attention: partials, then a log-sum-exp merge.

Request r has one prefix (its committed text, ``plen[r]`` tokens) and K candidates, each with one
new query token (H = n_kv·G heads) and its own suffix (``slen[r, k]`` tokens, the current one
included). ``_cascade_partials_kernel`` runs on a grid ``(R·n_kv, n_splits + 1)``:

- programs ``split < n_splits`` own one chunk of the prefix of one (request, KV head): the K·G
  queries that share that KV head are one ``[BLOCK_Q, hd]`` tile, so each prefix K/V tile is read
  once and multiplied against every candidate's queries (the prefix read once per request, not
  once per candidate). Chunks past ``plen`` (read on the device) are empty.
- the program ``split == n_splits`` owns the suffixes: for each candidate, its G queries over its
  own few tokens.

Each writes a normalised partial output and its log-sum-exp (base 2; ``-inf`` when empty) per
query row. ``_cascade_merge_kernel`` folds the ``n_splits + 1`` partials of each row by their
log-sum-exps (an empty partial weighs exactly 0). Lengths are read on the device and the grid
depends only on shapes and the host-side prefix bound, so a launch is CUDA-graph safe.
Positions at or past a length are never loaded (masked loads), so stale or poisoned cache memory
cannot leak into the result.
"""
import triton
import triton.language as tl


@triton.jit
def _attend_tile(q, k_base, v_base, stride_t, lo, hi, row_hi, qk_scale, m, l, acc, dims, d_ok,
                 BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                 CAUSAL: tl.constexpr):
    """Online softmax of ``q`` over keys ``[lo, hi)``, in base 2 (``qk_scale`` = scale·log2 e,
    applied to the fp32 scores so that q is not rounded a second time). ``CAUSAL``: row i sees
    only keys ``< row_hi[i]`` (a row may see no key of a tile, or none at all: its running max
    then stays -inf without producing NaN); otherwise every row sees every key (``row_hi``
    unused) and every tile holds a valid key, so the decode kernel pays for no guard."""
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        offs = n.to(tl.int64)[:, None] * stride_t + dims[None, :]
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs, mask=kv_mask, other=0.0)
        if UPCAST_DOT:  # interpreter only: its bf16 dot multiplies raw bits (triton#11584)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL:
            s = tl.where(n[None, :] < row_hi[:, None], s, float("-inf"))
        else:
            s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        if CAUSAL:
            ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: weights 0, not nan
        else:
            ref = m_new  # finite: every tile has a valid key
        alpha = tl.exp2(m - ref)
        p = tl.exp2(s - ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    return m, l, acc


@triton.jit
def _store_partial(o_ptr, lse_ptr, rows, row_ok, m, l, acc, dims, d_ok, HEAD_DIM: tl.constexpr):
    empty = l == 0.0
    o = acc / tl.where(empty, 1.0, l)[:, None]
    lse = tl.where(empty, float("-inf"), m + tl.log2(tl.where(empty, 1.0, l)))
    tl.store(o_ptr + rows[:, None] * HEAD_DIM + dims[None, :], o,
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _prefix_partial(q_base, pk_ptr, pv_ptr, plen_ptr, part_o_ptr, part_lse_ptr, r, kvh, split,
                    K, chunk, qk_scale, stride_qk, stride_qh, stride_pr, stride_ph, stride_pt,
                    stride_pl, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    UPCAST_DOT: tl.constexpr):
    """One prefix chunk for all K·G queries of one (request, KV head)."""
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    rows = tl.arange(0, BLOCK_Q)
    row_ok = rows < K * G
    cand = rows // G
    q = tl.load(q_base + cand[:, None] * stride_qk + (rows - cand * G)[:, None] * stride_qh
                + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    plen = tl.load(plen_ptr + r * stride_pl)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, plen)
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    base = r.to(tl.int64) * stride_pr + kvh.to(tl.int64) * stride_ph
    m, l, acc = _attend_tile(q, pk_ptr + base, pv_ptr + base, stride_pt, lo, hi, hi, qk_scale, m,
                             l, acc, dims, d_ok, BLOCK_N, DOT_PRECISION, UPCAST_DOT, False)
    _store_partial(part_o_ptr, part_lse_ptr, rows, row_ok, m, l, acc, dims, d_ok, HEAD_DIM)


@triton.jit
def _suffix_partials(q_base, sk_ptr, sv_ptr, slen_ptr, part_o_ptr, part_lse_ptr, r, kvh, K,
                     qk_scale, stride_qk, stride_qh, stride_sr, stride_sk, stride_sh, stride_st,
                     stride_lr, stride_lk, G: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_NS: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """Each candidate's G queries of one (request, KV head) over that candidate's own suffix."""
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < G
    for c in range(0, K):
        q = tl.load(q_base + c * stride_qk + rows[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST_DOT:
            q = q.to(tl.float32)
        slen = tl.load(slen_ptr + r * stride_lr + c * stride_lk)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        l = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        # int64: c·stride_sk passes 2**31 at K·n_kv·Ts·hd = 64·32·8192·128 (the request's too).
        base = r.to(tl.int64) * stride_sr + tl.cast(c, tl.int64) * stride_sk \
            + kvh.to(tl.int64) * stride_sh
        m, l, acc = _attend_tile(q, sk_ptr + base, sv_ptr + base, stride_st, 0, slen, slen,
                                 qk_scale, m, l, acc, dims, d_ok, BLOCK_NS, DOT_PRECISION,
                                 UPCAST_DOT, False)
        _store_partial(part_o_ptr + c * G * HEAD_DIM, part_lse_ptr + c * G, rows, row_ok, m, l,
                       acc, dims, d_ok, HEAD_DIM)


@triton.jit
def _cascade_partials_kernel(
        q_ptr, pk_ptr, pv_ptr, plen_ptr, sk_ptr, sv_ptr, slen_ptr, part_o_ptr, part_lse_ptr,
        n_kv, K, chunk, n_splits, qk_scale,
        stride_qr, stride_qk, stride_qh,
        stride_pr, stride_ph, stride_pt,
        stride_sr, stride_sk, stride_sh, stride_st,
        stride_pl, stride_lr, stride_lk,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    r = pid // n_kv
    kvh = pid - r * n_kv
    q_base = q_ptr + r.to(tl.int64) * stride_qr + (kvh * G).to(tl.int64) * stride_qh
    # Partials of this (request, KV head): [n_splits + 1, K·G, HEAD_DIM] fp32, row = cand·G + g.
    part = (pid.to(tl.int64) * (n_splits + 1) + split) * K * G
    if split < n_splits:
        _prefix_partial(q_base, pk_ptr, pv_ptr, plen_ptr, part_o_ptr + part * HEAD_DIM,
                        part_lse_ptr + part, r, kvh, split, K, chunk, qk_scale, stride_qk,
                        stride_qh, stride_pr, stride_ph, stride_pt, stride_pl, G, HEAD_DIM,
                        BLOCK_D, BLOCK_Q, BLOCK_N, DOT_PRECISION, UPCAST_DOT)
    else:
        _suffix_partials(q_base, sk_ptr, sv_ptr, slen_ptr, part_o_ptr + part * HEAD_DIM,
                         part_lse_ptr + part, r, kvh, K, qk_scale, stride_qk, stride_qh,
                         stride_sr, stride_sk, stride_sh, stride_st, stride_lr, stride_lk, G,
                         HEAD_DIM, BLOCK_D, BLOCK_G, BLOCK_NS, DOT_PRECISION, UPCAST_DOT)


@triton.jit
def _merge_partials(part_o_ptr, part_lse_ptr, pid, n_parts, rows_per_part, rows, row_ok, dims,
                    mask, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Σ_j 2^(lse_j - lse) o_j`` over program ``pid``'s ``n_parts`` partials (``rows_per_part``
    rows each) for ``rows``; 0 where every partial is empty."""
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    den = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for j in range(0, n_parts):
        part = (pid.to(tl.int64) * n_parts + j) * rows_per_part
        lse = tl.load(part_lse_ptr + part + rows, mask=row_ok, other=float("-inf"))
        o = tl.load(part_o_ptr + (part + rows[:, None]) * HEAD_DIM + dims[None, :], mask=mask,
                    other=0.0)
        m_new = tl.maximum(m, lse)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all empty so far: weights 0, not nan
        alpha = tl.exp2(m - ref)
        w = tl.exp2(lse - ref)
        den = den * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o
        m = m_new
    return acc / tl.where(den == 0.0, 1.0, den)[:, None]


@triton.jit
def _cascade_merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, n_kv, K, n_parts,
                          stride_or, stride_ok, stride_oh,
                          G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_Q: tl.constexpr):
    """``out[r, cand, kvh·G + g] = Σ_j 2^(lse_j - lse) o_j`` over the ``n_parts`` partials."""
    pid = tl.program_id(0)
    r = pid // n_kv
    kvh = pid - r * n_kv
    rows = tl.arange(0, BLOCK_Q)
    row_ok = rows < K * G
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    o = _merge_partials(part_o_ptr, part_lse_ptr, pid, n_parts, K * G, rows, row_ok, dims, mask,
                        HEAD_DIM, BLOCK_Q, BLOCK_D)
    cand = rows // G
    tl.store(out_ptr + r.to(tl.int64) * stride_or + cand[:, None] * stride_ok
             + (kvh * G + rows - cand * G)[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)


# ---- extend: several new tokens per candidate (a PRM scoring candidate steps) ------------------
#
# Candidate (r, c) has ``nnew[r, c]`` new tokens (ragged, right-padded to T); query row
# ``(c·T + t)·G + g`` of KV head kvh is token t's head ``kvh·G + g``. The K·T·G rows of a
# (request, KV head) are cut into blocks of BLOCK_Q; the grid is ``(R·n_kv, row blocks,
# n_splits + 1)``: programs ``split < n_splits`` attend one prefix chunk for every row of their
# block (one prefix tile load serves all those rows, of every candidate), the last one attends
# each candidate's suffix with the causal mask (token t at suffix position ``slen - nnew + t``
# sees suffix keys up to its own position).


@triton.jit
def _extend_rows(nnew_ptr, r, qb, K, T, stride_nr, stride_nk, G: tl.constexpr,
                 BLOCK_Q: tl.constexpr):
    """Row block ``qb``'s rows: (row index, in range, candidate, token, head in group, nnew)."""
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    row_ok = rows < K * T * G
    cand = rows // (T * G)
    rem = rows - cand * (T * G)
    tok = rem // G
    nnew = tl.load(nnew_ptr + r * stride_nr + cand * stride_nk, mask=row_ok, other=0)
    return rows, row_ok, cand, tok, rem - tok * G, nnew


@triton.jit
def _cascade_extend_partials_kernel(
        q_ptr, pk_ptr, pv_ptr, plen_ptr, sk_ptr, sv_ptr, slen_ptr, nnew_ptr, part_o_ptr,
        part_lse_ptr, n_kv, K, T, chunk, n_splits, qk_scale,
        stride_qr, stride_qk, stride_qt, stride_qh,
        stride_pr, stride_ph, stride_pt,
        stride_sr, stride_sk, stride_sh, stride_st,
        stride_pl, stride_lr, stride_lk, stride_nr, stride_nk,
        G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_NS: tl.constexpr, DOT_PRECISION: tl.constexpr,
        UPCAST_DOT: tl.constexpr):
    pid = tl.program_id(0)
    qb = tl.program_id(1)
    split = tl.program_id(2)
    r = pid // n_kv
    kvh = pid - r * n_kv
    rows, row_ok, cand, tok, gq, nnew = _extend_rows(nnew_ptr, r, qb, K, T, stride_nr, stride_nk,
                                                     G, BLOCK_Q)
    real = row_ok & (tok < nnew)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q_base = q_ptr + r.to(tl.int64) * stride_qr + (kvh * G).to(tl.int64) * stride_qh
    q = tl.load(q_base + cand[:, None] * stride_qk + tok[:, None] * stride_qt
                + gq[:, None] * stride_qh + dims[None, :],
                mask=real[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    if split < n_splits:
        plen = tl.load(plen_ptr + r * stride_pl)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, plen)
        base = r.to(tl.int64) * stride_pr + kvh.to(tl.int64) * stride_ph
        m, l, acc = _attend_tile(q, pk_ptr + base, pv_ptr + base, stride_pt, lo, hi, hi,
                                 qk_scale, m, l, acc, dims, d_ok, BLOCK_N, DOT_PRECISION,
                                 UPCAST_DOT, False)
    else:
        # Each candidate that has rows in this block, over its own suffix; other rows see no key.
        c_lo = (qb * BLOCK_Q) // (T * G)
        c_hi = tl.minimum(K, ((qb + 1) * BLOCK_Q - 1) // (T * G) + 1)
        for c in range(c_lo, c_hi):
            slen = tl.load(slen_ptr + r * stride_lr + c * stride_lk)
            row_hi = tl.where(real & (cand == c), slen - nnew + tok + 1, 0)
            base = r.to(tl.int64) * stride_sr + tl.cast(c, tl.int64) * stride_sk \
                + kvh.to(tl.int64) * stride_sh
            m, l, acc = _attend_tile(q, sk_ptr + base, sv_ptr + base, stride_st, 0, slen,
                                     row_hi, qk_scale, m, l, acc, dims, d_ok, BLOCK_NS,
                                     DOT_PRECISION, UPCAST_DOT, True)
    # Partials of this (request, KV head): [n_splits + 1, K·T·G, HEAD_DIM] fp32.
    part = (pid.to(tl.int64) * (n_splits + 1) + split) * K * T * G
    _store_partial(part_o_ptr + part * HEAD_DIM, part_lse_ptr + part, rows, row_ok, m, l, acc,
                   dims, d_ok, HEAD_DIM)


@triton.jit
def _cascade_extend_merge_kernel(part_o_ptr, part_lse_ptr, nnew_ptr, out_ptr, n_kv, K, T,
                                 n_parts, stride_or, stride_ok, stride_ot, stride_oh,
                                 stride_nr, stride_nk,
                                 G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_Q: tl.constexpr):
    """``out[r, c, t, kvh·G + g]`` = the log-sum-exp merge of the row's partials; 0 at padded
    tokens (``t >= nnew[r, c]``)."""
    pid = tl.program_id(0)
    qb = tl.program_id(1)
    r = pid // n_kv
    kvh = pid - r * n_kv
    rows, row_ok, cand, tok, gq, nnew = _extend_rows(nnew_ptr, r, qb, K, T, stride_nr, stride_nk,
                                                     G, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    mask = row_ok[:, None] & d_ok[None, :]
    o = _merge_partials(part_o_ptr, part_lse_ptr, pid, n_parts, K * T * G, rows, row_ok, dims,
                        mask, HEAD_DIM, BLOCK_Q, BLOCK_D)
    o = tl.where((tok < nnew)[:, None], o, 0.0)
    tl.store(out_ptr + r.to(tl.int64) * stride_or + cand[:, None] * stride_ok
             + tok[:, None] * stride_ot + (kvh * G + gq)[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask)
