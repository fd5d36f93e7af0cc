"""Triton kernels: the fused H-head projection, and projection + log-sum-exp + sampling.

Projection (the "stacked GEMM"): ``z[b,v] = Σ_i w[b,i] · Σ_k h[b,k] · W_i[v,k]`` is one GEMM over
``K = H·d`` with row scales; each program owns a ``[BLOCK_B, BLOCK_V]`` tile of ``z`` and walks K
head by head. The weight ``w[b,i]`` is applied in fp32 to the head's fp32 partial product rather
than to ``h`` before the dot, so no ``w·h`` product is rounded to bf16; the heads are still read
exactly once per row tile. Decoding (B ≤ 64) is bound by reading ``H·V·d`` weights, so rows share
one tile (``BLOCK_B`` up to 64) and the row-tile axis is the fastest grid axis (L2 reuse for B > 64).

Sampling never writes ``[B,V]``. ``_sample_partials_kernel`` gives each program a chunk of V tiles
and writes, per row and chunk: the running max and sum-exp of ``s = z/T`` (online LSE), and either
the best ``(score, index, s)`` — score ``s`` for greedy, ``s + Gumbel`` for sampling — or, for top-k,
the chunk's best ``KPAD`` candidates packed as int64 keys (``s`` order-preserving in the high word,
``~index`` in the low word: one integer sort orders by ``s`` then lower index). The launcher merges
top-k candidates with ``torch.topk`` over ``[B, n_parts·KPAD]`` keys, and ``_sample_finish_kernel``
(one program per row) reduces the partials to the token and ``log softmax(z/T)`` at it.

Randomness: Philox-4x32 keyed by the 64-bit ``seed``, counter ``(vocab index, row, offset lo, offset
hi)``: every (seed, offset, row, index) gets its own uniform, so the plain and top-k paths and the
merged-heads path see the same noise for the same token. ``seed``/``offset`` are kernel scalars or
pointers to 1-element int64 tensors read on the device (``*_IS_PTR``), so a CUDA-graph replay
after ``offset.add_(1)`` draws fresh numbers.
"""
import triton
import triton.language as tl

MODE_GREEDY = 0  # argmax of z/T; T = 0 is passed as inv_temp = 1 (log-probs under T = 1)
MODE_GUMBEL = 1  # argmax of z/T + Gumbel noise = an exact draw from softmax(z/T)
MODE_TOPK = 2  # Gumbel-max restricted to the top_k largest z/T

_LOW_BITS = 0x7FFFFFFF  # low word of a packed key holds _LOW_BITS - index (index < 2**31)
_MIN_KEY = -(2**63)


