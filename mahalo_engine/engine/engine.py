"""`Engine`: batched generation and PRM-guided step search over one slot KV cache.

Slot layout: with K candidates, request group g owns slots ``g*K .. g*K+K-1`` of the policy's
cache (and of each scorer's cache); `engine.slots` owns that mapping and applies every slot event
(admit, step start, promote, move) to the cache, the runner and the scorer. Every step decodes all
candidate slots of all live requests in lockstep (`DecodeRunner`), scores them in one batch, and
commits each winner. ``cache_layout="fork"``: each slot holds a copy of the committed text
(prefill + fork once; a promote copies only a step's new tokens). ``"shared_prefix"``: one
prefix slot per request plus K short candidate slots, read by cascade attention; a commit
appends the winner's step to the prefix (a value-model PRM's cache follows the same layout).
Finished requests free their group for the next prompt;
once none is queued, the last live groups move down into the free ones, so the lockstep decode
covers only live slots. Nothing is re-encoded, by the policy or the PRM. `generate` always runs
on a plain slot cache.
"""
from __future__ import annotations

import gc
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mahalo_engine.cache import KVCache, available_bytes, kv_budget
from mahalo_engine.boundary import (Boundary, CompiledBoundary, end_of_turn_id,
                                           vocab_texts)
from mahalo_engine.engine.records import (Generation, SearchConfig, SearchResult, Step,
                                         resolve_max_seq_len)
from mahalo_engine.engine.decode_runner import (BOUNDARY, EOS, FULL, LENGTH, DecodeRunner)
from mahalo_engine.engine import slots as slot_layouts
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.engine.scorers import Candidates, Scorer, SlotLayout, WeightedScorer, as_scorer
from mahalo_engine.text import Prompt, has_chat_template, tokenize_prompt
from mahalo_engine.policy import Policy
from triton_kernels.argcheck import check_int, is_int
from triton_kernels.checks import check_sampling

GENERATE_CHECK_EVERY = 8  # decode steps between the host's "all finished?" checks in generate
_STEP_REASON = {BOUNDARY: "boundary", EOS: "eos", LENGTH: "length", FULL: "max_seq_len"}
_GEN_REASON = {BOUNDARY: "stop", EOS: "eos", LENGTH: "length", FULL: "max_seq_len"}


@dataclass
class _Live:
    """A request being searched in a group of slots."""

    index: int  # position in the caller's prompt list
    committed: int  # tokens in the committed prefix (prompt + steps) before the current step
    token_ids: list[int] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)


