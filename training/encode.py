"""Training examples as token ids: the truncation rule around `mahalo_engine.text`'s contract.

Prompts, steps and responses are tokenised by `mahalo_engine.text` (the rules the engine uses at
inference: a prompt with its special tokens or through the chat template, each step on its own,
a response followed by EOS), so a trainer sees exactly the ids the engine produces.

Truncation rule (prompt side first), for ``max_length`` L and ``max_prompt_length`` P < L: when
prompt + longest response exceeds L, the prompt is cut down to ``max(L - longest response, P)``
tokens; if that is still too long, the responses keep their first ``L - prompt`` tokens (losing
EOS). Which part of the prompt stays is ``keep``: ``"start"`` (the default, the paper's
``keep_start``: a BOS, system prompt and chat header survive; the tokens nearest the response,
e.g. the assistant header of a long dialogue, are lost) or ``"end"`` (the tokens next to the
response survive; the oldest go, header included). Trainers count and log both cases.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from mahalo_engine.text import encode_prompt, encode_response, encode_step
from training.readers import DataError, PreferenceData, SFTExample, StepExample, StepPair


def _prompt_ids(tokenizer, prompt: str | list[dict[str, str]], chat_template: bool,
                source: str) -> list[int]:
    ids = encode_prompt(tokenizer, prompt, chat_template)
    if not ids:  # the first response token needs a position to be predicted from
        raise DataError(f"{source}: the prompt tokenises to nothing; it needs at least one token")
    return ids


TRUNCATE_KEEP = ("start", "end")


def truncate(prompt: list[int], responses: Sequence[list[int]], max_length: int,
             max_prompt_length: int, keep: str = "start"
             ) -> tuple[list[int], list[list[int]], bool, bool]:
    """The module docstring's rule. Returns ``(prompt, responses, prompt_cut, response_cut)``."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length "
                         f"({max_length})")
    if keep not in TRUNCATE_KEEP:
        raise ValueError(f"truncation keeps the prompt's 'start' or 'end', got {keep!r}")
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= max_length:
        return list(prompt), [list(r) for r in responses], False, False
    n_keep = min(len(prompt), max(max_length - longest, max_prompt_length))
    prompt_cut = n_keep < len(prompt)
    prompt = list(prompt[:n_keep] if keep == "start" else prompt[len(prompt) - n_keep:])
    room = max_length - len(prompt)
    response_cut = longest > room
    return prompt, [list(r[:room]) for r in responses], prompt_cut, response_cut


@dataclass
class TruncationStats:
    total: int = 0
    prompt_cut: int = 0
    response_cut: int = 0
    keep: str = "start"

    def add(self, prompt_cut: bool, response_cut: bool) -> None:
        self.total += 1
        self.prompt_cut += prompt_cut
        self.response_cut += response_cut

    def __str__(self) -> str:
        lost = "tokens nearest the response" if self.keep == "start" else "oldest tokens"
        return (f"{self.prompt_cut}/{self.total} prompts truncated ({lost} dropped), "
                f"{self.response_cut}/{self.total} responses truncated")


@dataclass(frozen=True)
class TokenizedPair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    objective: int

    @property
    def length(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def tokenize_pairs(tokenizer, data: PreferenceData, *, max_length: int, max_prompt_length: int,
                   chat_template: bool, keep_prompt: str = "start"
                   ) -> tuple[list[TokenizedPair], TruncationStats]:
    from tqdm import tqdm

    index = {o: i for i, o in enumerate(data.objectives)}
    stats, out = TruncationStats(keep=keep_prompt), []
    for p in tqdm(data.pairs, desc="tokenise", unit="pair", leave=False):
        prompt, (c, r), pc, rc = truncate(_prompt_ids(tokenizer, p.prompt, chat_template, p.source),
                                          [encode_response(tokenizer, p.chosen),
                                           encode_response(tokenizer, p.rejected)],
                                          max_length, max_prompt_length, keep_prompt)
        stats.add(pc, rc)
        out.append(TokenizedPair(prompt, c, r, index[p.objective]))
    return out, stats


@dataclass(frozen=True)
class TokenizedSFT:
    prompt: list[int]
    completion: list[int]


def tokenize_sft(tokenizer, examples: Sequence[SFTExample], *, max_length: int,
                 max_prompt_length: int, chat_template: bool, keep_prompt: str = "start"
                 ) -> tuple[list[TokenizedSFT], TruncationStats]:
    from tqdm import tqdm

    stats, out = TruncationStats(keep=keep_prompt), []
    for e in tqdm(examples, desc="tokenise", unit="example", leave=False):
        prompt, (c,), pc, rc = truncate(_prompt_ids(tokenizer, e.prompt, chat_template, e.source),
                                        [encode_response(tokenizer, e.completion)],
                                        max_length, max_prompt_length, keep_prompt)
        stats.add(pc, rc)
        out.append(TokenizedSFT(prompt, c))
    return out, stats


@dataclass(frozen=True)
class TokenizedSteps:
    ids: list[int]
    positions: list[int]  # index in ids of each kept step's last token
    labels: list[float]


def tokenize_steps(tokenizer, examples: Sequence[StepExample], *, max_length: int,
                   max_prompt_length: int, chat_template: bool,
                   step_separator: str, keep_prompt: str = "start"
                   ) -> tuple[list[TokenizedSteps], TruncationStats]:
    """Prompt ids followed by each step's ids (each step + ``step_separator`` tokenised on its own,
    as the engine feeds a PRM); the label of step k sits at its last token. Over-long prompts follow
    the truncation rule; steps that do not fit whole are dropped with their labels (counted as
    response truncations); an example with no step left is an error."""
    stats, out = TruncationStats(keep=keep_prompt), []
    for e in examples:
        steps = [encode_step(tokenizer, s, step_separator) for s in e.steps]
        if any(not s for s in steps):
            raise DataError(f"{e.source}: a step tokenises to nothing")
        prompt, _, pc, _ = truncate(_prompt_ids(tokenizer, e.prompt, chat_template, e.source),
                                    [[t for s in steps for t in s]], max_length, max_prompt_length,
                                    keep_prompt)
        ids, positions = list(prompt), []
        for s in steps:
            if len(ids) + len(s) > max_length:
                break
            ids.extend(s)
            positions.append(len(ids) - 1)
        if not positions:
            raise DataError(f"{e.source}: no step fits in max_length={max_length} after the "
                            f"prompt ({len(prompt)} tokens)")
        stats.add(pc, len(positions) < len(steps))
        out.append(TokenizedSteps(ids, positions, e.labels[:len(positions)]))
    return out, stats


def tokenize_step_pairs(tokenizer, pairs: Sequence[StepPair], *, max_length: int,
                        max_prompt_length: int, chat_template: bool,
                        step_separator: str, keep_prompt: str = "start"
                        ) -> tuple[list[tuple[list[int], list[int]]], TruncationStats]:
    """(chosen ids, rejected ids) per pair, scored at their last tokens; the truncation rule applies
    with both sides as the responses (a cut response still ends at its last kept token)."""
    stats, out = TruncationStats(keep=keep_prompt), []
    for p in pairs:
        sides = [[t for s in side for t in encode_step(tokenizer, s, step_separator)]
                 for side in (p.chosen, p.rejected)]
        prompt, (c, r), pc, rc = truncate(_prompt_ids(tokenizer, p.prompt, chat_template, p.source), sides,
                                          max_length, max_prompt_length, keep_prompt)
        if not c or not r:
            raise DataError(f"{p.source}: a side tokenises to nothing")
        stats.add(pc, rc)
        out.append((prompt + c, prompt + r))
    return out, stats