@triton.jit
def _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                  stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                  BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    """fp32 ``[BLOCK_B, BLOCK_V]`` tile of ``Σ_i w[rows,i] · hidden[rows] @ heads[i, cols].T``."""
    row_ok = rows < B
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_K)
    x_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_xb
    head_rows = heads_ptr + cols.to(tl.int64)[:, None] * stride_hv
    mix_ptrs = weights_ptr + rows.to(tl.int64) * stride_wb
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for _ in range(H):
        part = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            k_ok = k < D
            x = tl.load(x_rows + k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(head_rows + k[None, :] * stride_hd, mask=col_ok[:, None] & k_ok[None, :],
                        other=0.0)
            part = tl.dot(x, tl.trans(w), part, input_precision=DOT_PRECISION)
        mix = tl.load(mix_ptrs, mask=row_ok, other=0.0)
        acc += mix[:, None] * part
        # Pointer increments (64-bit) instead of i * stride: H·V·d can exceed 2**31 elements.
        head_rows += stride_hh
        mix_ptrs += stride_wh
    return acc


@triton.jit
def _logits_kernel(hidden_ptr, weights_ptr, heads_ptr, out_ptr, B, V, D, H,
                   stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                   stride_ob,
                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                      stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                      BLOCK_B, BLOCK_V, BLOCK_K, DOT_PRECISION)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
    tl.store(ptrs, z, mask=(rows < B)[:, None] & (cols < V)[None, :])


@triton.jit
def _scalar_arg(value, IS_PTR: tl.constexpr):
    if IS_PTR:
        return tl.load(value).to(tl.int64)
    return value.to(tl.int64)


@triton.jit
def _gumbel(seed, offset, rows, cols):
    """Gumbel(0,1) noise, one independent draw per (seed, offset, row, col); rows/cols same shape."""
    zero = rows.to(tl.uint32) * 0
    off_lo = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = zero + ((offset >> 32) & 0x7FFFFFFF).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, cols.to(tl.uint32), rows.to(tl.uint32), off_lo, off_hi)
    # 24 random bits, centred in their bucket: u in (0, 1) strictly, so both logs are finite.
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _pack_keys(s, cols):
    """int64 keys ordered like (s, -col): float bits made order-preserving in the high word."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (_LOW_BITS - cols).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    cols = _LOW_BITS - (keys & _LOW_BITS).to(tl.int32)
    return bits.to(tl.float32, bitcast=True), cols


@triton.jit
def _bitonic_step(x, R: tl.constexpr, N: tl.constexpr, J: tl.constexpr, S: tl.constexpr,
                  ASC_FIRST: tl.constexpr):
    """One compare-and-swap layer of a bitonic network on the rows of int64 ``x [R, N]``.

    Partners sit J apart. The block of 2**S elements holding position p is ordered descending when
    bit S of p equals ASC_FIRST (so blocks alternate, the first one descending unless ASC_FIRST).
    Only elementwise ops and a sum over a size-2 axis (partner = pair sum - self, exact in wrapping
    int64 arithmetic): cheap in the interpreter, unlike a custom-combine reduction.
    """
    G: tl.constexpr = N // (2 * J)
    y = tl.reshape(x, (R, G, 2, J))
    partner = tl.sum(y, axis=2, keep_dims=True) - y
    right = tl.arange(0, 2)[None, None, :, None] == 1
    pos = tl.arange(0, G)[None, :, None, None] * (2 * J)
    descending = ((pos >> S) & 1) == ASC_FIRST
    keep_max = descending != right
    y = tl.where(keep_max, tl.maximum(y, partner), tl.minimum(y, partner))
    return tl.reshape(y, (R, N))


@triton.jit
def _top_keys(x, R: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr, LOG_K: tl.constexpr,
              ASC_FIRST: tl.constexpr):
    """The 2**LOG_K largest keys of each row of ``x [R, 2**LOG_N]``, sorted descending (ascending
    if ASC_FIRST): sort runs of K, then repeatedly keep the elementwise max of opposite-ordered run
    pairs (the top K of the pair, as a bitonic run) and re-merge it."""
    K: tl.constexpr = 1 << LOG_K
    for s in tl.static_range(1, LOG_K + 1):
        for t in tl.static_range(s):
            x = _bitonic_step(x, R, N, 1 << (s - 1 - t), s, ASC_FIRST)
    for level in tl.static_range(LOG_N - LOG_K):
        x = tl.reshape(tl.max(tl.reshape(x, (R, (N >> level) // (2 * K), 2, K)), axis=2),
                       (R, (N >> level) // 2))
        for t in tl.static_range(LOG_K):
            x = _bitonic_step(x, R, (N >> level) // 2, K >> (t + 1), LOG_K, ASC_FIRST)
    return x


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_partials_kernel(hidden_ptr, weights_ptr, heads_ptr, seed, offset,
                            part_max_ptr, part_sumexp_ptr, part_best_ptr, part_token_ptr,
                            part_scaled_ptr, part_keys_ptr,
                            B, V, D, H,
                            stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv,
                            stride_hd, inv_temp, n_tiles, tiles_per_part, n_parts,
                            MODE: tl.constexpr, SEED_IS_PTR: tl.constexpr,
                            OFFSET_IS_PTR: tl.constexpr, LOG_KPAD: tl.constexpr,
                            BLOCK_B: tl.constexpr, LOG_BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    KPAD: tl.constexpr = 1 << LOG_KPAD
    BLOCK_V: tl.constexpr = 1 << LOG_BLOCK_V
    part = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lanes = tl.arange(0, BLOCK_V)
    if MODE == MODE_GUMBEL:
        seed_v = _scalar_arg(seed, SEED_IS_PTR)
        offset_v = _scalar_arg(offset, OFFSET_IS_PTR)

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_token = tl.zeros((BLOCK_B,), tl.int32)
    best_scaled = tl.zeros((BLOCK_B,), tl.float32)
    run_keys = tl.full((BLOCK_B, KPAD), _MIN_KEY, tl.int64)

    first = part * tiles_per_part
    last = tl.minimum(first + tiles_per_part, n_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + lanes
        z = _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                          stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv,
                          stride_hd, BLOCK_B, BLOCK_V, BLOCK_K, DOT_PRECISION)
        s = tl.where((cols < V)[None, :], z * inv_temp, float("-inf"))
        # Online log-sum-exp; the first tile of a part always holds a valid column, so new_max is
        # finite and exp(-inf - new_max) = 0 never meets -inf - -inf.
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(tl.exp(s - new_max[:, None]), axis=1)
        run_max = new_max
        if MODE == MODE_TOPK:
            # run_keys (descending) vs the tile's top KPAD (ascending): their elementwise max is
            # the top KPAD of both, as a bitonic run; one merge sorts it descending again.
            tile_top = _top_keys(_pack_keys(s, cols[None, :]), BLOCK_B, BLOCK_V, LOG_BLOCK_V,
                                 LOG_KPAD, 1)
            run_keys = tl.maximum(run_keys, tile_top)
            for t in tl.static_range(LOG_KPAD):
                run_keys = _bitonic_step(run_keys, BLOCK_B, KPAD, KPAD >> (t + 1), LOG_KPAD, 0)
        else:
            if MODE == MODE_GUMBEL:
                rows2 = tl.broadcast_to(rows[:, None], (BLOCK_B, BLOCK_V))
                cols2 = tl.broadcast_to(cols[None, :], (BLOCK_B, BLOCK_V))
                score = s + _gumbel(seed_v, offset_v, rows2, cols2)
            else:
                score = s
            tile_best = tl.max(score, axis=1)
            lane = tl.argmax(score, axis=1)  # lowest index among ties
            tile_scaled = tl.sum(tl.where(lanes[None, :] == lane[:, None], s, 0.0), axis=1)
            take = tile_best > best  # strict: an earlier tile (lower index) wins ties
            best = tl.where(take, tile_best, best)
            best_token = tl.where(take, tile * BLOCK_V + lane, best_token)
            best_scaled = tl.where(take, tile_scaled, best_scaled)

    slot = rows.to(tl.int64) * n_parts + part
    tl.store(part_max_ptr + slot, run_max, mask=row_ok)
    tl.store(part_sumexp_ptr + slot, run_sumexp, mask=row_ok)
    if MODE == MODE_TOPK:
        k = tl.arange(0, KPAD)
        tl.store(part_keys_ptr + slot[:, None] * KPAD + k[None, :], run_keys, mask=row_ok[:, None])
    else:
        tl.store(part_best_ptr + slot, best, mask=row_ok)
        tl.store(part_token_ptr + slot, best_token, mask=row_ok)
        tl.store(part_scaled_ptr + slot, best_scaled, mask=row_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_finish_kernel(part_max_ptr, part_sumexp_ptr, part_best_ptr, part_token_ptr,
                          part_scaled_ptr, cand_keys_ptr, seed, offset, tokens_ptr, logprobs_ptr,
                          n_parts, top_k,
                          MODE: tl.constexpr, SEED_IS_PTR: tl.constexpr,
                          OFFSET_IS_PTR: tl.constexpr, BLOCK_P: tl.constexpr,
                          TOPK_PAD: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_parts
    ps = tl.arange(0, BLOCK_P)
    run_max = float("-inf")
    run_sumexp = 0.0
    best = float("-inf")
    token = 0
    scaled = 0.0
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + ps
        ok = p < n_parts
        m = tl.load(part_max_ptr + base + p, mask=ok, other=float("-inf"))
        se = tl.load(part_sumexp_ptr + base + p, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(m, axis=0))
        run_sumexp = run_sumexp * tl.exp(run_max - new_max) + tl.sum(se * tl.exp(m - new_max), axis=0)
        run_max = new_max
        if MODE != MODE_TOPK:
            b = tl.load(part_best_ptr + base + p, mask=ok, other=float("-inf"))
            j = tl.argmax(b, axis=0)  # lowest part among ties = lowest vocabulary index
            take = tl.max(b, axis=0) > best
            best = tl.where(take, tl.max(b, axis=0), best)
            token = tl.where(take, tl.load(part_token_ptr + base + p0 + j), token)
            scaled = tl.where(take, tl.load(part_scaled_ptr + base + p0 + j), scaled)
    if MODE == MODE_TOPK:
        j = tl.arange(0, TOPK_PAD)
        ok = j < top_k
        keys = tl.load(cand_keys_ptr + row.to(tl.int64) * top_k + j, mask=ok, other=_MIN_KEY)
        s, cols = _unpack_keys(keys)
        cols = tl.where(ok, cols, 0)
        noise = _gumbel(_scalar_arg(seed, SEED_IS_PTR), _scalar_arg(offset, OFFSET_IS_PTR),
                        cols * 0 + row, cols)
        pick = tl.argmax(tl.where(ok, s + noise, float("-inf")), axis=0)
        token = tl.sum(tl.where(j == pick, cols, 0), axis=0)
        scaled = tl.sum(tl.where(j == pick, s, 0.0), axis=0)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, scaled - (run_max + tl.log(run_sumexp)))
