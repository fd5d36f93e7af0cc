// Paged KV cache (the block-table layout of vLLM / SGLang / FlashInfer): block bookkeeping of
// kv_paged_fork / kv_paged_promote / kv_paged_release, shared by the CPU op (kv_paged.cpp) and the
// CUDA kernels (kv_paged_cuda.cu). No torch header, so nvcc compiles the kernels on their own.
//
// State (all int32, all on the cache's device):
//   cache        [L, 2, num_blocks, block_size, n_kv, head_dim]
//   block_tables [S, max_blocks]  block of token t of sequence s: block_tables[s, t / block_size];
//                                 entries past ceil(lens[s] / block_size) are -1
//   lens         [S]
//   refcounts    [num_blocks]     number of table entries pointing at each block
//   free_stack   [num_blocks]     free_stack[0, free_state[0]) are the free blocks (refcount 0)
//   free_state   [2]              {number of free blocks, failed allocations (sticky counter)}
//
// The bookkeeping runs on the device, serially (one thread on a GPU), with fixed-shape state: no
// host read, so every op is legal in CUDA-graph capture. It is O(pairs x max_blocks) integer work;
// the token copies it asks for (BlockCopy, at most one per pair) run in parallel afterwards.
// Invariant kept by every op: a sequence's partial last block is its own (refcount 1), so appending
// tokens never writes into a shared block.
#pragma once

#include <cstdint>

#include "kv_layout.h"

namespace mahalo {

struct PagedState {
  int32_t* tables;
  int32_t* lens;
  int32_t* refcounts;
  int32_t* free_stack;
  int32_t* free_state;
  int64_t num_seqs;
  int64_t max_blocks;
  int64_t num_blocks;
  int64_t block_size;
};

// Copy tokens [lo, hi) of block src into the same positions of block dst, in every layer, K and V.
// src < 0 or dst < 0: nothing to copy. Stored as int32 [P, 4] on the device.
struct BlockCopy {
  int32_t src, dst, lo, hi;
};

// Geometry of the cache: planes = L * 2; a block of one plane is block_size contiguous tokens.
struct PagedLayout {
  int64_t planes;
  int64_t num_blocks;
  int64_t block_size;
  int64_t token_bytes;  // n_kv * head_dim * element size