class Engine:
    """Generation and step search for a `Policy`, with an optional default PRM (``prm``: a
    `load_prm` model, a `Scorer`, ``[(scorer, weight), ...]`` or a callable on texts).

    ``max_batch`` requests run at once (each with K candidate slots in `search`); sequences are
    capped at ``max_seq_len`` tokens (prompt + generated; default: the model's
    ``max_position_embeddings``, at most 4096; a larger value is logged once). Caches are
    allocated on first use, after checking that they fit. ``cuda_graphs`` captures the decode
    step on CUDA. ``cache_layout`` (search only): ``"fork"`` (K full copies of each request's
    text) or ``"shared_prefix"`` (one copy + K step-sized candidate slots, cascade attention; KV
    memory ``max_seq_len + K·max_step_tokens`` per request instead of ``K·max_seq_len``).

    A memory budget, for a device the engine shares (with a trainer, say): ``kv_cache_bytes``
    (or ``kv_cache_fraction`` of the memory free when the engine is built) bounds the KV caches
    it holds, the policy's and its PRMs'. Each call then runs as many requests at once as the
    budget holds (at most ``max_batch``; ``max_batch=None``: no other limit) and ValueError names
    the bytes one request needs when it holds none. Without a budget, ``max_batch`` requests run
    at once and the caches must fit in the free memory.

    Built from in-memory objects (`from_models`), the engine shares the model's weights;
    `update_weights` copies a trainer's new weights in place. A call leaves the process's state
    as it found it: grad mode, default dtype, thread count, the global RNG (the engine draws from
    its own generators) and the CUDA current stream.
    """

    def __init__(self, policy: Any, *, prm: Any = None, max_batch: int | None = 8,
                 max_seq_len: int | None = None, cuda_graphs: bool = True,
                 cache_layout: str = "fork", kv_cache_bytes: int | None = None,
                 kv_cache_fraction: float | None = None) -> None:
        if max_batch is not None:  # None: only with a KV budget (checked below)
            check_int("max_batch", max_batch, 1)
        max_seq_len = resolve_max_seq_len(max_seq_len, policy.config.max_position_embeddings)
        if cache_layout not in slot_layouts.CACHE_LAYOUTS:
            raise ValueError(f"cache_layout must be one of {slot_layouts.CACHE_LAYOUTS}, got "
                             f"{cache_layout!r}")
        self.cache_layout = cache_layout
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self._scorers: dict[int, tuple[Any, Scorer]] = {}  # one PRM wrapper (cache) per PRM
        self.prm = as_scorer(prm, self._scorers)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        self.device = policy.heads.device
        self.cache: Any = None  # KVCache, or SharedPrefixCache while searching in that layout
        self._slots: slot_layouts.Slots | None = None
        self._runner: DecodeRunner | None = None
        self._sampler: Sampler | None = None
        self._texts: list[str] | None = None
        self._compiled: dict[Boundary, CompiledBoundary] = {}
        self.eos_ids = _eos_ids(policy)
        self.kv_cache_bytes = kv_budget(kv_cache_bytes, kv_cache_fraction, self.device)
        if max_batch is None and self.kv_cache_bytes is None:
            raise ValueError("max_batch=None (as many requests as fit) needs a KV budget: pass "
                             "kv_cache_bytes= or kv_cache_fraction=")
        self._budget_plan: tuple | None = None  # the cache sizes the budget last allocated
        self._held_scorers: list[Scorer] = []  # scorers whose caches that allocation holds
        if self.kv_cache_bytes is not None:
            self._batch_size("fork", 1, 1, None)  # fail now if not even one request fits

    @classmethod
    def from_models(cls, model: Any, tokenizer: Any, heads: torch.Tensor | None = None, *,
                    objectives: Sequence[str] | None = None, **kwargs: Any) -> "Engine":
        """An engine over in-memory objects, sharing their weights (nothing is copied):
        ``model`` a `Decoder` or a transformers ``*ForCausalLM`` (llama, mistral, qwen2, qwen3),
        ``heads [H,V,d]`` (None: the model's lm_head), the tokenizer object; ``kwargs`` as
        `Engine` (``prm=`` a `ValueModel` built in memory, a `Scorer`, ...). See
        `Policy.from_model`."""
        return cls(Policy.from_model(model, tokenizer, heads, objectives), **kwargs)

    # -- public API ----------------------------------------------------------------------------

    def update_weights(self, weights: Any, *, heads: torch.Tensor | None = None) -> None:
        """Copy a trainer's new weights into the policy in place (``weights``: a state dict, a
        `Decoder` or a transformers ``*ForCausalLM``; ``heads``: new ``[H,V,d]`` heads or None;
        see `Policy.load_weights`). The weights' storage never changes, so the KV caches stay
        allocated and captured CUDA graphs stay valid (they read the weights in place); what was
        derived from the heads' values is recomputed. Also call it (with
        the shared model) after an optimizer step on weights the engine shares."""
        self.policy.load_weights(weights, heads)
        # Nothing else to forget: the sampler's plans and merged heads are keyed on the heads'
        # version counter, which every in-place copy bumps (`HeadsPlan.is_current`), so merged
        # heads are rebuilt at the next step, and graphs on the general path read the heads in
        # place and stay valid.

    @torch.no_grad()
    def generate(self, prompts: Sequence[Any], *, head_weights: Any = None,
                 max_new_tokens: int = 256, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0,
                 seed: int = 0, stop: str | Sequence[str] | None = None,
                 chat: bool = False, progress: bool = False) -> list[Generation]:
        """Sample a continuation of each prompt (greedy at ``temperature=0``) until EOS, a
        ``stop`` string, ``max_new_tokens`` or ``max_seq_len``. ``top_k``/``top_p``/``min_p``
        filter each draw in transformers' order (docs/design.md, multihead_sample). ``chat=True``
        renders string prompts as a user turn with the chat template (message lists always are)."""
        check_sampling(temperature, top_k, seed, top_p=top_p, min_p=min_p)
        check_int("max_new_tokens", max_new_tokens, 1)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if any(not (isinstance(x, str) and x) for x in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {list(stops)!r}")
        boundary = self._compile(Boundary(strings=stops))
        reqs = self._prompts(prompts, chat)
        weights = self.policy.weight_matrix(head_weights, len(reqs)).cpu()
        batch = self._batch_size("fork", 1, 1, None)
        runner = self._prepare(batch, None)
        runner.set_boundary(boundary)
        self._sampler.configure(temperature, top_k, seed, top_p, min_p)
        out: list[Generation] = []
        bar = _progress(len(reqs), progress, "generate")
        for first in range(0, len(reqs), batch):
            wave = reqs[first:first + batch]
            n = len(wave)
            slots = runner.slots[:n]
            runner.set_hidden(slots, self.policy.model.prefill(self.cache, [r.ids for r in wave],
                                                               slots))
            self._set_weights({i: weights[first + i] for i in range(n)})
            runner.begin(slots, torch.full((n,), max_new_tokens))
            runner.run(runner.bucket(n), GENERATE_CHECK_EVERY, self._confirmer(boundary),
                       longest=max(len(r.ids) for r in wave))
            toks, lps, reasons = runner.read(slots)
            out += [Generation(self._text(t), t, lp, _GEN_REASON[r])
                    for t, lp, r in zip(toks, lps, reasons)]
            bar.update(n)
        bar.close()
        return out

    @torch.no_grad()
    def search(self, prompts: Sequence[Any], *, head_weights: Any = None,
               config: SearchConfig | None = None, chat: bool = False,
               progress: bool = False) -> list[SearchResult]:
        """PRM-guided step search (see `SearchConfig`): each step samples K candidates per
        request until a boundary, scores them, and commits the best."""
        cfg = SearchConfig() if config is None else config
        if not isinstance(cfg, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(cfg).__name__}")
        k = cfg.candidates
        scorer = self.prm if cfg.scorer is None else as_scorer(cfg.scorer, self._scorers)
        if scorer is None and k > 1:
            raise ValueError(f"search with candidates={k} needs a scorer to pick the winner: pass "
                             f"prm= to Engine or scorer= to SearchConfig (or use candidates=1)")
        boundary = self._compile(Boundary.parse(cfg.boundary))
        reqs = self._prompts(prompts, chat)
        weights = self.policy.weight_matrix(head_weights, len(reqs)).cpu()
        step_len = cfg.max_step_tokens + 1  # + a paused slot's scratch
        batch = self._batch_size(self.cache_layout, k, step_len, scorer)
        runner = self._prepare(batch * k, scorer, layout=self.cache_layout, k=k,
                               step_len=step_len)
        self._slots = slot_layouts.owner(self.cache_layout, self.policy.model, self.cache, runner,
                                         k, scorer)
        if scorer is not None:  # e.g. a prompt too long for a PRM's own tokenizer: fail up front
            scorer.check_prompts(reqs)
        runner.set_boundary(boundary)
        self._sampler.configure(cfg.temperature, cfg.top_k, cfg.seed, cfg.top_p, cfg.min_p)
        confirm = self._confirmer(boundary)
        selector = torch.Generator().manual_seed(cfg.seed)

        results: list[SearchResult | None] = [None] * len(reqs)
        live: list[_Live | None] = [None] * batch
        queue = deque(range(len(reqs)))
        bar = _progress(len(reqs), progress, "search")
        while queue or any(live):
            free = [g for g, x in enumerate(live) if x is None][: len(queue)]
            if free:
                self._admit([(g, queue.popleft()) for g in free], reqs, live, scorer, weights)
            self._compact(live, scorer, weights)
            groups = [g for g, x in enumerate(live) if x is not None]
            slots = self._slots.slots(groups)
            flat = slots.reshape(-1).to(self.device)
            caps = torch.tensor([min(cfg.max_step_tokens,
                                     cfg.max_new_tokens - len(live[g].token_ids))
                                 for g in groups]).repeat_interleave(k)
            self._slots.begin_step(flat, caps)
            # Every slot of a live group holds its committed prefix (prefill + fork, or promote).
            runner.run(runner.bucket(self._slots.span(groups)), cfg.check_every, confirm,
                       longest=max(live[g].committed for g in groups))
            toks, _, reasons = runner.read(flat)
            texts = [self._text(t) for t in toks]
            scores = self._score(scorer, slots, toks, texts, flat, [live[g] for g in groups], reqs)
            winners = _select(scores.view(len(groups), k), cfg.selection_temperature, selector)

            keep_w, keep_g, keep_start = [], [], []  # winner slot, group, committed length
            for i, g in enumerate(groups):
                req, row = live[g], i * k + winners[i]
                req.steps.append(Step(texts[row], toks[row], float(scores[row]),
                                      scores[i * k:(i + 1) * k].tolist(),
                                      _STEP_REASON[reasons[row]]))
                req.token_ids += toks[row]
                end = self._finished(req, reasons[row], float(scores[row]), scorer, cfg)
                if end is None:
                    keep_w.append(int(slots[i, winners[i]]))
                    keep_g.append(g)
                    keep_start.append(req.committed)
                    req.committed += len(toks[row])
                    continue
                results[req.index] = SearchResult(self._text(req.token_ids), req.token_ids,
                                                  req.steps, end)
                live[g] = None
                bar.update(1)
            if keep_w:
                self._slots.promote(keep_w, keep_g, keep_start)
        bar.close()
        return results

    # -- search internals ---------------------------------------------------------------------

    def _admit(self, admit: list[tuple[int, int]], reqs: list[Prompt],
               live: list[_Live | None], scorer: Scorer | None, weights: torch.Tensor) -> None:
        """Prefill new requests into their groups (every candidate slot starts from the prompt)."""
        self._slots.admit([g for g, _ in admit], [reqs[r] for _, r in admit])
        for g, r in admit:
            live[g] = _Live(r, len(reqs[r].ids))
        self._set_live_weights(live, weights)

    def _compact(self, live: list[_Live | None], scorer: Scorer | None,
                 weights: torch.Tensor) -> None:
        """Move the last live groups down into free groups (once no queued request will fill
        them): the decode loop runs slots ``[0, (last live group + 1) * K)``, so it would otherwise
        keep computing finished requests' slots."""
        free = [g for g, x in enumerate(live) if x is None]
        used = [g for g, x in enumerate(live) if x is not None]
        moves = []
        while free and used and free[0] < used[-1]:
            moves.append((used.pop(), free.pop(0)))
        if not moves:
            return
        self._slots.move(moves)
        for h, f in moves:
            live[f], live[h] = live[h], None
        self._set_live_weights(live, weights)

    def _set_live_weights(self, live: list[_Live | None], weights: torch.Tensor) -> None:
        self._set_weights(self._slots.per_slot({g: weights[x.index] for g, x in enumerate(live)
                                                if x is not None}))

    def _score(self, scorer: Scorer | None, slots: torch.Tensor, toks: list[list[int]],
               texts: list[str], flat: torch.Tensor, reqs_live: list[_Live],
               reqs: list[Prompt]) -> torch.Tensor:
        if scorer is None:
            return torch.full((len(toks),), math.nan)
        cands = Candidates(slots, toks, texts, self._runner.hidden.index_select(0, flat),
                           [reqs[x.index] for x in reqs_live],
                           [self._text(x.token_ids) for x in reqs_live])
        scores = scorer.score(cands).float().cpu()
        if scores.shape != (len(toks),) or torch.isnan(scores).any():
            bad = torch.isnan(scores).nonzero().flatten().tolist() \
                if scores.shape == (len(toks),) else scores.shape
            raise ValueError(f"the scorer returned NaN or a wrong shape for candidates {bad} "
                             f"(expected {len(toks)} scores)")
        return scores

    def _finished(self, req: _Live, reason: int, score: float, scorer: Scorer | None,
                  cfg: SearchConfig) -> str | None:
        """Why the request ends after its latest step, or None to go on."""
        if reason == EOS:
            return "eos"
        # The cache is full (a step may also end at a boundary on the very last position), or no
        # candidate fit the PRM's cache (score -inf).
        if reason == FULL or req.committed + len(req.steps[-1].token_ids) >= self.max_seq_len \
                or (scorer is not None and score == -math.inf):
            return "max_seq_len"
        if cfg.stop:
            text = self._text(req.token_ids)
            if any((s in text) if isinstance(s, str) else s(text) for s in cfg.stop):
                return "stop"
        if len(req.token_ids) >= cfg.max_new_tokens:
            return "max_new_tokens"
        if len(req.steps) >= cfg.max_steps:
            return "max_steps"
        return None

    # -- shared internals ---------------------------------------------------------------------

    def _prepare(self, num_slots: int, scorer: Scorer | None, *, layout: str = "fork",
                 k: int = 1, step_len: int = 1) -> DecodeRunner:
        """The runner over a policy cache of at least ``num_slots`` slots (``layout``; for
        shared_prefix: groups of ``k`` candidate slots of ``step_len`` positions), and the
        scorer's caches; checks that everything new fits before allocating any of it."""
        max_len = self.max_seq_len + 1  # one scratch position for paused slots
        config, dtype = self.policy.config, self.policy.heads.dtype
        groups = num_slots // k
        if layout == "shared_prefix":
            fits = isinstance(self.cache, slot_layouts.SharedPrefixCache) \
                and self.cache.k == k and self.cache.num_groups >= groups \
                and self.cache.step_len >= step_len
        else:
            fits = isinstance(self.cache, KVCache) and self.cache.num_slots >= num_slots
        grow = not fits
        if self.kv_cache_bytes is not None:
            grow = self._budget_reallocates((layout, num_slots, k, step_len), scorer) or grow
        if grow:
            self.cache = self._runner = self._sampler = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        policy_bytes = slot_layouts.nbytes(layout, config, groups, k, max_len, step_len,
                                           dtype) if grow else 0
        slot_layout = SlotLayout(layout, k, step_len)  # a scorer's cache may follow it
        scorer_bytes = scorer.cache_nbytes(num_slots, self.max_seq_len, self.policy,
                                           slot_layout) if scorer else 0
        available = available_bytes(self.device)
        if available is not None and policy_bytes + scorer_bytes > available:
            raise ValueError(
                f"{num_slots} slots ({groups} requests x candidates={k}, {layout} layout) x "
                f"max_seq_len={self.max_seq_len} need "
                f"{policy_bytes:,} bytes of policy KV cache + {scorer_bytes:,} bytes of PRM cache "
                f"= {policy_bytes + scorer_bytes:,} bytes, but only {available:,} bytes are "
                f"available on {self.device}; lower max_batch, candidates or max_seq_len, or set "
                f"kv_cache_bytes= to size the batch to a budget")
        # Normal tensors even when called under torch.inference_mode(): the engine updates its
        # state in place on later calls, which inference tensors forbid outside that mode.
        with torch.inference_mode(False):
            if grow:
                self.cache = slot_layouts.allocate(layout, config, groups, k, max_len, step_len,
                                                   dtype=dtype, device=self.device)
                self._sampler = Sampler(self.policy.heads, num_slots)
                self._runner = DecodeRunner(self.policy.model, self.cache, self._sampler,
                                            max_seq_len=self.max_seq_len, eos_ids=self.eos_ids,
                                            cuda_graphs=self.cuda_graphs)
            if scorer is not None:
                scorer.prepare(num_slots, self.max_seq_len, self.policy, slot_layout)
        return self._runner

    def _batch_size(self, layout: str, k: int, step_len: int, scorer: Scorer | None) -> int:
        """Requests a call runs at once: ``max_batch``; under a KV budget, as many as the budget
        holds (at most ``max_batch``), ValueError if it cannot hold one."""
        if self.kv_cache_bytes is None:
            return self.max_batch
        policy_one = slot_layouts.nbytes(layout, self.policy.config, 1, k, self.max_seq_len + 1,
                                         step_len, self.policy.heads.dtype)
        scorer_one = 0 if scorer is None else scorer.request_nbytes(
            self.max_seq_len, self.policy, SlotLayout(layout, k, step_len))
        one = policy_one + scorer_one
        if one > self.kv_cache_bytes:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes:,} cannot hold one request, which needs "
                f"{one:,} bytes: {policy_one:,} of policy KV cache ({layout} layout, candidates="
                f"{k}, max_seq_len={self.max_seq_len}) + {scorer_one:,} of PRM cache; raise the "
                f"budget or lower max_seq_len, candidates or max_step_tokens")
        fit = self.kv_cache_bytes // one  # both caches' sizes are linear in the request count
        return fit if self.max_batch is None else min(fit, self.max_batch)

    def _budget_reallocates(self, plan: tuple, scorer: Scorer | None) -> bool:
        """Under a KV budget the caches held are exactly those of the current call's sizes
        (``plan``) and scorer: on any change, the previous caches (policy and PRM) are freed
        before new ones are allocated, so they never add up past the budget. True when the
        policy cache must be reallocated."""
        leaves = [] if scorer is None else \
            [s for s, _ in scorer.parts] if isinstance(scorer, WeightedScorer) else [scorer]
        same = plan == self._budget_plan
        for s in self._held_scorers:
            if not same or not any(s is x for x in leaves):
                s.release()
        for s in leaves:  # a scorer new to this plan may hold a cache of other sizes
            if not same or not any(s is x for x in self._held_scorers):
                s.release()
        self._budget_plan, self._held_scorers = plan, leaves
        return not same

    def _set_weights(self, rows: dict[int, torch.Tensor]) -> None:
        """Head weights per slot; unused slots repeat a used slot's weights, so that padding never
        adds a distinct weight vector (which would defeat the shared-weights fast path)."""
        filler = next(iter(rows.values()))
        full = filler.expand(self.cache.num_slots, -1).clone()
        for slot, w in rows.items():
            full[slot] = w
        self._sampler.set_weights(full)

    def _compile(self, boundary: Boundary) -> CompiledBoundary:
        if boundary not in self._compiled:
            if self._texts is None:
                self._texts = vocab_texts(self.tokenizer, self.policy.config.vocab_size)
            eot = end_of_turn_id(self.tokenizer) if boundary.end_of_turn else None
            self._compiled[boundary] = boundary.compile(self._texts, end_of_turn_id=eot,
                                                        device=self.device)
        return self._compiled[boundary]

    def _confirmer(self, boundary: CompiledBoundary):
        spec = boundary.boundary

        def confirm(ids: list[int]) -> tuple[bool, str]:
            opts = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
            text = self.tokenizer.decode(ids, **opts)
            return spec.confirm(text, self.tokenizer.decode(ids[:-1], **opts), len(ids)), text

        return confirm

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)

    def _prompts(self, prompts: Sequence[Any], chat: bool) -> list[Prompt]:
        """Tokenise prompts (`mahalo_engine.text`'s prompt rule): strings (rendered as a user turn
        when ``chat``), chat message lists (always rendered with the chat template) or token-id
        lists."""
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, (list, tuple)) \
                or not prompts:
            raise TypeError("prompts must be a non-empty list of strings, token-id lists or chat "
                            f"message lists, got {type(prompts).__name__}")
        tok, vocab = self.tokenizer, self.policy.config.vocab_size
        out = []
        for i, p in enumerate(prompts):
            is_chat = isinstance(p, (list, tuple)) and bool(p) and all(isinstance(m, dict)
                                                                       for m in p)
            if isinstance(p, str) or is_chat:
                if (is_chat or chat) and not has_chat_template(tok):
                    raise ValueError(f"prompt {i} is a chat but the tokenizer has no chat template")
                prompt = tokenize_prompt(tok, p if isinstance(p, str) else list(p), chat)
            elif isinstance(p, (list, tuple)) and all(is_int(t) for t in p):
                bad = [t for t in p if not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token ids {bad[:5]} outside [0, {vocab})")
                prompt = Prompt(list(p), self._text(list(p)))
            else:
                raise TypeError(f"prompt {i} must be a string, a token-id list or a list of chat "
                                f"messages, got {type(p).__name__}")
            if not prompt.ids:
                raise ValueError(f"prompt {i} is empty after tokenisation")
            if len(prompt.ids) >= self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(prompt.ids)} tokens but max_seq_len is "
                                 f"{self.max_seq_len}; a prompt must be shorter than max_seq_len "
                                 f"to leave room for generated tokens")
            out.append(prompt)
        return out


def _select(scores: torch.Tensor, tau: float, gen: torch.Generator) -> list[int]:
    """Winner per row of ``scores [G, K]``: argmax (ties → lowest index; all NaN → 0), or a draw
    from softmax(score / tau)."""
    if tau == 0 or scores.isnan().all():
        return torch.nan_to_num(scores, nan=-math.inf).argmax(dim=1).tolist()
    probs = torch.softmax(scores / tau, dim=1)
    first = torch.zeros_like(probs)
    first[:, 0] = 1.0
    unscorable = ~torch.isfinite(probs).all(dim=1, keepdim=True)  # every candidate -inf: take 0
    picks = torch.multinomial(torch.where(unscorable, first, probs), 1, generator=gen)
    return picks.squeeze(1).tolist()


def _eos_ids(policy: Any) -> list[int]:
    ids = set()
    for src in (policy.config.eos_token_ids, getattr(policy.tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return sorted(ids)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", disable=not enabled)
