"""Search options and result records: `SearchConfig`, `Step`, `Beam`, `SearchResult`,
`Generation`.

Plain dataclasses, validated on construction so that a bad option fails before any cache is
allocated or any token decoded.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mahalo_engine.policy import weight_rows
from mahalo_engine.stop_conditions import StopCondition

from triton_kernels.argcheck import check_int, is_real
from triton_kernels.checks import check_sampling

log = logging.getLogger("mahalo_engine.engine")

DEFAULT_MAX_SEQ_LEN = 4096  # the default cap when the model allows more (the cache grows with it)

@dataclass
class SearchConfig:
    """Options of `Engine.search` (PRM-guided step search).

    candidates: K candidate steps per beam and step (K = 1 is plain step-wise decoding).
    beams: N partial solutions per request (beam search; 1 = greedy step search). Each step every
        live beam expands K candidates (N*K candidate slots per request, N*K*max_seq_len-sized
        caches in the fork layout), and the N best of the request's N*K candidates by score
        survive (``selection_temperature`` > 0: N drawn without replacement from softmax(score /
        τ), in draw order). A survivor that ends the request (EOS, a ``stop`` condition,
        ``max_new_tokens``, ``max_steps``, the cache full or an unscorable -inf score) becomes a
        finished beam, kept aside with its score; the live survivors are the next step's beams,
        duplicated in rank order (best, second, ..., best, ...) while fewer than N, so N beams
        are live at every step (as Hugging Face's search-and-learn keeps N active beams). The
        request ends once N beams have finished or no survivor is live; its result is the
        finished beam with the best score (ties: the first to finish), and
        `SearchResult.beams` lists every finished beam, best first. The candidates of beam b
        run in slots b*K .. b*K+K-1 of the request's group, so candidate position k of every
        beam draws from the stream of its slot (and samples with ``candidate_head_weights``'
        row k); a step's ``candidate_scores`` are its beam's K candidates'.
    subtrees: M (a divisor of ``beams``): diverse verifier tree search (DVTS, as in Hugging Face's
        search-and-learn): the N beams of a request are split into M independent subtrees, each
        a beam search of N/M beams run as a request of its own (its own slots, so its own random
        streams; nothing is shared between subtrees, which keeps their solutions diverse). The
        result is the best finished beam over all M subtrees (ties: the earlier subtree);
        `SearchResult.beams` lists every subtree's finished beams, best first, and the compute
        counts add up over the subtrees. M = 1 is plain beam search.
    boundary: where a step ends: a literal string (e.g. ``"\\n\\n"``), a preset name (``"math"``,
        ``"sentence"``, ``"paragraph"``, ``"turn"``), a list of those, or a `Boundary`.
    max_step_tokens / max_steps / max_new_tokens: caps per step, per request and on the total of
        generated tokens per request.
    temperature / top_k / top_p / min_p / seed: sampling of every candidate token (temperature 0 =
        greedy; top_k 0, top_p 1 and min_p 0 = no filter; applied in transformers' order, see
        docs/design.md, multihead_sample); each candidate slot draws from its own random stream.
    scorer: None (the engine's PRM), a loaded PRM, a `Scorer`, a list of ``(scorer, weight)`` pairs
        (multi-objective guidance), or a callable ``f(prompts, responses) -> scores`` on texts.
    selection_temperature: 0 picks the highest-scoring candidate (ties: lowest index); τ > 0
        samples the winner from softmax(score / τ).
    stop: strings or predicates on the request's generated text checked after each committed step
        (e.g. ``[boxed_closed]``); a match ends the request.
    check_every: decode iterations between the host's "all candidates finished?" checks; the
        device never waits on the host in between.
    candidate_head_weights: None (every candidate samples with its request's head weights), K rows
        of H head weights (candidate k of every request samples with row k, normalised to sum 1 like
        ``head_weights``; kept as a tuple of float tuples), or a spread ``s`` in [0, 1] around each
        request's weights w: candidate 0 samples with w, candidates 1, 2, ... take the heads in turn
        (candidate k moves toward head ``(k - 1) % H``), and the j-th of the m candidates that move
        toward head h samples with ``(1 - a) w + a e_h``, ``a = s * j / m`` (so the last one moves
        by s: s = 1 reaches the head alone). Mixes stay on the simplex (no clipping needed). The
        scorer still scores every candidate for the request (a multi-objective PRM weighted as
        configured, or by the request's weights with ``objectives="request"``), never by the
        candidate's mix; each `Step` records the winner's mix (`Step.head_weights`).
    """

    candidates: int = 5
    beams: int = 1
    subtrees: int = 1
    boundary: Any = "\n\n"
    max_step_tokens: int = 512
    max_steps: int = 20
    max_new_tokens: int = 4096
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    scorer: Any = None
    selection_temperature: float = 0.0
    stop: Sequence[StopCondition] = ()
    check_every: int = 8
    candidate_head_weights: float | Sequence[Sequence[float]] | torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name in ("candidates", "beams", "subtrees", "max_step_tokens", "max_steps",
                     "max_new_tokens", "check_every"):
            check_int(name, getattr(self, name), 1)
        if self.beams % self.subtrees:
            raise ValueError(f"subtrees={self.subtrees} must divide beams={self.beams} (each "
                             f"subtree is a beam search of beams / subtrees beams)")
        check_sampling(self.temperature, self.top_k, self.seed, top_p=self.top_p,
                       min_p=self.min_p)
        if not (is_real(self.selection_temperature)
                and math.isfinite(self.selection_temperature) and self.selection_temperature >= 0):
            raise ValueError(f"selection_temperature must be a finite float >= 0, got "
                             f"{self.selection_temperature!r}")
        if isinstance(self.stop, (str, bytes)) or callable(self.stop):
            self.stop = (self.stop,)
        for s in self.stop:
            if not (isinstance(s, str) and s) and not callable(s):
                raise TypeError(f"stop conditions must be non-empty strings or callables on the "
                                f"generated text, got {s!r}")
        self._check_candidate_weights()

    def _check_candidate_weights(self) -> None:
        """What can be checked before the policy's head count H is known (`candidate_weights`
        checks H)."""
        w = self.candidate_head_weights
        if w is None:
            return
        if is_real(w):
            if not (math.isfinite(w) and 0 <= w <= 1):
                raise ValueError(f"candidate_head_weights as a spread must be a number in [0, 1], "
                                 f"got {w!r}")
            return
        if isinstance(w, (str, bytes, bool)) or not isinstance(w, (Sequence, torch.Tensor)):
            raise TypeError(f"candidate_head_weights must be None, a spread in [0, 1] or "
                            f"candidates={self.candidates} rows of head weights, got {w!r}")
        weight_rows(w, self.candidates, None, name="candidate_head_weights", broadcast=False,
                    rows_for="candidates =")
        # Plain rows as given (a tensor would make configs incomparable and unhashable).
        rows = w.tolist() if isinstance(w, torch.Tensor) else w
        self.candidate_head_weights = tuple(tuple(float(x) for x in row) for row in rows)

    def candidate_weights(self, request_weights: torch.Tensor) -> torch.Tensor:
        """float32 ``[R, K, H]``: the head weights candidate k of request r samples with, from the
        requests' normalised weights ``request_weights [R, H]`` (see `candidate_head_weights`)."""
        r, h = request_weights.shape
        k, w = self.candidates, self.candidate_head_weights
        base = request_weights.double().cpu()
        if w is None:
            out = base[:, None, :].expand(r, k, h)
        elif is_real(w):
            out = base[:, None, :].repeat(1, k, 1)
            moves = [(c - 1) % h for c in range(1, k)]
            for c, head in enumerate(moves, 1):
                count = moves.count(head)  # m: the candidates that move toward this head
                j = moves[:c].count(head)  # this candidate is the j-th of them
                a = w * j / count
                out[:, c] = (1 - a) * base
                out[:, c, head] += a
            # One normalisation rule for every mix: the policy's (rounding may leave sums off 1).
            out = weight_rows(out.reshape(r * k, h), r * k, h,
                              name="candidate_head_weights").view(r, k, h)
        else:
            rows = weight_rows(w, k, h, name="candidate_head_weights", broadcast=False,
                               rows_for="candidates =")
            out = rows[None].expand(r, k, h)
        return out.to(torch.float32).contiguous()


def resolve_max_seq_len(max_seq_len: int | None, max_position_embeddings: int) -> int:
    """The engine's sequence cap: None is the model's ``max_position_embeddings``, at most
    ``DEFAULT_MAX_SEQ_LEN``. A cap above the model's positions is allowed (RoPE extrapolates) but
    logged once, since quality past the trained length is not what the model was trained for."""
    if max_seq_len is None:
        return min(DEFAULT_MAX_SEQ_LEN, max_position_embeddings)
    check_int("max_seq_len", max_seq_len, 2)
    if max_seq_len > max_position_embeddings:
        log.warning("max_seq_len %d exceeds the model's max_position_embeddings %d: positions past "
                    "%d were never trained; outputs there may degrade", max_seq_len,
                    max_position_embeddings, max_position_embeddings)
    return max_seq_len


@dataclass
class Step:
    """One committed step: its text and token ids exactly as fed to the policy's cache, the winner's
    score, every candidate's score (index = candidate), why the winning candidate ended
    (``boundary``, ``eos``, ``length`` = `max_step_tokens` or `max_new_tokens`, ``max_seq_len``),
    and the head weights the winner sampled with (normalised; the request's own unless
    `SearchConfig.candidate_head_weights` gives candidates their own)."""

    text: str
    token_ids: list[int]
    score: float
    candidate_scores: list[float]
    finish_reason: str = "boundary"
    head_weights: list[float] = field(default_factory=list)


@dataclass
class Beam:
    """A finished beam of a search: its text and token ids (prompt excluded), its steps, its final
    score (its last step's score) and why it ended (as `SearchResult.finish_reason`)."""

    text: str
    token_ids: list[int]
    steps: list[Step]
    score: float
    finish_reason: str


@dataclass
class SearchResult:
    """A searched response: generated text and token ids (prompt excluded), its steps, and why the
    request ended: ``eos``, ``stop`` (a stop condition matched), ``max_steps``, ``max_new_tokens``
    or ``max_seq_len`` (the cache is full: the request ends there instead of failing the batch).
    ``beams``: every finished beam, best score first (the result is ``beams[0]``; one with
    ``beams=1``).

    Compute spent on the request, counted on the host from what the search already knows:
    ``generated_tokens``, every token the policy sampled for it, discarded candidates included
    (each candidate's step as decoded, every beam's: a paused or finished slot's scratch samples
    are not part of any step and are not counted); ``scored_tokens``, every token the scorer's
    model(s) ran through for it: the prompt's prefill plus each candidate step it encoded (in its
    own tokens: re-tokenised for a PRM with another tokenizer; a candidate that did not fit is not
    encoded), summed over the models of a weighted scorer. A scorer that runs no model over tokens
    counts 0: a value head on the policy's hidden states, a text callable (what it runs is unknown
    to the engine; a `Scorer` subclass reports its own counts in `Candidates.scored_tokens`)."""

    text: str
    token_ids: list[int]
    steps: list[Step] = field(default_factory=list)
    finish_reason: str = "max_steps"
    generated_tokens: int = 0
    scored_tokens: int = 0
    beams: list[Beam] = field(default_factory=list)


@dataclass
class Generation:
    """A generated response (prompt excluded) with each token's log-probability under the sampling
    distribution, and why it ended: ``eos``, ``stop`` (a stop string), ``length``
    (`max_new_tokens`) or ``max_seq_len``. ``generated_tokens``: the tokens the policy sampled for
    it (``len(token_ids)``); ``scored_tokens``: 0 (no scorer runs), as in `SearchResult`, so that
    methods compare at equal compute."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str = "length"
    generated_tokens: int = 0
    scored_tokens: int = 0


def rank_beams(beams: list[Beam]) -> list[Beam]:
    """``beams`` best score first; a stable sort, so ties keep their order (the first to finish,
    the earlier subtree); a NaN score (no scorer) ranks last."""
    return sorted(beams, key=lambda b: math.inf if math.isnan(b.score) else -b.score)


def best_beam_result(beams: list[Beam], generated_tokens: int,
                     scored_tokens: int) -> SearchResult:
    """A request's result from its finished ``beams``: the best (`rank_beams`) as its text, every
    beam best first, and the compute it spent."""
    ranked = rank_beams(beams)
    best = ranked[0]
    return SearchResult(best.text, best.token_ids, best.steps, best.finish_reason,
                        generated_tokens=generated_tokens, scored_tokens=scored_tokens,
                        beams=ranked)


def merge_subtrees(results: list[SearchResult], m: int) -> list[SearchResult]:
    """Each request's result from its ``m`` subtrees' (consecutive in ``results``; DVTS,
    `SearchConfig.subtrees`): every finished beam, best first (ties: the earlier subtree, then
    each subtree's own order), the best one as the result, the compute counts summed."""
    if m == 1:
        return results
    return [best_beam_result([b for r in parts for b in r.beams],
                             sum(r.generated_tokens for r in parts),
                             sum(r.scored_tokens for r in parts))
            for parts in (results[i:i + m] for i in range(0, len(results), m))]