  MAHALO_HD int64_t offset(int64_t plane, int64_t block, int64_t token) const {
    return ((plane * num_blocks + block) * block_size + token) * token_bytes;
  }
  MAHALO_HD bool valid(const BlockCopy& c) const {
    return c.src >= 0 && c.src < num_blocks && c.dst >= 0 && c.dst < num_blocks && c.lo >= 0 &&
           c.lo <= c.hi && c.hi <= block_size;
  }
};

MAHALO_HD bool valid_block(const PagedState& st, int64_t b) { return b >= 0 && b < st.num_blocks; }

MAHALO_HD int64_t seq_len(const PagedState& st, int64_t seq) {
  const int64_t n = st.lens[seq], cap = st.max_blocks * st.block_size;
  return n < 0 ? 0 : (n > cap ? cap : n);
}

// refcount--, and the block goes back on the free stack when it reaches 0 (never below 0).
MAHALO_HD void release_block(const PagedState& st, int32_t b) {
  if (!valid_block(st, b) || st.refcounts[b] <= 0) return;
  if (--st.refcounts[b] == 0 && st.free_state[0] < st.num_blocks) {
    st.free_stack[st.free_state[0]++] = b;
  }
}

// A free block with refcount 1, or -1 (and one more failed allocation) when none is left.
MAHALO_HD int32_t alloc_block(const PagedState& st) {
  if (st.free_state[0] <= 0) {
    ++st.free_state[1];
    return -1;
  }
  const int32_t b = st.free_stack[--st.free_state[0]];
  st.refcounts[b] = 1;
  return b;
}

MAHALO_HD void share_block(const PagedState& st, int32_t b) {
  if (valid_block(st, b)) ++st.refcounts[b];
}

// Release every block of `seq` and empty it.
MAHALO_HD void release_seq(const PagedState& st, int64_t seq) {
  int32_t* t = st.tables + seq * st.max_blocks;
  for (int64_t j = 0; j < st.max_blocks; ++j) {
    if (t[j] >= 0) release_block(st, t[j]);
    t[j] = -1;
  }
  st.lens[seq] = 0;
}

MAHALO_HD BlockCopy no_copy() { return BlockCopy{-1, -1, 0, 0}; }

// dst becomes a copy of src: dst's old blocks are released, src's full blocks shared, and src's
// partial last block (if any) copied into a fresh block. If no block is free, dst keeps only the
// full blocks (lens[dst] = whole blocks) and free_state[1] counts the failure.
MAHALO_HD BlockCopy fork_one(const PagedState& st, int64_t src, int64_t dst) {
  if (src < 0 || src >= st.num_seqs || dst < 0 || dst >= st.num_seqs || src == dst) {
    return no_copy();
  }
  release_seq(st, dst);
  const int32_t* ts = st.tables + src * st.max_blocks;
  int32_t* td = st.tables + dst * st.max_blocks;
  const int64_t n = seq_len(st, src), full = n / st.block_size, part = n - full * st.block_size;
  for (int64_t j = 0; j < full; ++j) {
    td[j] = ts[j];
    share_block(st, ts[j]);
  }
  BlockCopy copy = no_copy();
  int64_t len = n;
  if (part > 0) {
    const int32_t fresh = alloc_block(st);
    if (fresh < 0) {
      len = full * st.block_size;
    } else {
      td[full] = fresh;
      copy = BlockCopy{ts[full], fresh, 0, static_cast<int32_t>(part)};
    }
  }
  st.lens[dst] = static_cast<int32_t>(len);
  return copy;
}

// Sibling `seq` becomes a copy of `winner` (copy-on-write): blocks it already shares with the
// winner stay, its other blocks are released, the winner's full blocks are shared, and the
// winner's partial last block is copied, into the sibling's own block at that index when it has
// one (refcount 1: only tokens [start, end) of it differ, since every group member holds the
// winner's tokens [0, start)) else into a fresh block.
MAHALO_HD BlockCopy promote_one(const PagedState& st, int64_t winner, int64_t seq, int64_t start) {
  if (winner < 0 || winner >= st.num_seqs || seq < 0 || seq >= st.num_seqs || seq == winner) {
    return no_copy();
  }
  const int32_t* tw = st.tables + winner * st.max_blocks;
  int32_t* ts = st.tables + seq * st.max_blocks;
  const int64_t bs = st.block_size;
  const int64_t n = seq_len(st, winner), full = n / bs, part = n - full * bs;
  for (int64_t j = 0; j < st.max_blocks; ++j) {
    const int32_t b = ts[j];
    if (b < 0) continue;
    const bool same = j < full && b == tw[j];
    const bool own_partial = part > 0 && j == full && b != tw[j] && valid_block(st, b) &&
                             st.refcounts[b] == 1;
    if (!same && !own_partial) {
      release_block(st, b);
      ts[j] = -1;
    }
  }
  for (int64_t j = 0; j < full; ++j) {
    if (ts[j] != tw[j]) {
      ts[j] = tw[j];
      share_block(st, tw[j]);
    }
  }
  BlockCopy copy = no_copy();
  int64_t len = n;
  if (part > 0) {
    if (ts[full] >= 0) {
      int64_t lo = start - full * bs;
      lo = lo < 0 ? 0 : (lo > part ? part : lo);
      copy = BlockCopy{tw[full], ts[full], static_cast<int32_t>(lo), static_cast<int32_t>(part)};
    } else {
      const int32_t fresh = alloc_block(st);
      if (fresh < 0) {
        len = full * bs;
      } else {
        ts[full] = fresh;
        copy = BlockCopy{tw[full], fresh, 0, static_cast<int32_t>(part)};
      }
    }
  }
  st.lens[seq] = static_cast<int32_t>(len);
  return copy;
}

// The whole bookkeeping of one op, serially. op: 0 fork (a = src [P], b = dst [P]); 1 promote
// (a = winners [G], b = groups [G, K], c = start [G], P = G * K); 2 release (a = seqs [P]).
enum PagedOp { kFork = 0, kPromote = 1, kRelease = 2 };

MAHALO_HD void paged_bookkeeping(const PagedState& st, int op, const int32_t* a, const int32_t* b,
                                 const int32_t* c, int64_t num_pairs, int64_t group_size,
                                 BlockCopy* copies) {
  for (int64_t p = 0; p < num_pairs; ++p) {
    if (op == kFork) {
      copies[p] = fork_one(st, a[p], b[p]);
    } else if (op == kPromote) {
      const int64_t g = p / group_size;
      copies[p] = promote_one(st, a[g], b[p], c[g]);
    } else {
      if (a[p] >= 0 && a[p] < st.num_seqs) release_seq(st, a[p]);
      copies[p] = no_copy();
    }
  }
}

// Runs paged_bookkeeping in one GPU thread, then copies the blocks it asks for, on `stream`.
// Returns nullptr on success, else the CUDA error string. Defined in kv_paged_cuda.cu.
const char* launch_kv_paged_cuda(void* cache, const PagedLayout& layout, const PagedState& st,
                                 int op, const int32_t* a, const int32_t* b, const int32_t* c,
                                 int64_t num_pairs, int64_t group_size, BlockCopy* copies,
                                 void* stream);

}  // namespace mahalo
