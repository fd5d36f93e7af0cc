"""The per-token decode loop shared by `generate` and `search`, and its CUDA graphs.

`DecodeRunner` owns static per-slot device buffers (the hidden state to sample from, active
flags, step lengths and caps, the tokens and log-probs of the current step, boundary automaton
states, why each slot stopped). One step for slots ``[0, n)``: sample every slot's next token
(its request's head weights, its own random stream), record it, feed it to the model (slots that
stopped do not advance), then raise the stop flags (EOS, boundary, token cap, full cache) on the
device. The host looks only every ``check_every`` steps: it confirms the boundary hits the
tables cannot decide alone (resuming rejected slots) and ends the loop once no slot is active.

Attention reads only a prefix ``[0, kv_len)`` of the cache, viewed in place (slots ``[0, n)`` are
contiguous): with the live slots' longest length L known on the host at a check (it comes with
the flags, no extra sync), the next ``check_every`` steps stay below L + check_every, rounded up to
a power-of-two bucket (`kv_bucket`). So a step costs what the live lengths need, not max_seq_len.

On CUDA the step is captured once per (slot-count bucket, kv_len bucket, top_k (1 when greedy),
boundary, the sampler's operands: the heads' storage and, for merged heads, every row's weights
and the heads' version) in a `torch.cuda.CUDAGraph` (kept by `engine.graphs.GraphCache`) and
replayed; the random offset and the temperatures live on the device, so replays draw fresh numbers
at the current temperatures. On CPU, or with ``cuda_graphs=False``, the same step runs eagerly.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import torch

from mahalo_engine.boundary import CompiledBoundary
from mahalo_engine.engine.graphs import GraphCache
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.layouts import LaidOutCache

# Why a slot stopped (``DecodeRunner.reason``); PENDING = a boundary the host must still confirm.
RUNNING, EOS, BOUNDARY, PENDING, LENGTH, FULL = 0, 1, 2, 3, 4, 5
MAX_AUTOMATA = 3  # strings, sentence, paragraph
KV_BUCKET_MIN = 64  # smallest attended prefix


def kv_bucket(need: int, max_len: int) -> int:
    """The attended prefix for steps that need ``need`` positions: the next power of two >=
    KV_BUCKET_MIN (few distinct shapes, few graph captures), at most ``max_len``."""
    b = KV_BUCKET_MIN
    while b < need:
        b *= 2
    return min(b, max_len)


class DecodeRunner:
    def __init__(self, model: torch.nn.Module, cache: LaidOutCache, sampler: Sampler, *,
                 max_seq_len: int, eos_ids: list[int], cuda_graphs: bool) -> None:
        if cache.max_len < max_seq_len + 1:
            raise ValueError(f"the cache holds {cache.max_len} positions; the runner needs "
                             f"max_seq_len + 1 = {max_seq_len + 1} (one scratch position)")
        s, dev = cache.num_slots, cache.device
        vocab = model.config.vocab_size
        self.model, self.cache, self.sampler = model, cache, sampler
        self.max_seq_len = max_seq_len
        self.slots = torch.arange(s, device=dev)
        self.hidden = torch.zeros(s, model.config.hidden_size, dtype=cache.dtype, device=dev)
        self.active = torch.zeros(s, dtype=torch.bool, device=dev)
        self.step_len = torch.zeros(s, dtype=torch.int64, device=dev)
        self.step_cap = torch.zeros(s, dtype=torch.int64, device=dev)
        self.reason = torch.zeros(s, dtype=torch.int64, device=dev)
        # A step never exceeds max_seq_len - 1 tokens, so column step_len is always in range (a
        # paused slot writes its discarded sample there).
        self.tokens = torch.zeros(s, max_seq_len + 1, dtype=torch.int32, device=dev)
        self.logprobs = torch.zeros(s, max_seq_len + 1, dtype=torch.float32, device=dev)
        self.bstate = torch.zeros(s, MAX_AUTOMATA, dtype=torch.int64, device=dev)
        self.eos = torch.zeros(vocab, dtype=torch.bool, device=dev)
        for t in eos_ids:
            if 0 <= t < vocab:
                self.eos[t] = True
        self.boundary: CompiledBoundary | None = None
        self.use_graphs = cuda_graphs and dev.type == "cuda"
        self._graphs = GraphCache()  # the captured steps
        self.capture_seconds: list[float] = []  # wall time of each graph capture (warm-up included)

    # -- setup of a call / a step -----------------------------------------------------------

    def set_boundary(self, boundary: CompiledBoundary) -> None:
        if boundary.num_automata > MAX_AUTOMATA:
            raise ValueError(f"at most {MAX_AUTOMATA} boundary automata, got "
                             f"{boundary.num_automata}")
        self.boundary = boundary

    def bucket(self, n: int) -> int:
        """Slots to run for ``n`` live slots: a power of two under graphs (few captures), else n."""
        if not self.use_graphs:
            return n
        b = 1
        while b < n:
            b *= 2
        return min(b, self.cache.num_slots)

    def set_hidden(self, slots: torch.Tensor, hidden: torch.Tensor) -> None:
        self.hidden.index_copy_(0, slots, hidden.to(self.hidden.dtype))

    def copy_hidden(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.hidden.index_copy_(0, dst, self.hidden.index_select(0, src))

    def begin(self, slots: torch.Tensor, caps: torch.Tensor) -> None:
        """Start a step (or a whole generation) on ``slots`` with per-slot token ``caps``."""
        self.active.index_fill_(0, slots, True)
        self.step_len.index_fill_(0, slots, 0)
        self.reason.index_fill_(0, slots, RUNNING)
        self.bstate.index_fill_(0, slots, 0)
        self.step_cap.index_copy_(0, slots, caps.to(self.step_cap.device, torch.int64))

    # -- the step ----------------------------------------------------------------------------

    def _step(self, n: int, kv_len: int, heads: torch.Tensor | None = None,
              weights: torch.Tensor | None = None) -> None:
        act = self.active[:n]
        pos = self.step_len[:n]
        hidden = self.hidden[:n]
        tok, logprob = self.sampler.sample(hidden, heads, weights)
        self.tokens[:n].scatter_(1, pos[:, None], tok[:, None].to(torch.int32))
        self.logprobs[:n].scatter_(1, pos[:, None], logprob[:, None])
        step_len = pos + act.long()
        self.step_len[:n] = step_len
        h = self.cache.decode(self.model, tok, slice(0, n), act, kv_len)
        self.hidden[:n] = torch.where(act[:, None], h.to(hidden.dtype), hidden)

        d = self.boundary.num_automata
        state = self.bstate[:n, :d]
        new_state, hit, exact = self.boundary.step(state, tok, step_len)
        if d:
            self.bstate[:n, :d] = torch.where(act[:, None], new_state, state)
        full = self.cache.lens[:n] >= self.max_seq_len
        capped = step_len >= self.step_cap[:n]
        zero = torch.zeros_like(step_len)
        reason = torch.where(capped, LENGTH, zero)
        reason = torch.where(full, FULL, reason)
        reason = torch.where(hit, PENDING, reason)
        reason = torch.where(exact, BOUNDARY, reason)
        reason = torch.where(self.eos[tok], EOS, reason)
        finish = act & (reason != RUNNING)
        self.reason[:n] = torch.where(finish, reason, self.reason[:n])
        self.active[:n] = act & ~finish

    # -- the loop ----------------------------------------------------------------------------

    def run(self, n: int, check_every: int, confirm: Callable[[list[int]], tuple[bool, str]],
            longest: int) -> None:
        """Step slots ``[0, n)`` until none is active; ``confirm(step_token_ids)`` decides each
        boundary the tables flagged and returns ``(confirmed, decoded step text)`` (not confirmed:
        the slot resumes where it paused). ``longest``: the host's bound on the cache length of
        every active slot (e.g. the longest prompt)."""
        while True:
            # Step j < check_every of a chunk writes an active slot's token at <= longest + j.
            kv_len = kv_bucket(longest + check_every, self.cache.max_len)
            step = (self._graph_step(n, kv_len) if self.use_graphs
                    else partial(self._step, n, kv_len))
            for _ in range(check_every):
                step()
            flags = torch.stack((self.active[:n].long(), self.reason[:n],
                                 self.cache.lens[:n].long())).cpu()
            active, lens = flags[0].bool(), flags[2]
            # A slot still active advanced at every step of the chunk: lens <= kv_len held
            # throughout iff it holds now. Catches a caller's wrong `longest`.
            if active.any() and int(lens[active].max()) > kv_len:
                raise RuntimeError(f"a slot of length {int(lens[active].max())} decoded over "
                                   f"kv_len={kv_len}: run() was given longest={longest}, too small")
            pending = (flags[1] == PENDING).nonzero().flatten()
            resumed = self._confirm(pending, confirm) if len(pending) else False
            if not resumed and not active.any():
                return
            longest = int(lens[active | (flags[1] == PENDING)].max())

    def _confirm(self, pending: torch.Tensor,
                 confirm: Callable[[list[int]], tuple[bool, str]]) -> bool:
        idx = pending.to(self.slots.device)
        info = torch.stack((self.step_len[idx], self.step_cap[idx],
                            self.cache.lens.index_select(0, idx).long())).cpu()
        width = int(info[0].max())
        rows = self.tokens[idx, :width].cpu().tolist()
        reasons, resume, texts = [], [], []
        for j, (n_tok, cap, length) in enumerate(info.t().tolist()):
            confirmed, text = confirm(rows[j][:n_tok])
            texts.append(text)
            if confirmed:
                reasons.append(BOUNDARY)
            elif length >= self.max_seq_len:  # same priority as on the device: FULL over LENGTH
                reasons.append(FULL)
            elif n_tok >= cap:
                reasons.append(LENGTH)
            else:
                reasons.append(RUNNING)
            resume.append(reasons[-1] == RUNNING)
        self.reason[idx] = torch.tensor(reasons, device=idx.device)
        self.active[idx] = torch.tensor(resume, device=idx.device)
        if any(resume) and self.boundary.resume_from_text:
            again = [j for j, r in enumerate(resume) if r]
            d = self.boundary.num_automata
            states = [self.boundary.states_after(texts[j]) for j in again]
            self.bstate[idx[again], :d] = torch.tensor(states, device=idx.device)
        return any(resume)

    def read(self, slots: torch.Tensor) -> tuple[list[list[int]], list[list[float]], list[int]]:
        """Each slot's step tokens, their log-probs, and why it stopped."""
        info = torch.stack((self.step_len[slots], self.reason[slots])).cpu()
        width = int(info[0].max())
        toks = self.tokens[slots, :width].cpu().tolist()
        lps = self.logprobs[slots, :width].cpu().tolist()
        lens = info[0].tolist()
        return ([t[:m] for t, m in zip(toks, lens)], [lp[:m] for lp, m in zip(lps, lens)],
                info[1].tolist())

    # -- CUDA graphs -------------------------------------------------------------------------

    def _graph_step(self, n: int, kv_len: int) -> Callable[[], None]:
        # A merged-heads graph holds the merged tensor it was captured with (the general path
        # reads the heads in place), so the operands' key is the plan's: every row's weights, the
        # heads' storage and version (an in-place update of the heads, a trainer's new weights,
        # must miss it) and the sampler's epoch (bumped by Sampler.invalidate: inference or
        # replaced heads).
        heads, weights, plan = self.sampler.graph_operands(n)
        key = (n, kv_len, self.sampler.top_k, id(self.boundary), plan)
        entry = self._graphs.get(key)
        graph = self._capture(key, n, kv_len, heads, weights) if entry is None else entry[0]
        return graph.replay

    def _capture(self, key: tuple, n: int, kv_len: int, heads: torch.Tensor,
                 weights: torch.Tensor) -> torch.cuda.CUDAGraph:
        """Capture one step for slots ``[0, n)`` attending over ``[0, kv_len)``. Warm-up and
        capture run with every slot paused (no slot advances, writes land past each slot's valid
        length) and the random offset is restored afterwards, so capturing does not change what a
        call returns."""
        started = time.perf_counter()
        active, offset = self.active.clone(), self.sampler.offset.clone()
        self.active.zero_()
        side = torch.cuda.Stream(device=self.slots.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the Triton kernels, settles the allocator
                self._step(n, kv_len, heads, weights)
        torch.cuda.current_stream().wait_stream(side)
        # The graph reads these tensors on replay: kept alive with it.
        graph = self._graphs.capture(key, partial(self._step, n, kv_len, heads, weights),
                                     keep=(heads, weights, self.boundary))
        self.active.copy_(active)
        self.sampler.offset.copy_(offset)
        torch.cuda.synchronize(self.slots.device)
        self.capture_seconds.append(time.perf_counter() - started)
        return graph
