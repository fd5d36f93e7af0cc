"""Candidate scorers for step search: a PRM with its own persistent slot cache, a value head on the
policy's own hidden states, weighted combinations, and any callable on texts.

The engine drives a scorer through calls that mirror its policy cache:
``prepare`` (allocate, once per cache size and layout), ``start`` (new requests: their prompts
enter the groups' slots), ``score`` (the K candidates of every live request, one batch),
``promote`` (each group's winner becomes its siblings' committed text) and ``move`` (requests
change groups). Candidate slots are numbered alike in the policy's cache and in every scorer's.
A scorer with a cache keeps it through the layout given at ``prepare`` (`mahalo_engine.layouts`:
`SlotLayout.allocate` returns a cache whose events take these calls' arguments as they are), as
`ValueModelPRM` does: no layout logic of its own.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mahalo_engine.layouts import FORK, LaidOutCache, SlotLayout
from mahalo_engine.value_model import (VALUE_HEAD_FILE, ObjectiveWeights, apply_kind,
                                       combine_objectives, load_value_head, objective_weights)
from mahalo_engine.text import Prompt, encode_prompt, encode_step, has_chat_template
from triton_kernels.argcheck import is_real


log = logging.getLogger(__name__)

# ``objectives=REQUEST``: a multi-objective PRM's outputs weighted by each request's head weights
# (by objective name), never by the mix a candidate sampled with.
REQUEST = "request"


@dataclass
class Candidates:
    """The K candidates of G live requests (rows group-major: row ``g*K + k``); with beams, of G
    live beams (a request's beams one after the other, each with its own committed text).

    ``head_weights``: each request's own normalised head weights (not its candidates' mixes: a
    scorer judges every candidate of a request by the same standard), one row per group (with
    beams: per beam, its request's). ``scored_tokens``: what a scorer's `score` adds per row: the
    tokens its model encoded for that candidate (`SearchResult.scored_tokens`)."""

    slots: torch.Tensor  # int64 [G, K]: each candidate's slot
    token_ids: list[list[int]]  # [G*K] the candidate step's tokens, as in the policy's cache
    texts: list[str]  # [G*K] the candidate step's text
    hidden: torch.Tensor  # [G*K, d] the policy's hidden state at each candidate's last token
    prompts: list[Prompt]  # [G]
    responses: list[str]  # [G] the text committed so far (steps before this one)
    head_weights: torch.Tensor | None = None  # float32 [G, H] on the host: each request's own
    scored_tokens: list[int] = field(default_factory=list)  # [G*K]; zeros by default

    def __post_init__(self) -> None:
        if not self.scored_tokens:
            self.scored_tokens = [0] * len(self.token_ids)

    def row_weights(self, heads: list[int]) -> torch.Tensor:
        """float32 ``[G*K, len(heads)]``: the request weights of ``heads`` for every row."""
        if self.head_weights is None:
            raise ValueError("objectives='request' needs the requests' head weights, which these "
                             "candidates do not carry")
        return self.head_weights[:, heads].float().repeat_interleave(self.num_candidates, dim=0)

    @property
    def num_candidates(self) -> int:
        return self.slots.shape[1]


class Scorer:
    """Base class: a stateless scorer only overrides `score`."""

    def cache_nbytes(self, num_slots: int, max_len: int, policy: Any = None,
                     layout: SlotLayout = FORK) -> int:
        """Bytes `prepare` would newly allocate (the engine checks the total before allocating)."""
        return 0

    def request_nbytes(self, max_len: int, policy: Any, layout: SlotLayout = FORK) -> int:
        """Bytes of `prepare`'s state per request (its ``layout.width`` slots of up to ``max_len``
        tokens; ``n`` requests: ``n`` times this); an engine under a memory budget sizes its
        batch with it."""
        return 0

    def release(self) -> None:
        """Free the per-slot state (the next `prepare` allocates it again)."""

    def prepare(self, num_slots: int, max_len: int, policy: Any,
                layout: SlotLayout = FORK) -> None:
        """Allocate per-slot state for ``num_slots`` slots of up to ``max_len`` tokens, in the
        policy cache's ``layout``."""

    def check_prompts(self, prompts: list[Prompt]) -> None:
        """ValueError, before anything is decoded, for prompts this scorer cannot take."""

    def start(self, slots: torch.Tensor, prompts: list[Prompt]) -> None:
        """New requests enter groups ``slots [G, beams*K]`` (every slot of a group holds the
        prompt)."""

    def prompt_tokens(self, prompts: list[Prompt]) -> list[int]:
        """Tokens `start` runs through this scorer's model(s) per prompt (compute accounting,
        `SearchResult.scored_tokens`); 0 for a scorer that encodes no prompt."""
        return [0] * len(prompts)

    def score(self, cands: Candidates) -> torch.Tensor:
        """float32 ``[G*K]`` scores on the CPU; -inf marks a candidate that cannot be scored. A
        scorer that runs a model over the candidates adds the tokens it encoded per row to
        ``cands.scored_tokens``."""
        raise NotImplementedError

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Slot ``dst[p]`` takes the committed state of slot ``src[p]``, its group's winner (int64
        ``[P]``: every non-winning candidate slot of every continuing group; the winners keep
        theirs). The same event per group: ``winners [G']`` (each continuing group's winning
        slot) and ``groups [G', K]`` (its candidate slots), for a cache laid out per group. With
        beams a group is a beam, and ``moves`` ``(src, dst)`` (int64 ``[M]``) are the slots of
        beams that go on from another beam's candidate of the same request: slot ``dst[m]``
        takes slot ``src[m]``'s state; both share only the request's prompt. Moves come first:
        ``src[m]`` may be a ``dst[p]`` (`mahalo_engine.layouts`)."""

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot ``dst[p]`` takes the committed state of slot ``src[p]`` (requests moved to other
        groups between steps)."""

    def graph_safe(self) -> bool:
        """Whether `promote` only runs device work on fixed shapes (no host reads, no allocation
        that depends on values), so that the engine may capture it in a CUDA graph with its own
        promote. True for scorers that keep no per-slot state (they do not override `promote`)."""
        return type(self).promote is Scorer.promote


class ValueModelPRM(Scorer):
    """A PRM (`load_prm`) scoring candidates over its own slot cache of each request's committed
    text: the K candidates go in as one batched ragged ``extend`` (each into its own slot), the
    score is read at each candidate's last token, and `promote` copies the winner's new tokens into
    its siblings with `KVCache.promote`. Nothing is ever re-encoded.

    The cache follows the policy's layout (`SlotLayout.for_scorer`): in ``shared_prefix`` (with
    K > 1 and the policy's tokens) it is a `SharedPrefixCache` too: one prefix slot per request
    plus K candidate slots of ``step_len`` positions; the candidates' steps go in with
    ``extend_shared`` (cascade extend attention: the prefix read once for all candidates), and
    `promote` appends the winner's step to the prefix (``kv_append``, one launch). A PRM that
    re-tokenises step texts keeps the fork layout: its step may take more tokens than a candidate
    slot holds.

    With the policy's tokenizer (same vocabulary) the candidate's token ids are fed as they are;
    with another tokenizer each step's text is tokenised on its own and appended
    (`mahalo_engine.text.encode_step`, as the PRM trainers tokenise step data). A PRM without a
    tokenizer must share the policy's vocabulary.

    ``objectives`` weights a multi-objective PRM's outputs (`mahalo_engine.value_model.objective_weights`:
    None = uniform mean, a name, ``{name: weight}``): one backbone serves every weighting.
    ``objectives="request"``: each request's head weights, matched to the PRM's objectives by
    name (every PRM objective must be one of the policy's), so requests of one batch are judged
    by their own mix; the candidates' own mixes (`SearchConfig.candidate_head_weights`) never
    weight the score.
    """

    def __init__(self, prm: Any, objectives: ObjectiveWeights = None) -> None:
        self.prm = prm
        self.objectives = objectives
        if objectives == REQUEST:
            _check_request_objectives(getattr(prm, "objectives", None))
        else:  # fail now, not mid-search
            objective_weights(getattr(prm, "objectives", None), objectives)
        self._heads: list[int] = []  # objectives="request": the policy head of each objective
        self.slots: LaidOutCache | None = None  # the cache, in its layout
        self.same_tokens = True

    @property
    def cache(self) -> Any:
        """The cache's storage (a `KVCache` or a `SharedPrefixCache`), None before `prepare`."""
        return None if self.slots is None else self.slots.storage

    @property
    def _dtype(self) -> torch.dtype:
        return self.prm.model.dtype

    @property
    def _device(self) -> torch.device:
        return self.prm.model.device

    def _layout(self, layout: SlotLayout, policy: Any) -> SlotLayout:
        return layout.for_scorer(_shares_vocabulary(self.prm, policy))

    def cache_nbytes(self, num_slots: int, max_len: int, policy: Any = None,
                     layout: SlotLayout = FORK) -> int:
        # Without the policy the vocabularies are unknown: sized as a re-tokenising PRM's.
        mine = layout.for_scorer(False) if policy is None else self._layout(layout, policy)
        groups = layout.num_groups(num_slots)
        # More slots than needed is fine (like the policy's cache: a search with fewer candidates
        # after one with more reuses it instead of reallocating).
        if mine.holds(self.slots, groups, max_len):
            return 0
        return mine.nbytes(self.prm.config, groups, max_len, self._dtype)

    def request_nbytes(self, max_len: int, policy: Any, layout: SlotLayout = FORK) -> int:
        return self._layout(layout, policy).nbytes(self.prm.config, 1, max_len, self._dtype)

    def release(self) -> None:
        self.slots = None

    def prepare(self, num_slots: int, max_len: int, policy: Any,
                layout: SlotLayout = FORK) -> None:
        if self.objectives == REQUEST:
            self._heads = _request_heads(self.prm.objectives, policy)
        self.same_tokens = _shares_vocabulary(self.prm, policy)
        mine = layout.for_scorer(self.same_tokens)
        if layout.k > 1 and mine.name != layout.name:
            log.warning("the PRM re-tokenises step texts, so its cache keeps the fork layout "
                        "(a step may take more PRM tokens than a shared_prefix candidate slot "
                        "holds)")
        groups = layout.num_groups(num_slots)
        if mine.holds(self.slots, groups, max_len):
            return
        self.slots = None  # free the old cache before allocating the new one
        self.slots = mine.allocate(self.prm.config, groups, max_len, dtype=self._dtype,
                                   device=self._device)

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        if self.same_tokens:
            return prompt.ids
        tok = self.prm.tokenizer
        if prompt.messages is not None and has_chat_template(tok):
            return encode_prompt(tok, prompt.messages)
        return encode_prompt(tok, prompt.text)

    def check_prompts(self, prompts: list[Prompt]) -> None:
        if self.same_tokens:
            return  # the policy's ids, which the engine checked against max_seq_len
        lens = [len(self._prompt_ids(p)) for p in prompts]
        too_long = [(i, n) for i, n in enumerate(lens) if n >= self.slots.max_len]
        if too_long:
            raise ValueError(f"prompts (index, PRM tokens) {too_long} do not fit the PRM's cache "
                             f"of max_seq_len={self.slots.max_len}: the PRM's tokenizer needs "
                             f"fewer than that, to leave room for steps")

    def start(self, slots: torch.Tensor, prompts: list[Prompt]) -> None:
        self.slots.admit(self.prm.model, slots.to(self._device),
                         [self._prompt_ids(p) for p in prompts])

    def prompt_tokens(self, prompts: list[Prompt]) -> list[int]:
        # Another tokenizer encodes the prompt again here (host only, once per request).
        return [len(self._prompt_ids(p)) for p in prompts]

    @torch.no_grad()
    def score(self, cands: Candidates) -> torch.Tensor:
        tok = self.prm.tokenizer
        rows = cands.token_ids if self.same_tokens else [encode_step(tok, t) for t in cands.texts]
        scores = torch.full((len(rows),), -math.inf, dtype=torch.float32)
        # A candidate whose PRM tokens do not fit the PRM cache, or that has none, is unscorable.
        ok, last = self.slots.extend_steps(self.prm.model, rows, cands.slots.to(self._device))
        for i in ok:  # what went in (extend_steps encodes exactly these rows)
            cands.scored_tokens[i] += len(rows[i])
        if ok:
            scores[ok] = self._scores(last, cands, ok)
        return scores

    def _scores(self, last: torch.Tensor, cands: Candidates, ok: list[int]) -> torch.Tensor:
        if self.objectives == REQUEST:  # each objective alone, weighted per row by its request
            per = torch.stack([self.prm.scores_from_hidden(last, o).float().cpu()
                               for o in self.prm.objectives], dim=-1)
            return (per * cands.row_weights(self._heads)[ok]).sum(-1)
        if self.objectives is None:  # a plain PRM object (e.g. a user's) needs no objectives argument
            return self.prm.scores_from_hidden(last).float().cpu()
        return self.prm.scores_from_hidden(last, self.objectives).float().cpu()

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        dev = self._device
        self.slots.promote(src.to(dev), dst.to(dev), winners.to(dev), groups.to(dev),
                           None if moves is None else tuple(m.to(dev) for m in moves))

    def graph_safe(self) -> bool:
        return True

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.slots.move(src.to(self._device), dst.to(self._device))


def _check_request_objectives(objectives: Sequence[str] | None) -> None:
    if objectives is None:
        raise ValueError("objectives='request' weights a multi-objective PRM's outputs by each "
                         "request's head weights, but this PRM has a single output")


def _request_heads(objectives: Sequence[str], policy: Any) -> list[int]:
    """The policy head of each PRM objective, by name (objectives='request')."""
    heads = list(getattr(policy, "objectives", None) or ())
    missing = [o for o in objectives if o not in heads]
    if missing:
        raise ValueError(f"objectives='request': PRM objectives {missing} are not among the "
                         f"policy's head objectives {heads}; each PRM objective takes the weight "
                         f"of the policy head of the same name")
    return [heads.index(o) for o in objectives]


def _shares_vocabulary(prm: Any, policy: Any) -> bool:
    """True when candidate token ids can be fed to the PRM as they are; False when step texts
    must be re-tokenised by the PRM's tokenizer; ValueError when neither is possible."""
    pv, qv = policy.config.vocab_size, prm.config.vocab_size
    if prm.tokenizer is None:
        if pv != qv:
            raise ValueError(f"the PRM has vocabulary size {qv} and no tokenizer, the policy "
                             f"{pv}: without a PRM tokenizer to re-tokenise step texts the "
                             f"vocabularies must match")
        return True
    return qv >= pv and prm.tokenizer.get_vocab() == policy.tokenizer.get_vocab()


class SharedBackbonePRM(Scorer):
    """A value head trained on the policy's frozen backbone: it scores each candidate from the
    policy's own hidden state at the candidate's last token. No second model, no second cache
    (it encodes no tokens: `SearchResult.scored_tokens` counts 0 for it).
    ``objectives`` weights a multi-objective head's outputs, as in `ValueModelPRM` (``"request"``
    included)."""

    def __init__(self, value_head: torch.nn.Module, kind: str,
                 objectives: ObjectiveWeights = None) -> None:
        apply_kind(torch.zeros(1), kind)  # validates kind
        self.value_head = value_head
        self.kind = kind
        self.by_request = objectives == REQUEST
        if self.by_request:
            _check_request_objectives(getattr(value_head, "objectives", None))
            self.weights = None
        else:
            self.weights = objective_weights(getattr(value_head, "objectives", None), objectives)
        self._heads: list[int] = []  # objectives="request": the policy head of each objective

    @classmethod
    def load(cls, path: str | Path, policy: Any,
             objectives: ObjectiveWeights = None) -> "SharedBackbonePRM":
        """The value head of a PRM directory (or ``value_head.safetensors`` file) whose backbone is
        the policy's; only the head is read."""
        p = Path(path)
        head, kind = load_value_head(p / VALUE_HEAD_FILE if p.is_dir() else p)
        if head.hidden_size != policy.config.hidden_size:
            raise ValueError(f"value head {p} expects hidden size {head.hidden_size}, the policy "
                             f"has {policy.config.hidden_size}")
        return cls(head.to(policy.heads.device), kind, objectives)

    @classmethod
    def from_prm(cls, prm: Any, policy: Any,
                 objectives: ObjectiveWeights = None) -> "SharedBackbonePRM":
        """Reuse a loaded PRM's value head after checking that its backbone is the policy's."""
        mine, theirs = policy.model.state_dict(), prm.model.state_dict()
        differ = [k for k in theirs if not k.startswith("lm_head")
                  and (k not in mine or mine[k].shape != theirs[k].shape
                       or not torch.equal(mine[k].to(theirs[k].device), theirs[k]))]
        if differ:
            raise ValueError(f"the PRM's backbone is not the policy's (first differing tensors: "
                             f"{differ[:3]}): a shared-backbone scorer needs the same weights")
        return cls(prm.value_head, prm.kind, objectives)

    def prepare(self, num_slots: int, max_len: int, policy: Any,
                layout: SlotLayout = FORK) -> None:
        if self.by_request:
            self._heads = _request_heads(self.value_head.objectives, policy)

    @torch.no_grad()
    def score(self, cands: Candidates) -> torch.Tensor:
        param = next(self.value_head.parameters())
        raw = apply_kind(self.value_head(cands.hidden.to(device=param.device, dtype=param.dtype)),
                         self.kind)
        if self.by_request:
            return (raw.float().cpu() * cands.row_weights(self._heads)).sum(-1)
        return combine_objectives(raw, self.weights).float().cpu()


class WeightedScorer(Scorer):
    """``Σ_i w_i · score_i``: several PRMs guiding one search (multi-objective guidance). Each
    part adds its own model's tokens to ``Candidates.scored_tokens`` (a sum over the models)."""

    def __init__(self, parts: Sequence[tuple[Scorer, float]]) -> None:
        if not parts:
            raise ValueError("a weighted scorer needs at least one (scorer, weight) pair")
        for scorer, w in parts:
            if not isinstance(scorer, Scorer):
                raise TypeError(f"expected a Scorer in (scorer, weight), got "
                                f"{type(scorer).__name__}")
            if not (is_real(w) and math.isfinite(w)):
                raise ValueError(f"scorer weights must be finite numbers, got {w!r}")
        if all(w == 0 for _, w in parts):
            raise ValueError(f"scorer weights {[w for _, w in parts]} are all zero")
        # One part per scorer object (nested weighted scorers flattened): a stateful scorer listed
        # twice (the same PRM under two weights) would otherwise extend and promote its cache
        # twice per step. Zero-weight parts are dropped: they would never be scored.
        merged: dict[int, list] = {}
        for scorer, w in parts:
            inner = scorer.parts if isinstance(scorer, WeightedScorer) else [(scorer, 1.0)]
            for part, v in inner:
                merged.setdefault(id(part), [part, 0.0])[1] += float(w) * v
        self.parts = [(s, w) for s, w in merged.values() if w != 0]
        if not self.parts:
            raise ValueError(f"scorer weights {[w for _, w in parts]} cancel out: every scorer's "
                             f"total weight is zero")

    def cache_nbytes(self, num_slots: int, max_len: int, policy: Any = None,
                     layout: SlotLayout = FORK) -> int:
        return sum(s.cache_nbytes(num_slots, max_len, policy, layout) for s, _ in self.parts)

    def request_nbytes(self, max_len: int, policy: Any, layout: SlotLayout = FORK) -> int:
        return sum(s.request_nbytes(max_len, policy, layout) for s, _ in self.parts)

    def release(self) -> None:
        for s, _ in self.parts:
            s.release()

    def prepare(self, num_slots: int, max_len: int, policy: Any,
                layout: SlotLayout = FORK) -> None:
        for s, _ in self.parts:
            s.prepare(num_slots, max_len, policy, layout)

    def check_prompts(self, prompts: list[Prompt]) -> None:
        for s, _ in self.parts:
            s.check_prompts(prompts)

    def start(self, slots: torch.Tensor, prompts: list[Prompt]) -> None:
        for s, _ in self.parts:
            s.start(slots, prompts)

    def prompt_tokens(self, prompts: list[Prompt]) -> list[int]:
        counts = [s.prompt_tokens(prompts) for s, _ in self.parts]  # summed over the models
        return [sum(c) for c in zip(*counts)]

    def score(self, cands: Candidates) -> torch.Tensor:
        total = torch.zeros(len(cands.token_ids), dtype=torch.float32)
        for s, w in self.parts:
            total += w * s.score(cands)
        return total

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        for s, _ in self.parts:
            s.promote(src, dst, winners, groups, moves)

    def graph_safe(self) -> bool:
        return all(s.graph_safe() for s, _ in self.parts)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for s, _ in self.parts:
            s.move(src, dst)


class CallableScorer(Scorer):
    """Any Python callable ``fn(prompts, responses) -> scores`` on texts (a judge, a rule): one call
    per step with every candidate, ``responses[i]`` = the committed text + candidate i's step.
    Re-encoding, if any, is the callable's business: what it runs is unknown to the engine, so it
    counts 0 scored tokens (a `Scorer` subclass can count its own in `Candidates.scored_tokens`)."""

    def __init__(self, fn: Callable[[list[str], list[str]], Sequence[float]]) -> None:
        self.fn = fn

    def score(self, cands: Candidates) -> torch.Tensor:
        k = cands.num_candidates
        prompts = [p.text for p in cands.prompts for _ in range(k)]
        responses = [r + t for r, t in zip((r for r in cands.responses for _ in range(k)),
                                           cands.texts)]
        out = self.fn(prompts, responses)
        try:
            scores = torch.as_tensor([float(x) for x in out], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"scorer {self.fn!r} must return one number per candidate, got "
                             f"{out!r}") from e
        if scores.shape != (len(responses),):
            raise ValueError(f"scorer {self.fn!r} returned {scores.numel()} scores for "
                             f"{len(responses)} candidates")
        return scores


def as_scorer(spec: Any, memo: dict[int, tuple[Any, Scorer]] | None = None) -> Scorer | None:
    """A `Scorer` from what users pass: None, a Scorer, a loaded PRM, ``[(scorer, weight), ...]``
    (each scorer any of these) or a callable on texts. ``memo`` keeps one `ValueModelPRM` (and its
    cache) per PRM object across calls."""
    if spec is None or isinstance(spec, Scorer):
        return spec
    if hasattr(spec, "scores_from_hidden") and hasattr(spec, "model"):
        if memo is None:
            return ValueModelPRM(spec)
        if id(spec) not in memo or memo[id(spec)][0] is not spec:
            memo[id(spec)] = (spec, ValueModelPRM(spec))
        return memo[id(spec)][1]
    if isinstance(spec, (list, tuple)):
        parts = []
        for item in spec:
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise TypeError(f"a list of scorers must hold (scorer, weight) pairs, got {item!r}")
            parts.append((as_scorer(item[0], memo), item[1]))
        return WeightedScorer(parts)
    if callable(spec):
        return CallableScorer(spec)
    raise TypeError(f"cannot use {type(spec).__name__} as a scorer: expected a PRM from load_prm, "
                    f"a Scorer, a list of (scorer, weight) pairs or a callable on texts")
