"""`Requests`: the one owner of a step search's requests and their slots.

It holds each request's state (its place in the queue or its group of candidate slots: K per
beam, ``beams`` beams; each beam's committed token count and steps so far; the finished beams;
its candidates' head weights, the tokens sampled and scored for it) and applies every event to
everything a slot has at once: the policy's cache (through its layout, `mahalo_engine.layouts`),
the decode runner's per-slot state, the sampler's per-slot weights and the scorer's cache.

- `admit`: queued requests enter free groups (prefill; every candidate slot starts from the
  prompt); once none is queued, the last live groups move down into the free ones (a finished
  request frees its group), so the lockstep decode covers only live slots.
- `decode`: one step of every live candidate slot, each until a boundary, EOS, its token cap or a
  full cache.
- `score`: every candidate's score, in one batch.
- `commit`: each request's surviving candidates (the engine's picks, ``beams`` per request)
  become its beams' next steps, or finished beams when they end the request; finished requests
  retire, the others promote their survivors in one call for all: one host-to-device copy of the
  indices, one launch per cache (two when a survivor changes beam, see `mahalo_engine.layouts`),
  the runner's hidden states in one gather/scatter; on CUDA, a CUDA graph per index shape.

Beam search (``SearchConfig.beams`` = N, see its docstring for the rule): every step, the N best
of a request's N*K candidates survive; a survivor that ends the request (EOS, a stop condition,
a cap) is a finished beam, set aside with its score; the live survivors, duplicated in rank order
when fewer than N, are the next step's N beams; the request ends once N beams finished or no
survivor is live, with the best finished beam. With N = 1 this is greedy step search.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Hashable

import torch

from mahalo_engine.engine.records import (Beam, SearchConfig, SearchResult, Step,
                                          best_beam_result)
from mahalo_engine.engine.decode_runner import BOUNDARY, EOS, FULL, LENGTH, DecodeRunner
from mahalo_engine.engine.graphs import GraphCache
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.engine.scorers import Candidates, Scorer
from mahalo_engine.layouts import LaidOutCache, SlotLayout
from mahalo_engine.text import Prompt

_STEP_REASON = {BOUNDARY: "boundary", EOS: "eos", LENGTH: "length", FULL: "max_seq_len"}


@dataclass
class _Beam:
    """A partial solution: its committed prefix's length (prompt + steps) before the current
    step, its generated tokens and steps."""

    committed: int
    token_ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)

    def extended(self, step: Step) -> "_Beam":
        return _Beam(self.committed + len(step.token_ids), self.token_ids + step.token_ids,
                     self.steps + [step])


@dataclass
class _Request:
    """A request being searched in a group of slots: its live beams (beam b in the group's
    b-th K slots) and the beams that finished."""

    index: int  # position in the caller's prompt list
    beams: list[_Beam]
    finished: list[Beam] = field(default_factory=list)
    generated: int = 0  # tokens sampled for it, every candidate's (SearchResult.generated_tokens)
    scored: int = 0  # tokens its scorer's models encoded (SearchResult.scored_tokens)


@dataclass
class DecodedStep:
    """The candidates one `Requests.decode` produced (rows group-major, K per live group)."""

    groups: list[int]  # the live groups, ascending
    slots: torch.Tensor  # int64 [G*beams, K] candidate slots, on the host (a row per beam)
    flat: torch.Tensor  # the same, flat, on the cache's device
    token_ids: list[list[int]]  # [G*beams*K]
    texts: list[str]  # [G*beams*K]
    reasons: list[int]  # [G*beams*K] why each candidate's step stopped (`decode_runner` codes)
    scored_tokens: list[int] = field(default_factory=list)  # [G*beams*K] set by `Requests.score`


class Requests:
    """The requests of one `Engine.search` call over ``cache`` (laid out as ``layout``: one group
    of ``layout.width`` slots per running request, ``num_groups`` groups), its ``runner`` and
    ``sampler``, and ``scorer`` (whose cache, if any, is prepared for the same layout).
    ``weights [R, K, H]``: the head weights candidate k of request r samples with
    (`SearchConfig.candidate_weights`); ``request_weights [R, H]``: each request's own, which the
    scorer sees (`Candidates.head_weights`).

    ``text(ids)`` decodes tokens; ``confirm`` decides the boundaries the device flagged (see
    `DecodeRunner.run`). Lives no longer than the caches, runner and scorer it serves: its CUDA
    graphs hold their addresses."""

    def __init__(self, prompts: list[Prompt], weights: torch.Tensor,
                 request_weights: torch.Tensor, cfg: SearchConfig, *,
                 layout: SlotLayout, cache: LaidOutCache, model: Any, runner: DecodeRunner,
                 sampler: Sampler, scorer: Scorer | None, num_groups: int, max_seq_len: int,
                 text: Callable[[list[int]], str],
                 confirm: Callable[[list[int]], tuple[bool, str]]) -> None:
        self.prompts, self.weights, self.cfg = prompts, weights, cfg
        self.request_weights = request_weights
        self.layout, self.cache, self.model = layout, cache, model
        self.runner, self.sampler, self.scorer = runner, sampler, scorer
        self.max_seq_len, self.text, self.confirm = max_seq_len, text, confirm
        self.device = cache.device
        self.results: list[SearchResult | None] = [None] * len(prompts)
        self.live: list[_Request | None] = [None] * num_groups  # by group
        self.queue = deque(range(len(prompts)))
        self.graphs = GraphCache()  # the captured promotes
        self._warm: set[Hashable] = set()  # shapes run once eagerly (a capture's warm-up)
        # The scorer's part of a promote joins the graph only if it is graph-safe.
        self._scorer_in_graph = scorer is not None and scorer.graph_safe()

    def pending(self) -> bool:
        """Whether a request is queued or running."""
        return bool(self.queue) or any(x is not None for x in self.live)

    # -- admit ---------------------------------------------------------------------------------

    def admit(self) -> None:
        """Queued requests into free groups, then the last live groups down into free ones."""
        free = [g for g, x in enumerate(self.live) if x is None][: len(self.queue)]
        if free:
            pairs = [(g, self.queue.popleft()) for g in free]
            prompts = [self.prompts[r] for _, r in pairs]
            slots = self.layout.slots([g for g, _ in pairs]).to(self.device)
            # Every candidate slot of a group starts from the prompt: cache, hidden state, scorer.
            self.runner.set_hidden(slots.reshape(-1),
                                   self.cache.admit(self.model, slots, [p.ids for p in prompts]))
            scored = [0] * len(prompts)
            if self.scorer is not None:
                self.scorer.start(slots, prompts)
                scored = self.scorer.prompt_tokens(prompts)
            for (g, r), prompt, n in zip(pairs, prompts, scored):
                beams = [_Beam(len(prompt.ids)) for _ in range(self.layout.beams)]
                self.live[g] = _Request(r, beams, scored=n)
        self._compact()
        live = [(g, x) for g, x in enumerate(self.live) if x is not None]
        slots = self.layout.slots([g for g, _ in live]).tolist()
        # Candidate k of each beam of each request samples with its own row (the request's
        # weights unless SearchConfig.candidate_head_weights says otherwise).
        k = self.layout.k
        self.sampler.set_slot_weights({s: self.weights[x.index, j % k] for (_, x), row in
                                       zip(live, slots) for j, s in enumerate(row)})

    def _compact(self) -> None:
        """Move the last live groups down into free groups (once no queued request will fill
        them): the decode loop runs slots ``[0, span)`` of the live groups, so it would otherwise
        keep computing finished requests' slots."""
        free = [g for g, x in enumerate(self.live) if x is None]
        used = [g for g, x in enumerate(self.live) if x is not None]
        moves = []
        while free and used and free[0] < used[-1]:
            moves.append((used.pop(), free.pop(0)))
        if not moves:
            return
        index = torch.stack(self.layout.move_pairs(moves)).to(self.device)
        src, dst = index[0], index[1]
        self.cache.move(src, dst)
        self.runner.copy_hidden(src, dst)
        if self.scorer is not None:
            self.scorer.move(src, dst)
        for h, f in moves:
            self.live[f], self.live[h] = self.live[h], None

    # -- one step ------------------------------------------------------------------------------

    def decode(self) -> DecodedStep:
        """Every live candidate slot decodes one step from its group's committed text."""
        cfg = self.cfg
        groups = [g for g, x in enumerate(self.live) if x is not None]
        slots = self.layout.slots(groups).view(-1, self.layout.k)
        flat = slots.reshape(-1).to(self.device)
        beams = [b for g in groups for b in self.live[g].beams]
        self.cache.begin_step(flat)
        self.runner.begin(flat, self.layout.repeat(
            [min(cfg.max_step_tokens, cfg.max_new_tokens - len(b.token_ids)) for b in beams]))
        # Every slot of a live beam holds its committed prefix (admit, promote or move).
        self.runner.run(self.runner.bucket(self.layout.span(groups)), cfg.check_every,
                        self.confirm, longest=max(b.committed for b in beams))
        toks, _, reasons = self.runner.read(flat)
        return DecodedStep(groups, slots, flat, toks, [self.text(t) for t in toks], reasons)

    def score(self, step: DecodedStep) -> torch.Tensor:
        """float32 ``[G*K]`` scores of the step's candidates (NaN without a scorer)."""
        n = len(step.token_ids)
        if self.scorer is None:
            return torch.full((n,), math.nan)
        reqs = [self.live[g] for g in step.groups]
        cands = Candidates(step.slots, step.token_ids, step.texts,
                           self.runner.hidden.index_select(0, step.flat),
                           [self.prompts[x.index] for x in reqs for _ in x.beams],
                           [self.text(b.token_ids) for x in reqs for b in x.beams],
                           self.request_weights[[x.index for x in reqs for _ in x.beams]])
        scores = self.scorer.score(cands).float().cpu()
        step.scored_tokens = cands.scored_tokens
        if scores.shape != (n,) or torch.isnan(scores).any():
            bad = torch.isnan(scores).nonzero().flatten().tolist() \
                if scores.shape == (n,) else scores.shape
            raise ValueError(f"the scorer returned NaN or a wrong shape for candidates {bad} "
                             f"(expected {n} scores)")
        return scores

    def commit(self, step: DecodedStep, scores: torch.Tensor, picks: list[list[int]]) -> int:
        """Each live request's survivors (``picks[i]``: ``beams`` candidate indices in the i-th
        group's ``beams*K`` rows, best first) extend their beams by a step: those that end the
        request are set aside as finished beams; the request retires once ``beams`` finished or
        none of its survivors goes on, and otherwise its live survivors (duplicated in rank order
        up to ``beams``) are promoted, for all requests in one call. Returns the number retired."""
        n, k = self.layout.beams, self.layout.k
        sources, keep_g, retired = [], [], 0
        for i, g in enumerate(step.groups):
            req = self.live[g]
            base = i * n * k
            # Every candidate's step counts, the discarded ones too (all the group's rows).
            req.generated += sum(len(t) for t in step.token_ids[base:base + n * k])
            req.scored += sum(step.scored_tokens[base:base + n * k])
            live = []  # (origin beam, candidate slot, extended beam)
            for j in picks[i]:
                row, b = base + j, j // k
                siblings = scores[base + b * k:base + b * k + k]  # beam b's K candidates
                beam = req.beams[b].extended(Step(
                    step.texts[row], step.token_ids[row], float(scores[row]), siblings.tolist(),
                    _STEP_REASON[step.reasons[row]], self.weights[req.index, j % k].tolist()))
                end = self._finished(beam, step.reasons[row], float(scores[row]))
                if end is None:
                    live.append((b, int(step.slots.view(-1)[row]), beam))
                else:
                    req.finished.append(Beam(self.text(beam.token_ids), beam.token_ids,
                                             beam.steps, float(scores[row]), end))
            if len(req.finished) >= n or not live:
                self.results[req.index] = best_beam_result(req.finished, req.generated,
                                                           req.scored)
                self.live[g] = None
                retired += 1
                continue
            live = [live[x % len(live)] for x in range(n)]  # duplicates when fewer than N live
            places = self.layout.place_beams([b for b, _, _ in live])
            row_sources = [0] * n
            for (_, slot, beam), b in zip(live, places):
                req.beams[b] = beam
                row_sources[b] = slot
            sources.append(row_sources)
            keep_g.append(g)
        if sources:
            self._promote(sources, keep_g)
        return retired

    def _finished(self, beam: _Beam, reason: int, score: float) -> str | None:
        """Why the request ends with ``beam`` (its latest step included), or None to go on."""
        cfg = self.cfg
        if reason == EOS:
            return "eos"
        # The cache is full (a step may also end at a boundary on the very last position), or no
        # candidate fit the PRM's cache (score -inf).
        if reason == FULL or beam.committed >= self.max_seq_len \
                or (self.scorer is not None and score == -math.inf):
            return "max_seq_len"
        if cfg.stop:
            text = self.text(beam.token_ids)
            if any((s in text) if isinstance(s, str) else s(text) for s in cfg.stop):
                return "stop"
        if len(beam.token_ids) >= cfg.max_new_tokens:
            return "max_new_tokens"
        if len(beam.steps) >= cfg.max_steps:
            return "max_steps"
        return None

    def _promote(self, sources: list[list[int]], groups: list[int]) -> None:
        """``sources[i][b]``: the candidate slot beam b of continuing group ``groups[i]`` goes on
        from. One host-to-device copy of every index, then (one CUDA graph on CUDA) one launch
        per cache (two with moves) and the runner's hidden states in one gather/scatter."""
        host, sizes = self.layout.promote_index(sources, groups)

        def apply(index: torch.Tensor) -> None:
            src, dst, won, slots, moves = self.layout.split_promote(index, sizes)
            self.cache.promote(src, dst, won, slots, moves)
            if sizes[1]:
                # One gather before the scatter: a move's source may be a pair's destination.
                self.runner.copy_hidden(torch.cat((moves[0], src)), torch.cat((moves[1], dst)))
            elif sizes[0]:
                self.runner.copy_hidden(src, dst)
            if self._scorer_in_graph:  # K = 1: no pairs, but a scorer may commit per group
                self.scorer.promote(src, dst, won, slots, moves)

        index = self._run_captured(("promote", sizes), host, apply)
        if self.scorer is not None and not self._scorer_in_graph:
            self.scorer.promote(*self.layout.split_promote(index, sizes))

    def _run_captured(self, name: Hashable, host: torch.Tensor,
                      apply: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """``apply(host copied to the device)``; returns that device tensor (valid until the next
        call). Eager, or on CUDA a graph per (name, shape) captured at the shape's second use (a
        shape seen once is not worth a capture; its first, eager run is the warm-up) and replayed
        after copying the new indices into the graph's input buffer."""
        key = (name, tuple(host.shape), host.dtype)
        entry = self.graphs.get(key)
        if entry is None:
            if not self.runner.use_graphs or key not in self._warm:
                self._warm.add(key)
                index = host.to(self.device)
                apply(index)
                return index
            static = host.to(self.device)
            self.graphs.capture(key, partial(apply, static), keep=(static,))
            entry = self.graphs.get(key)
        graph, (static,) = entry
        static.copy_(host, non_blocking=True)
        graph.replay()
        return static
