"""Triton kernels: the fused H-head projection, and projection + log-sum-exp + sampling.

Projection (the "stacked GEMM"): ``z[b,v] = Σ_i w[b,i] · Σ_k h[b,k] · W_i[v,k]`` is one GEMM over
``K = H·d`` whose A operand is ``[w[b,1]·h[b], …, w[b,H]·h[b]]`` (formed on load, never stored);
each program owns a ``[BLOCK_B, BLOCK_V]`` tile of ``z`` and runs one pipelined loop over K with
fp32 accumulation. Decoding (B ≤ 64) is bound by reading the ``H·V·d`` weights, so all rows share
one tile (``BLOCK_B`` up to 64) and the row-tile axis is the fastest grid axis (L2 reuse for B > 64).

Sampling never writes ``[B,V]``. ``_sample_partials_kernel`` gives each program a chunk of V tiles
and writes, per row and chunk: the running max and sum-exp of ``s = z/T`` (online LSE), and either
the best ``(score, index, s)`` — score ``s`` for greedy, ``s + Gumbel`` for sampling — or, for top-k,
the chunk's best ``KPAD`` candidates as int64 keys (``s`` made order-preserving in the high word,
``0x7FFFFFFF - index`` in the low word, so one integer order ranks by ``s``, then lower index),
kept across tiles by a bitonic network (on the live rows only when B is under the dot's 16-row
minimum). ``_sample_finish_kernel`` reduces the partials of a block of rows to each row's token and
``log softmax(z/T)`` at it; for top-k it first merges the parts' sorted candidates into the global
top KPAD (a bitonic merge tree over chunks of parts), so no ``[B, n_parts·KPAD]`` top-k runs in
torch.

Randomness: Philox-4x32 keyed by the 64-bit ``seed``, counter ``(vocab index, row, offset lo, offset
hi)``: every (seed, offset, row, index) gets its own uniform, so the plain and top-k paths and the
merged-heads path see the same noise for the same token. ``seed``/``offset`` are kernel scalars or
pointers to 1-element int64 tensors read on the device (``*_IS_PTR``), so a CUDA-graph replay
after ``offset.add_(1)`` draws fresh numbers.

Temperature: the kernel scalar ``inv_temp`` = 1/T (a float T = 0 runs MODE_GREEDY at scale 1), or,
with ``TEMP_IS_PTR``, float32 temperatures read on the device, one per row (``stride_t`` 1) or one
for all rows (``stride_t`` 0), so a replay samples at whatever the buffer holds. The mode then
comes from ``top_k`` alone, and a row whose T is 0 is greedy inside the sampling modes: scale 1 and
no Gumbel noise (top-k: its largest candidate key), the same token and log-prob as MODE_GREEDY.

Top-p / min-p / any top-k (semantics: ``triton_kernels.reference``), without sorting the vocabulary:

- with a top-k of at most 128, the finish kernel filters the merged candidates (sorted keys in
  registers): an exclusive ``cumsum`` of ``exp(s - s_top)`` against ``top_p`` times their sum, and
  ``s >= s_top + log(min_p)``; then the Gumbel-max over what is left. No extra bytes.
- otherwise (MODE_FILTER) the partials kernel also writes ``s = z/T`` to a ``[B,V]`` fp32 scratch,
  and ``_sample_filter_kernel`` (one program per row) draws from it by rejection sampling over
  rising pivots (the idea of FlashInfer's sorting-free samplers, here with Gumbel-max draws): the
  min-p bound ``max + log(min_p)`` comes from the row's log-sum-exp partials; round 0 draws over the
  keys above it; each further pass computes the mass ranked above the current draw and, in the same
  read, the next round's draw over the keys above it; the draw is accepted once that mass is below
  ``top_p`` times the kept mass. A top_k above 128 first finds the k-th largest key by bisection on
  counts (~32 passes on the value word, ~log2 V more only when the value is tied across the cut).

Bandwidth (the floor is the heads: ``H·V·d·2`` bytes per step, shared by all rows; V = 151936,
d = 896: 272 MB per head, ~85 µs at 3.2 TB/s). MODE_FILTER adds per row a 4V = 608 KB write and
1 (min-p alone) or 1 + 1/top_p (top-p: round 0 is in the nucleus with probability ≥ top_p; 2.1 at
0.9) reads of it: ≈ 1.2 MB (min-p) / 1.9 MB (top-p 0.9) per row, where a radix sort of
(value, index) pairs moves ≥ 8 passes of 8 B per entry (≥ 10 MB). The scratch is read back right
after it is written, from L2 (50 MB on H100: the whole buffer up to B ≈ 64). Expected, per step,
against the Gumbel kernel at H = 1 (H = 3 divides the overhead by ~3):
- B = 1: 1.9 MB, < 1 % of the bytes, but read by one SM: ~1.3 MB at ~100-200 GB/s from L2
  ≈ 7-13 µs, so top-p/Gumbel ≈ 1.1-1.15 (≈ 90 % → ≈ 80 % of the copy bandwidth);
- B = 8: eight rows on eight SMs, the same latency: ≈ 1.1-1.15;
- B = 64: 122 MB of L2 traffic on 64 SMs (≈ 10-20 µs) plus the 39 MB write: top-p/Gumbel
  ≈ 1.2-1.3 (≈ 70 % of the copy bandwidth).
These are estimates until bench/heads.py's top-p/min-p rows are measured; splitting a row's passes
over several programs is the next step if B = 1 falls short. A top_k above 128 costs ~40 passes
(24 MB per row): the exact path for a rare option, not a fast one.
"""
import triton
import triton.language as tl

