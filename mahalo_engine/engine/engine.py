"""`Engine`: batched generation and PRM-guided step search over one slot KV cache.

With K candidates, each running request owns a group of K candidate slots of the policy's cache
(and of each scorer's cache), laid out by ``cache_layout`` (`mahalo_engine.layouts`: ``"fork"``,
each slot a copy of the committed text; ``"shared_prefix"``, one prefix slot per request plus K
short candidate slots read by cascade attention; a value-model PRM's cache follows the same
layout). A search is one loop over the owners (`Engine.search`): `engine.requests.Requests`
admits queued requests into free groups, decodes every live candidate slot in lockstep
(`DecodeRunner`), scores them in one batch, and, once the engine has selected the winners,
commits them (promote) and retires finished requests. Nothing is re-encoded, by the policy or the
PRM. `generate` always runs on the fork layout with one slot per request.
"""
from __future__ import annotations

import dataclasses
import gc
import math
from typing import Any, Sequence

import torch

from mahalo_engine.cache import available_bytes, kv_budget
from mahalo_engine.boundary import (Boundary, CompiledBoundary, end_of_turn_id,
                                    vocab_texts)
from mahalo_engine.engine.records import (Generation, SearchConfig, SearchResult,
                                         merge_subtrees, resolve_max_seq_len)
from mahalo_engine.engine.decode_runner import BOUNDARY, EOS, FULL, LENGTH, DecodeRunner
from mahalo_engine.engine.requests import Requests
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.engine.scorers import Scorer, WeightedScorer, as_scorer
from mahalo_engine.layouts import CACHE_LAYOUTS, FORK, LaidOutCache, SlotLayout, slot_layout
from mahalo_engine.text import Prompt, has_chat_template, tokenize_prompt
from mahalo_engine.policy import Policy
from triton_kernels.argcheck import check_int, is_int
from triton_kernels.checks import check_sampling

GENERATE_CHECK_EVERY = 8  # decode steps between the host's "all finished?" checks in generate
_GEN_REASON = {BOUNDARY: "stop", EOS: "eos", LENGTH: "length", FULL: "max_seq_len"}


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
        if cache_layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}, got {cache_layout!r}")
        self.cache_layout = cache_layout
        self.policy = policy
        self.tokenizer = policy.tokenizer
        self._scorers: dict[int, tuple[Any, Scorer]] = {}  # one PRM wrapper (cache) per PRM
        self.prm = as_scorer(prm, self._scorers)
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.cuda_graphs = cuda_graphs
        self.device = policy.heads.device
        self._slots: LaidOutCache | None = None  # the policy's cache, in its layout
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
            self._batch_size(FORK, None)  # fail now if not even one request fits

    @classmethod
    def from_models(cls, model: Any, tokenizer: Any, heads: torch.Tensor | None = None, *,
                    objectives: Sequence[str] | None = None, **kwargs: Any) -> "Engine":
        """An engine over in-memory objects, sharing their weights (nothing is copied):
        ``model`` a `Decoder` or a transformers ``*ForCausalLM`` (llama, mistral, qwen2, qwen3),
        ``heads [H,V,d]`` (None: the model's lm_head), the tokenizer object; ``kwargs`` as
        `Engine` (``prm=`` a `ValueModel` built in memory, a `Scorer`, ...). See
        `Policy.from_model`."""
        return cls(Policy.from_model(model, tokenizer, heads, objectives), **kwargs)

    @property
    def cache(self) -> Any:
        """The policy's KV cache (a `KVCache`, or a `SharedPrefixCache` after a search in that
        layout); None before the first call."""
        return None if self._slots is None else self._slots.storage

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
        batch = self._batch_size(FORK, None)
        runner = self._prepare(batch, None)
        runner.set_boundary(boundary)
        self._sampler.configure(temperature, top_k, seed, top_p, min_p)
        out: list[Generation] = []
        bar = _progress(len(reqs), progress, "generate")
        for first in range(0, len(reqs), batch):
            wave = reqs[first:first + batch]
            n = len(wave)
            slots = runner.slots[:n]
            runner.set_hidden(slots, self._slots.admit(self.policy.model, slots[:, None],
                                                       [r.ids for r in wave]))
            self._sampler.set_slot_weights({i: weights[first + i] for i in range(n)})
            runner.begin(slots, torch.full((n,), max_new_tokens))
            runner.run(runner.bucket(n), GENERATE_CHECK_EVERY, self._confirmer(boundary),
                       longest=max(len(r.ids) for r in wave))
            toks, lps, reasons = runner.read(slots)
            out += [Generation(self._text(t), t, lp, _GEN_REASON[r], generated_tokens=len(t))
                    for t, lp, r in zip(toks, lps, reasons)]
            bar.update(n)
        bar.close()
        return out

    @torch.no_grad()
    def search(self, prompts: Sequence[Any], *, head_weights: Any = None,
               config: SearchConfig | None = None, chat: bool = False,
               progress: bool = False) -> list[SearchResult]:
        """PRM-guided step search (see `SearchConfig`): each step samples K candidates per
        request (per beam) until a boundary, scores them, and commits the best."""
        cfg = SearchConfig() if config is None else config
        if not isinstance(cfg, SearchConfig):
            raise TypeError(f"config must be a SearchConfig, got {type(cfg).__name__}")
        scorer = self.prm if cfg.scorer is None else as_scorer(cfg.scorer, self._scorers)
        if scorer is None and cfg.candidates * cfg.beams > 1:
            raise ValueError(f"search with candidates={cfg.candidates}, beams={cfg.beams} needs a "
                             f"scorer to pick the winners: pass prm= to Engine or scorer= to "
                             f"SearchConfig (or use candidates=1, beams=1)")
        boundary = self._compile(Boundary.parse(cfg.boundary))
        reqs, m = self._prompts(prompts, chat), cfg.subtrees
        weights = self.policy.weight_matrix(head_weights, len(reqs)).cpu()
        if m > 1:  # DVTS: each subtree is a request of its own (see SearchConfig.subtrees)
            reqs, weights = [p for p in reqs for _ in range(m)], weights.repeat_interleave(m, 0)
            cfg = dataclasses.replace(cfg, beams=cfg.beams // m, subtrees=1)
        requests = self._requests(reqs, weights, cfg, scorer, boundary)
        selector = torch.Generator().manual_seed(cfg.seed)
        bar = _progress(len(requests.results), progress, "search")
        while requests.pending():
            requests.admit()
            step = requests.decode()
            scores = requests.score(step)
            picks = _select(scores.view(len(step.groups), -1), cfg.beams,
                            cfg.selection_temperature, selector)
            bar.update(requests.commit(step, scores, picks))
        bar.close()
        return merge_subtrees(requests.results, m)

    def _requests(self, reqs: list[Prompt], weights: torch.Tensor, cfg: SearchConfig,
                  scorer: Scorer | None, boundary: CompiledBoundary) -> Requests:
        """A search's requests (``weights``: each one's normalised head weights, on the host) over
        caches sized for it (the policy's and the scorer's), with the runner and sampler
        configured for ``cfg``."""
        candidate_weights = cfg.candidate_weights(weights)  # checks H before any cache is built
        # One step's positions: max_step_tokens + a paused slot's scratch.
        layout = slot_layout(self.cache_layout, cfg.candidates, cfg.max_step_tokens + 1, cfg.beams)
        batch = self._batch_size(layout, scorer)
        runner = self._prepare(batch, scorer, layout)
        if scorer is not None:  # e.g. a prompt too long for a PRM's own tokenizer: fail up front
            scorer.check_prompts(reqs)
        runner.set_boundary(boundary)
        self._sampler.configure(cfg.temperature, cfg.top_k, cfg.seed, cfg.top_p, cfg.min_p)
        return Requests(reqs, candidate_weights, weights, cfg, layout=layout, cache=self._slots,
                        model=self.policy.model, runner=runner, sampler=self._sampler,
                        scorer=scorer, num_groups=batch, max_seq_len=self.max_seq_len,
                        text=self._text, confirm=self._confirmer(boundary))

    # -- shared internals ---------------------------------------------------------------------

    def _prepare(self, num_groups: int, scorer: Scorer | None, layout: SlotLayout = FORK
                 ) -> DecodeRunner:
        """The runner over a policy cache of at least ``num_groups`` groups of ``layout``, and
        the scorer's caches; checks that everything new fits before allocating any of it."""
        max_len = self.max_seq_len + 1  # one scratch position for paused slots
        config, dtype = self.policy.config, self.policy.heads.dtype
        num_slots = layout.num_slots(num_groups)
        grow = not layout.holds(self._slots, num_groups, max_len)
        if self.kv_cache_bytes is not None:
            grow = self._budget_reallocates((layout, num_groups), scorer) or grow
        if grow:
            self._slots = self._runner = self._sampler = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        policy_bytes = layout.nbytes(config, num_groups, max_len, dtype) if grow else 0
        scorer_bytes = scorer.cache_nbytes(num_slots, self.max_seq_len, self.policy,
                                           layout) if scorer else 0  # it may follow the layout
        available = available_bytes(self.device)
        if available is not None and policy_bytes + scorer_bytes > available:
            raise ValueError(
                f"{num_slots} slots ({num_groups} requests x beams={layout.beams} x "
                f"candidates={layout.k}, {layout.name} layout) x max_seq_len={self.max_seq_len} "
                f"need "
                f"{policy_bytes:,} bytes of policy KV cache + {scorer_bytes:,} bytes of PRM cache "
                f"= {policy_bytes + scorer_bytes:,} bytes, but only {available:,} bytes are "
                f"available on {self.device}; lower max_batch, beams, candidates or max_seq_len, or "
                f"set kv_cache_bytes= to size the batch to a budget")
        # Normal tensors even when called under torch.inference_mode(): the engine updates its
        # state in place on later calls, which inference tensors forbid outside that mode.
        with torch.inference_mode(False):
            if grow:
                self._slots = layout.allocate(config, num_groups, max_len, dtype=dtype,
                                              device=self.device)
                self._sampler = Sampler(self.policy.heads, num_slots)
                self._runner = DecodeRunner(self.policy.model, self._slots, self._sampler,
                                            max_seq_len=self.max_seq_len, eos_ids=self.eos_ids,
                                            cuda_graphs=self.cuda_graphs)
            if scorer is not None:
                scorer.prepare(num_slots, self.max_seq_len, self.policy, layout)
        return self._runner

    def _batch_size(self, layout: SlotLayout, scorer: Scorer | None) -> int:
        """Requests a call runs at once: ``max_batch``; under a KV budget, as many as the budget
        holds (at most ``max_batch``), ValueError if it cannot hold one."""
        if self.kv_cache_bytes is None:
            return self.max_batch
        policy_one = layout.nbytes(self.policy.config, 1, self.max_seq_len + 1,
                                   self.policy.heads.dtype)
        scorer_one = 0 if scorer is None else scorer.request_nbytes(self.max_seq_len,
                                                                    self.policy, layout)
        one = policy_one + scorer_one
        if one > self.kv_cache_bytes:
            raise ValueError(
                f"kv_cache_bytes={self.kv_cache_bytes:,} cannot hold one request, which needs "
                f"{one:,} bytes: {policy_one:,} of policy KV cache ({layout.name} layout, "
                f"beams={layout.beams} x candidates={layout.k} = {layout.width} slots, "
                f"max_seq_len={self.max_seq_len}) + {scorer_one:,} of PRM cache; raise the budget "
                f"or lower max_seq_len, beams, candidates or max_step_tokens")
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


def _select(scores: torch.Tensor, n: int, tau: float, gen: torch.Generator) -> list[list[int]]:
    """``n`` survivors per row of ``scores [G, M]``, best first: the ``n`` highest (ties → lowest
    index; NaN lowest), or ``n`` draws without replacement from softmax(score / tau) (a row whose
    probabilities are not finite, every candidate -inf, takes the highest; a row with fewer
    than ``n`` candidates of probability > 0 completes its draws with the highest others)."""
    if n == 1:  # greedy step search's winner, as it always was
        return [[w] for w in _select_one(scores, tau, gen)]
    ranked = torch.sort(torch.nan_to_num(scores, nan=-math.inf), dim=1, descending=True,
                        stable=True).indices.tolist()
    if tau == 0 or scores.isnan().all():
        return [row[:n] for row in ranked]
    probs = torch.softmax(scores / tau, dim=1)
    out = []
    for row, p in zip(ranked, probs):
        drawn = [] if not torch.isfinite(p).all() else \
            torch.multinomial(p, min(n, int((p > 0).sum())), generator=gen).tolist()
        out.append(drawn + [j for j in row if j not in drawn][:n - len(drawn)])
    return out


def _select_one(scores: torch.Tensor, tau: float, gen: torch.Generator) -> list[int]:
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