MODE_GREEDY = 0  # argmax of z/T; T = 0 is passed as inv_temp = 1 (log-probs under T = 1)
MODE_GUMBEL = 1  # argmax of z/T + Gumbel noise = an exact draw from softmax(z/T)
MODE_TOPK = 2  # Gumbel-max restricted to the top_k largest z/T
MODE_FILTER = 3  # z/T written; _sample_filter_kernel draws: top-p / min-p / top_k > 128
# Kernels may only read globals that are constexpr.
_GUMBEL = tl.constexpr(MODE_GUMBEL)
_TOPK = tl.constexpr(MODE_TOPK)
_FILTER = tl.constexpr(MODE_FILTER)
_MAX_ROUNDS = tl.constexpr(64)  # rejection rounds: a guard (each round raises the pivot; only
# NaN logits could keep rejecting)
_ROUND_KEY = tl.constexpr(0x5851F42D)  # round r of a filtered draw keys Philox by seed + r·this
_MIN_KEY = tl.constexpr(-(2**63))


@triton.jit
def _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                  stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                  BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """fp32 ``[BLOCK_B, BLOCK_V]`` tile of ``Σ_i w[rows,i] · hidden[rows] @ heads[i, cols].T``.

    One flat reduction loop over K = H·d (head i, then d), so the loads of every head are
    software-pipelined as one stream; the A operand is ``w[b,i] · h[b]`` formed in fp32 and cast to
    the heads' dtype just before the dot (one rounding, like bf16 ``h`` itself).
    """
    row_ok = rows < B
    col_ok = cols < V
    ks = tl.arange(0, BLOCK_K)
    x_rows = hidden_ptr + rows.to(tl.int64)[:, None] * stride_xb
    head_rows = heads_ptr + cols.to(tl.int64)[:, None] * stride_hv
    mix_rows = weights_ptr + rows.to(tl.int64) * stride_wb
    n_k = tl.cdiv(D, BLOCK_K)
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for step in range(0, H * n_k):
        head = step // n_k
        k = (step - head * n_k) * BLOCK_K + ks
        k_ok = k < D
        mix = tl.load(mix_rows + head * stride_wh, mask=row_ok, other=0.0)
        x = tl.load(x_rows + k[None, :] * stride_xd, mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        x = (x.to(tl.float32) * mix[:, None]).to(x.dtype)
        # int64 head offset: H·V·d can exceed 2**31 elements.
        w = tl.load(head_rows + head.to(tl.int64) * stride_hh + k[None, :] * stride_hd,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only: its bf16 dot multiplies raw bits (triton#11584)
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits_kernel(hidden_ptr, weights_ptr, heads_ptr, out_ptr, B, V, D, H,
                   stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                   stride_ob,
                   BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    z = _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                      stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv, stride_hd,
                      BLOCK_B, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_ob + cols[None, :]
    tl.store(ptrs, z, mask=(rows < B)[:, None] & (cols < V)[None, :])


@triton.jit
def _scalar_arg(value, IS_PTR: tl.constexpr):
    if IS_PTR:
        return tl.load(value).to(tl.int64)
    return value.to(tl.int64)


@triton.jit
def _row_temperature(temp_ptr, stride_t, rows, row_ok):
    """``(sampled, inv_temp)`` per row from the device temperatures (``stride_t`` 0: one for all
    rows): T > 0 samples at scale 1/T, correctly rounded (div_rn) like the host's fp32(1/T) for a
    float; T = 0 is greedy at scale 1, as for a float 0."""
    t = tl.load(temp_ptr + rows.to(tl.int64) * stride_t, mask=row_ok, other=1.0)
    sampled = t > 0
    return sampled, tl.math.div_rn(1.0, tl.where(sampled, t, 1.0))


@triton.jit
def _gumbel(seed, offset, rows, cols):
    """Gumbel(0,1) noise: one independent draw per (seed, offset, row, col); same-shape rows/cols."""
    zero = rows.to(tl.uint32) * 0
    off_lo = zero + (offset & 0xFFFFFFFF).to(tl.uint32)
    off_hi = zero + ((offset >> 32) & 0x7FFFFFFF).to(tl.uint32)
    bits, _, _, _ = tl.philox(seed, cols.to(tl.uint32), rows.to(tl.uint32), off_lo, off_hi)
    # 24 random bits, centred in their bucket: u in (0, 1) strictly, so both logs are finite.
    u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
    return -tl.log(-tl.log(u))


@triton.jit
def _pack_keys(s, cols):
    """int64 keys ordered like (s, -col): float bits made order-preserving in the high word,
    0x7FFFFFFF - col (col < 2**31) in the low word."""
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _unpack_keys(keys):
    ordered = (keys >> 32).to(tl.int32)
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    cols = 0x7FFFFFFF - (keys & 0x7FFFFFFF).to(tl.int32)
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
              ASC_FIRST: tl.constexpr, RUNS_SORTED: tl.constexpr = False):
    """The 2**LOG_K largest keys of each row of ``x [R, 2**LOG_N]``, sorted descending (ascending
    if ASC_FIRST): sort runs of K, then repeatedly keep the elementwise max of opposite-ordered run
    pairs (the top K of the pair, as a bitonic run) and re-merge it. ``RUNS_SORTED``: the runs of K
    already alternate (the first descending unless ASC_FIRST), so the first phase is skipped."""
    K: tl.constexpr = 1 << LOG_K
    if not RUNS_SORTED:
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
                            part_scaled_ptr, part_keys_ptr, scaled_ptr, stride_sb,
                            B, V, D, H,
                            stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv,
                            stride_hd, inv_temp, temp_ptr, stride_t, n_tiles, tiles_per_part,
                            n_parts,
                            MODE: tl.constexpr, SEED_IS_PTR: tl.constexpr,
                            OFFSET_IS_PTR: tl.constexpr, TEMP_IS_PTR: tl.constexpr,
                            LOG_KPAD: tl.constexpr, SORT_ROWS: tl.constexpr,
                            BLOCK_B: tl.constexpr, LOG_BLOCK_V: tl.constexpr,
                            BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            UPCAST_DOT: tl.constexpr):
    KPAD: tl.constexpr = 1 << LOG_KPAD
    BLOCK_V: tl.constexpr = 1 << LOG_BLOCK_V
    part = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    lanes = tl.arange(0, BLOCK_V)
    if MODE == _GUMBEL:
        seed_v = _scalar_arg(seed, SEED_IS_PTR)
        offset_v = _scalar_arg(offset, OFFSET_IS_PTR)
    if TEMP_IS_PTR:
        sampled, row_inv_temp = _row_temperature(temp_ptr, stride_t, rows, row_ok)

    run_max = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_B,), tl.float32)
    best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    best_token = tl.zeros((BLOCK_B,), tl.int32)
    best_scaled = tl.zeros((BLOCK_B,), tl.float32)
    run_keys = tl.full((SORT_ROWS, KPAD), _MIN_KEY, tl.int64)

    first = part * tiles_per_part
    last = tl.minimum(first + tiles_per_part, n_tiles)
    for tile in range(first, last):
        cols = tile * BLOCK_V + lanes
        z = _project_tile(hidden_ptr, weights_ptr, heads_ptr, rows, cols, B, V, D, H,
                          stride_xb, stride_xd, stride_wb, stride_wh, stride_hh, stride_hv,
                          stride_hd, BLOCK_B, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST_DOT)
        if TEMP_IS_PTR:
            z = z * row_inv_temp[:, None]
        else:
            z = z * inv_temp
        s = tl.where((cols < V)[None, :], z, float("-inf"))
        if MODE == _FILTER:  # the filter kernel's passes read z/T back from here
            tl.store(scaled_ptr + rows.to(tl.int64)[:, None] * stride_sb + cols[None, :], s,
                     mask=row_ok[:, None] & (cols < V)[None, :])
        # Online log-sum-exp; the first tile of a part always holds a valid column, so new_max is
        # finite and exp(-inf - new_max) = 0 never meets -inf - -inf.
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        run_sumexp = (run_sumexp * tl.exp(run_max - new_max)
                      + tl.sum(tl.exp(s - new_max[:, None]), axis=1))
        run_max = new_max
        if MODE == _TOPK:
            # run_keys (descending) vs the tile's top KPAD (ascending): their elementwise max is
            # the top KPAD of both, as a bitonic run; one merge sorts it descending again.
            if SORT_ROWS < BLOCK_B:
                # Fewer rows than the dot's minimum tile (B < 16): select the live rows (all in
                # the first SORT_ROWS; the other groups add exact zeros) so the network does not
                # sort padding rows.
                groups = tl.reshape(s, (BLOCK_B // SORT_ROWS, SORT_ROWS, BLOCK_V))
                lead = tl.arange(0, BLOCK_B // SORT_ROWS)[:, None, None] == 0
                s_rows = tl.sum(tl.where(lead, groups, 0.0), axis=0)
            else:
                s_rows = s
            tile_top = _top_keys(_pack_keys(s_rows, cols[None, :]), SORT_ROWS, BLOCK_V,
                                 LOG_BLOCK_V, LOG_KPAD, 1)
            run_keys = tl.maximum(run_keys, tile_top)
            for t in tl.static_range(LOG_KPAD):
                run_keys = _bitonic_step(run_keys, SORT_ROWS, KPAD, KPAD >> (t + 1), LOG_KPAD, 0)
        elif MODE != _FILTER:  # MODE_FILTER draws in _sample_filter_kernel
            if MODE == _GUMBEL:
                rows2 = tl.broadcast_to(rows[:, None], (BLOCK_B, BLOCK_V))
                cols2 = tl.broadcast_to(cols[None, :], (BLOCK_B, BLOCK_V))
                noise = _gumbel(seed_v, offset_v, rows2, cols2)
                if TEMP_IS_PTR:
                    noise = tl.where(sampled[:, None], noise, 0.0)
                score = s + noise
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
    if MODE == _TOPK:
        k = tl.arange(0, KPAD)
        sort_rows = tl.program_id(0) * BLOCK_B + tl.arange(0, SORT_ROWS)
        sort_slot = sort_rows.to(tl.int64) * n_parts + part
        tl.store(part_keys_ptr + sort_slot[:, None] * KPAD + k[None, :], run_keys,
                 mask=(sort_rows < B)[:, None])
    elif MODE != _FILTER:
        tl.store(part_best_ptr + slot, best, mask=row_ok)
        tl.store(part_token_ptr + slot, best_token, mask=row_ok)
        tl.store(part_scaled_ptr + slot, best_scaled, mask=row_ok)


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_finish_kernel(part_max_ptr, part_sumexp_ptr, part_best_ptr, part_token_ptr,
                          part_scaled_ptr, part_keys_ptr, seed, offset, temp_ptr, stride_t,
                          top_p_ptr, stride_p, min_p_ptr, stride_mp,
                          tokens_ptr, logprobs_ptr, B, n_parts, top_k,
                          MODE: tl.constexpr, SEED_IS_PTR: tl.constexpr,
                          OFFSET_IS_PTR: tl.constexpr, TEMP_IS_PTR: tl.constexpr,
                          BLOCK_R: tl.constexpr,
                          BLOCK_P: tl.constexpr, TOPK_PAD: tl.constexpr,
                          LOG_KPAD: tl.constexpr = 0, LOG_CAND_PARTS: tl.constexpr = 0,
                          FILTER: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < B
    base = rows.to(tl.int64) * n_parts
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((BLOCK_R,), tl.float32)
    best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    token = tl.zeros((BLOCK_R,), tl.int32)
    scaled = tl.zeros((BLOCK_R,), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = row_ok[:, None] & (p < n_parts)[None, :]
        idx = base[:, None] + p[None, :]
        m = tl.load(part_max_ptr + idx, mask=ok, other=float("-inf"))
        m = tl.where(row_ok[:, None], m, 0.0)  # keep padded rows finite (no -inf - -inf)
        se = tl.load(part_sumexp_ptr + idx, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(m, axis=1))
        run_sumexp = (run_sumexp * tl.exp(run_max - new_max)
                      + tl.sum(se * tl.exp(m - new_max[:, None]), axis=1))
        run_max = new_max
        if MODE != _TOPK:
            b = tl.load(part_best_ptr + idx, mask=ok, other=float("-inf"))
            b_max = tl.max(b, axis=1)
            at = base + p0 + tl.argmax(b, axis=1)  # lowest part among ties: lowest token index
            take = b_max > best
            best = tl.where(take, b_max, best)
            token = tl.where(take, tl.load(part_token_ptr + at, mask=take, other=0), token)
            scaled = tl.where(take, tl.load(part_scaled_ptr + at, mask=take, other=0.0), scaled)
    if MODE == _TOPK:
        # The global top TOPK_PAD of the parts' candidates, merged here: each part stored its top
        # keys sorted descending; loading every even part reversed makes the runs of a chunk
        # alternate (ascending first), so one merge tree keeps the chunk's top, ascending, and a
        # bitonic merge with the running top (descending) keeps the best of both.
        CP: tl.constexpr = 1 << LOG_CAND_PARTS
        LOG_K: tl.constexpr = LOG_KPAD
        j = tl.arange(0, TOPK_PAD)
        keys = tl.full((BLOCK_R, TOPK_PAD), _MIN_KEY, tl.int64)
        for c0 in range(0, n_parts, CP):
            cp = c0 + tl.arange(0, CP)
            even = (tl.arange(0, CP) % 2 == 0)[:, None]  # position in the chunk, not part index
            jj = tl.where(even, TOPK_PAD - 1 - j[None, :], j[None, :])
            idx = (base[:, None, None] + cp[None, :, None]) * TOPK_PAD + jj[None, :, :]
            ok3 = row_ok[:, None, None] & (cp < n_parts)[None, :, None]
            chunk = tl.load(part_keys_ptr + idx, mask=ok3, other=_MIN_KEY)
            chunk = _top_keys(tl.reshape(chunk, (BLOCK_R, CP * TOPK_PAD)), BLOCK_R,
                              CP * TOPK_PAD, LOG_CAND_PARTS + LOG_K, LOG_K, 1, True)
            keys = tl.maximum(keys, chunk)
            for t in tl.static_range(LOG_K):
                keys = _bitonic_step(keys, BLOCK_R, TOPK_PAD, TOPK_PAD >> (t + 1), LOG_K, 0)
        ok = row_ok[:, None] & (j < top_k)[None, :]
        keys = tl.where(ok, keys, _MIN_KEY)  # sorted descending: the first top_k are the top k
        s, cols = _unpack_keys(keys)
        cols = tl.where(ok, cols, 0)
        if FILTER:
            # Top-p and min-p on the sorted top-k candidates: all in registers, no extra pass.
            # Exclusive prefix mass in the candidates' order (s descending, ties to the lower
            # index) against top_p times the top-k mass; min-p against the top candidate.
            p = tl.load(top_p_ptr + rows.to(tl.int64) * stride_p, mask=row_ok, other=1.0)
            min_p = tl.load(min_p_ptr + rows.to(tl.int64) * stride_mp, mask=row_ok, other=0.0)
            top = tl.max(tl.where(ok, s, float("-inf")), axis=1)
            top = tl.where(row_ok, top, 0.0)  # padded rows: no -inf - -inf
            e = tl.where(ok, tl.exp(s - top[:, None]), 0.0)
            above = tl.cumsum(e, axis=1) - e
            nucleus = (above < (p * tl.sum(e, axis=1))[:, None]) | (p >= 1.0)[:, None]
            ok = ok & nucleus & (s >= (top + tl.log(min_p))[:, None])
        rows2 = tl.broadcast_to(rows[:, None], (BLOCK_R, TOPK_PAD))
        noise = _gumbel(_scalar_arg(seed, SEED_IS_PTR), _scalar_arg(offset, OFFSET_IS_PTR), rows2,
                        cols)
        pick = tl.argmax(tl.where(ok, s + noise, float("-inf")), axis=1)
        if TEMP_IS_PTR:
            # A T = 0 row is greedy: its largest key, i.e. the largest s, ties to the lower index
            # (the candidates come in no particular order, so an argmax of s alone would not do).
            sampled, _ = _row_temperature(temp_ptr, stride_t, rows, row_ok)
            pick = tl.where(sampled, pick, tl.argmax(keys, axis=1))
        chosen = j[None, :] == pick[:, None]
        token = tl.sum(tl.where(chosen, cols, 0), axis=1)
        scaled = tl.sum(tl.where(chosen, s, 0.0), axis=1)
    tl.store(tokens_ptr + rows, token.to(tl.int64), mask=row_ok)
    lse = run_max + tl.log(tl.where(row_ok, run_sumexp, 1.0))  # padded rows: no log(0)
    tl.store(logprobs_ptr + rows, scaled - lse, mask=row_ok)



@triton.jit
def _count_mass(base, V, m, threshold, BY_VALUE: tl.constexpr, BLOCK: tl.constexpr):
    """One pass over a row of z/T: ``(count, mass)`` of the entries at or above ``threshold`` —
    an int64 key (``BY_VALUE`` False: keys >= threshold) or an order-preserving value word
    (True: ordered value >= threshold) — mass as ``Σ exp(s - m)``."""
    count = tl.zeros((), tl.int64)
    mass = tl.zeros((), tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < V
        s = tl.load(base + cols, mask=ok, other=float("-inf"))
        keys = _pack_keys(s, cols)
        if BY_VALUE:
            keep = ok & ((keys >> 32) >= threshold)
        else:
            keep = ok & (keys >= threshold)
        count += tl.sum(keep.to(tl.int64), axis=0)
        mass += tl.sum(tl.where(keep, tl.exp(s - m), 0.0), axis=0)
    return count, mass


@triton.jit
def _kth_key(base, V, m, top_k, BLOCK: tl.constexpr):
    """The ``top_k``-th largest key of a row (0 < top_k < V): keys >= it are exactly the top_k
    largest z/T, ties to the lower index. Bisection without a sort: the value word first (32
    counting passes), then, only when the value is tied across the cut, the column (⌈log2 V⌉)."""
    top = _pack_keys(m, tl.zeros((), tl.int32)) >> 32
    lo = tl.full((), -(2**31), tl.int64)  # count(value >= lo) = V >= top_k
    hi = top.to(tl.int64)  # nothing lies above the max
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        n, _ = _count_mass(base, V, m, mid, True, BLOCK)
        take = n >= top_k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, hi, mid - 1)
    # lo: the k-th largest value word. Keep the `need` lowest columns tied at it.
    above, _ = _count_mass(base, V, m, lo + 1, True, BLOCK)
    at_or_above, _ = _count_mass(base, V, m, lo, True, BLOCK)
    need = top_k - above
    # Keys at value lo: low word 0x7FFFFFFF - col, so the smallest kept key has the need-th
    # smallest tied column. All ties kept when there are just `need` of them.
    c_lo = tl.zeros((), tl.int64)
    c_hi = tl.where(at_or_above == top_k, 0, V - 1).to(tl.int64)
    c_lo = tl.where(at_or_above == top_k, 0, c_lo)
    while c_lo < c_hi:  # the smallest column c with need ties at columns <= c
        mid = (c_lo + c_hi) >> 1
        n, _ = _count_mass(base, V, m, (lo << 32) | (0x7FFFFFFF - mid), False, BLOCK)
        take = n - above >= need
        c_hi = tl.where(take, mid, c_hi)
        c_lo = tl.where(take, c_lo, mid + 1)
    return tl.where(at_or_above == top_k, lo << 32, (lo << 32) | (0x7FFFFFFF - c_lo))


@triton.jit
def _draw_pass(base, V, m, seed, offset, row, key, pivot, noisy, BLOCK: tl.constexpr):
    """One pass over a row of z/T: the mass ``Σ exp(s - m)`` of the keys above ``key``, and a
    Gumbel-max draw among the keys above ``pivot`` (``noisy`` False: their argmax) →
    ``(mass, token, s[token])``; ties to the lower index."""
    mass = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_col = tl.zeros((), tl.int32)
    best_s = tl.zeros((), tl.float32)
    for c0 in range(0, V, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        ok = cols < V
        s = tl.load(base + cols, mask=ok, other=float("-inf"))
        keys = _pack_keys(s, cols)
        mass += tl.sum(tl.where(ok & (keys > key), tl.exp(s - m), 0.0), axis=0)
        noise = tl.where(noisy, _gumbel(seed, offset, row + cols * 0, cols), 0.0)
        score = tl.where(ok & (keys > pivot), s + noise, float("-inf"))
        chunk_best = tl.max(score, axis=0)
        lane = tl.argmax(score, axis=0)  # lowest index among ties
        take = chunk_best > best  # strict: an earlier chunk (lower index) wins ties
        best = tl.where(take, chunk_best, best)
        best_col = tl.where(take, c0 + lane, best_col)
        best_s = tl.where(take, tl.sum(tl.where(cols == c0 + lane, s, 0.0), axis=0), best_s)
    return mass, best_col, best_s


@triton.jit(do_not_specialize=["seed", "offset"])
def _sample_filter_kernel(scaled_ptr, stride_sb, part_max_ptr, part_sumexp_ptr, seed, offset,
                          temp_ptr, stride_t, top_p_ptr, stride_p, min_p_ptr, stride_mp,
                          tokens_ptr, logprobs_ptr, V, n_parts, top_k,
                          SEED_IS_PTR: tl.constexpr, OFFSET_IS_PTR: tl.constexpr,
                          TEMP_IS_PTR: tl.constexpr, KTH: tl.constexpr, BLOCK_P: tl.constexpr,
                          BLOCK: tl.constexpr):
    """MODE_FILTER's second kernel, one program per row, on the row's z/T written by the
    partials kernel (with its log-sum-exp partials): a draw by rejection sampling over rising
    pivots, without sorting the row.

    Kept set (triton_kernels.reference): the keys (z/T, then lower index) at or above ``floor``
    = max(the top_k-th largest key if ``KTH``, the min-p bound ``max + log(min_p)``), and among
    them the nucleus: a token is in it iff the mass ranked strictly above it is below top_p
    times the kept top-k mass ``z_k``. Round 0 draws x by Gumbel-max over the keys at or above
    the floor (the same noise as MODE_GUMBEL, so top_p = 1 and min_p = 0 give its token); without
    top-p that is the answer. Else each further pass computes the mass above x together with the
    next round's draw over the keys above x (it needs only x's key): x is accepted when that mass
    is below top_p · z_k, else its key becomes the pivot. A rejected x lies below the whole
    nucleus, so each round draws from a superset of it and, conditioned on acceptance, from it
    exactly; the top key is always accepted, so the loop ends. Round 0 lands in the nucleus with
    probability >= top_p: expected passes 1 + 1/top_p with top-p, 1 without, plus ~32-50
    counting passes for ``KTH`` (a top_k above the fused candidates' 128).
    """
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    base = scaled_ptr + row64 * stride_sb
    # The row's untruncated log-sum-exp, from the partials.
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sumexp = tl.zeros((), tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = p < n_parts
        pm = tl.load(part_max_ptr + row64 * n_parts + p, mask=ok, other=float("-inf"))
        se = tl.load(part_sumexp_ptr + row64 * n_parts + p, mask=ok, other=0.0)
        new_max = tl.maximum(run_max, tl.max(pm, axis=0))
        run_sumexp = (run_sumexp * tl.exp(run_max - new_max)
                      + tl.sum(se * tl.exp(pm - new_max), axis=0))
        run_max = new_max
    m = run_max
    top_p = tl.load(top_p_ptr + row64 * stride_p)
    min_p = tl.load(min_p_ptr + row64 * stride_mp)
    floor = _pack_keys(m + tl.log(min_p), tl.full((), 0x7FFFFFFF, tl.int32))  # smallest such key
    z_k = run_sumexp
    if KTH:
        kth = _kth_key(base, V, m, top_k, BLOCK)
        floor = tl.maximum(floor, kth)
        _, z_k = _count_mass(base, V, m, kth, False, BLOCK)
    noisy = tl.full((), 1, tl.int1)
    if TEMP_IS_PTR:  # a T = 0 row takes its argmax, which every filter keeps
        noisy = tl.load(temp_ptr + row64 * stride_t) > 0
    seed_v = _scalar_arg(seed, SEED_IS_PTR)
    offset_v = _scalar_arg(offset, OFFSET_IS_PTR)
    _, token, s_x = _draw_pass(base, V, m, seed_v, offset_v, row, floor, floor - 1, noisy, BLOCK)
    key = _pack_keys(s_x, token)
    done = (top_p >= 1.0) | ~noisy
    rnd = tl.zeros((), tl.int32)
    while (~done) & (rnd < _MAX_ROUNDS):
        rnd += 1
        mass, best_col, best_s = _draw_pass(base, V, m, seed_v + rnd.to(tl.int64) * _ROUND_KEY,
                                            offset_v, row, key, key, noisy, BLOCK)
        done = mass < top_p * z_k
        token = tl.where(done, token, best_col)
        s_x = tl.where(done, s_x, best_s)
        key = _pack_keys(s_x, token)
    tl.store(tokens_ptr + row64, token.to(tl.int64))
    tl.store(logprobs_ptr + row64, s_x - (m + tl.log(run_sumexp)))
