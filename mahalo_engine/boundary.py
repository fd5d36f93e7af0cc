"""Step boundaries: what ends a step, detected on the device and confirmed on the host.

A `Boundary` combines literal strings (``"\\n\\n"`` for math), sentence ends and paragraph breaks
with guards (the paper's human-values chunker), the chat template's end-of-turn token and explicit
token ids. `Boundary.compile` turns it into `CompiledBoundary`, tables over the policy's vocabulary:

- end-of-turn and explicit ids: a boolean mask over token ids, exact;
- strings, sentence ends, paragraph breaks: small character automata run over every token's text
  ahead of time, giving for each (automaton state, token) the next state and whether the token
  completes a boundary. The state carries what the previous tokens began (``"\\n"`` then ``"\\n"``,
  ``"."`` then ``'"'``), so a boundary split across tokens is found by one table lookup per token
  on the device, with no decoding and no host round-trip.

The tables can only over-report (a guard such as "e.g." or a bare list marker "1." needs the text),
so a slot that stops on them is confirmed on the host with the decoded step text once, when it
stops; a rejected slot resumes decoding where it paused (in the automaton states of that text when
the tables could not follow it: a character split over byte tokens).
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from triton_kernels.argcheck import check_int

# Closing quotes/brackets allowed between a sentence's final punctuation and its end.
_CLOSERS = "\"')]\u201d\u2019\u00bb"
_SENTENCE_END = ".!?"
_SENTENCE_RE = re.compile(r"[.!?][" + re.escape(_CLOSERS) + r"]*\s*$")
_PARAGRAPH_RE = re.compile(r"\n{2,}$")
# A line holding only a list marker: "-", "*", "1.", "2)", "A)", "b.", "Step 3:".
_LIST_MARKER_RE = re.compile(r"(?:[-*+\u2022]|\d+[.)]|[A-Za-z][.)]|Step\s*\d+\s*[:.]?)",
                             re.IGNORECASE)
DEFAULT_ABBREVIATIONS = (
    "e.g.", "i.e.", "etc.", "vs.", "cf.", "al.", "approx.", "dr.", "mr.", "mrs.", "ms.", "prof.",
    "sr.", "jr.", "st.", "no.", "fig.", "eq.", "inc.", "ltd.", "co.", "u.s.", "a.m.", "p.m.",
)


@dataclass(frozen=True)
class Boundary:
    """What ends a step (any of the parts that are set).

    strings: literal strings; a step ends at the token that completes one of them (the rest of that
        token stays in the step, since the step is exactly what the policy's cache holds).
    sentence: the step text ends with ``[.!?]`` (then optional closing quotes/brackets and
        whitespace), except after an abbreviation (``abbreviations``) or on a line holding only a
        list marker.
    paragraph: the step text ends with two or more newlines, unless the last line is a bare list
        marker.
    end_of_turn: the chat template's end-of-turn token (e.g. ``<|im_end|>``).
    token_ids: explicit token ids.
    min_tokens: strings, sentences and paragraphs count only once the step has this many tokens.
    """

    strings: tuple[str, ...] = ()
    sentence: bool = False
    paragraph: bool = False
    end_of_turn: bool = False
    token_ids: tuple[int, ...] = ()
    min_tokens: int = 1
    abbreviations: tuple[str, ...] = DEFAULT_ABBREVIATIONS

    def __post_init__(self) -> None:
        if isinstance(self.strings, str):
            raise TypeError(f"Boundary.strings must be a sequence of strings, got the string "
                            f"{self.strings!r}; wrap it in a tuple")
        object.__setattr__(self, "strings", tuple(self.strings))
        object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))
        object.__setattr__(self, "abbreviations", tuple(a.lower() for a in self.abbreviations))
        for s in self.strings:
            if not isinstance(s, str) or not s:
                raise ValueError(f"boundary strings must be non-empty strings, got {s!r}")
        check_int("Boundary.min_tokens", self.min_tokens, 1)

    @property
    def empty(self) -> bool:
        return not (self.strings or self.sentence or self.paragraph or self.end_of_turn
                    or self.token_ids)

    @staticmethod
    def parse(spec: Any) -> "Boundary":
        """A `Boundary` from a `SearchConfig.boundary` value: a Boundary, a preset name
        (``math``, ``sentence``, ``paragraph``, ``turn``), a literal string, or a list of those."""
        if isinstance(spec, Boundary):
            return spec
        if isinstance(spec, str):
            if spec.isidentifier():
                if spec not in PRESETS:
                    raise ValueError(
                        f"unknown boundary {spec!r}: a plain word names a preset, one of "
                        f"{sorted(PRESETS)}; to end steps at a literal word, pass "
                        f"Boundary(strings=({spec!r},))")
                return PRESETS[spec]
            return Boundary(strings=(spec,))
        if isinstance(spec, (list, tuple)) and spec:
            parts = [Boundary.parse(s) for s in spec]
            return Boundary(
                strings=tuple(s for p in parts for s in p.strings),
                sentence=any(p.sentence for p in parts),
                paragraph=any(p.paragraph for p in parts),
                end_of_turn=any(p.end_of_turn for p in parts),
                token_ids=tuple(t for p in parts for t in p.token_ids),
                min_tokens=max(p.min_tokens for p in parts),
            )
        raise ValueError(f"unknown boundary {spec!r}: expected a string, a preset name "
                         f"{sorted(PRESETS)}, a non-empty list of those, or a Boundary")

    def confirm(self, text: str, prev_text: str, num_tokens: int) -> bool:
        """Host check of a step that the device tables stopped: ``text`` is the decoded step,
        ``prev_text`` the step without its last token. Exact ids never need confirming."""
        if num_tokens < self.min_tokens:
            return False
        # An occurrence must end inside the last token (earlier ones were before min_tokens).
        if any(text.find(s, max(0, len(prev_text) - len(s) + 1)) != -1 for s in self.strings):
            return True
        if self.paragraph and _PARAGRAPH_RE.search(text):
            last_line = text.rstrip("\n").rsplit("\n", 1)[-1].strip()
            if not _LIST_MARKER_RE.fullmatch(last_line):
                return True
        if self.sentence:
            m = _SENTENCE_RE.search(text)
            if m:
                head = text[: m.start() + 1]
                last_line = head.rsplit("\n", 1)[-1].strip()
                words = head.split()
                last_word = words[-1].lstrip("\"'([{\u201c\u2018").lower() if words else ""
                if not (_LIST_MARKER_RE.fullmatch(last_line) or last_word in self.abbreviations):
                    return True
        return False

    def automata(self) -> tuple["_Automaton", ...]:
        """The character automata of the text parts (strings, sentence, paragraph), in the
        order of the device tables' first axis."""
        automata: list[_Automaton] = []
        if self.strings:
            automata.append(_strings_automaton(self.strings))
        if self.sentence:
            automata.append(_sentence_automaton())
        if self.paragraph:
            automata.append(_paragraph_automaton())
        return tuple(automata)

    def compile(self, texts: Sequence[str], *, end_of_turn_id: int | None = None,
                device: torch.device | str = "cpu") -> "CompiledBoundary":
        """Device tables over a vocabulary whose token ``i`` decodes (mid-sequence) to ``texts[i]``
        (see `vocab_texts`). ``end_of_turn_id`` is required when ``end_of_turn`` is set."""
        vocab = len(texts)
        exact = torch.zeros(vocab, dtype=torch.bool)
        ids = list(self.token_ids)
        if self.end_of_turn:
            if end_of_turn_id is None:
                raise ValueError("boundary end_of_turn needs the chat template's end-of-turn "
                                 "token, but none was found (does the tokenizer have a chat "
                                 "template?)")
            ids.append(end_of_turn_id)
        for t in ids:
            if not 0 <= t < vocab:
                raise ValueError(f"boundary token id {t} is outside the vocabulary [0, {vocab})")
            exact[t] = True
        automata = self.automata()
        table = None
        if automata:
            n_states = max(a.n_states for a in automata)
            table = torch.zeros(len(automata), n_states, vocab, dtype=torch.int32)
            for d, a in enumerate(automata):
                table[d, : a.n_states] = torch.from_numpy(a.token_table(texts))
        return CompiledBoundary(self, exact.to(device), None if table is None else table.to(device),
                                automata)


# Preset boundaries by name; "sentence" is the paper's human-values chunker (sentence end or
# paragraph break after at least 8 tokens).
PRESETS: dict[str, Boundary] = {
    "math": Boundary(strings=("\n\n",)),
    "sentence": Boundary(sentence=True, paragraph=True, min_tokens=8),
    "paragraph": Boundary(paragraph=True, min_tokens=8),
    "turn": Boundary(end_of_turn=True),
}


@dataclass
class CompiledBoundary:
    """A `Boundary`'s device tables. ``table[d, state, token]`` = ``next_state << 1 | hit`` for
    automaton d; ``exact[token]`` marks ids that end a step without confirmation."""

    boundary: Boundary
    exact: torch.Tensor  # bool [V]
    table: torch.Tensor | None  # int32 [D, n_states, V]
    automata: tuple["_Automaton", ...] = field(default=(), repr=False)  # host side, as in table
    _dfa_index: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.table is not None:
            self._dfa_index = torch.arange(self.table.shape[0], device=self.table.device)[None, :]

    @property
    def num_automata(self) -> int:
        return 0 if self.table is None else self.table.shape[0]

    @property
    def resume_from_text(self) -> bool:
        """True when a slot the host resumes must take its automaton states from the decoded text
        (`states_after`): after a token holding an incomplete UTF-8 character the tables cannot
        know the state (they report a hit and restart), e.g. a ``"。"`` split over byte tokens
        before the ``"\\n"`` of a boundary ``"。\\n"``."""
        return any(a.wildcard_hits for a in self.automata)

    def states_after(self, text: str) -> list[int]:
        """Each automaton's state after reading a step's decoded ``text`` (host side)."""
        return [a.run(0, text)[0] for a in self.automata]

    @property
    def vocab_size(self) -> int:
        return self.exact.shape[0]

    def step(self, state: torch.Tensor, tokens: torch.Tensor, step_len: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token per row: ``state`` int64 [N, D], ``tokens`` int64 [N], ``step_len`` [N] (tokens
        in the step including this one) -> (next state, hit needing confirmation, exact hit).
        Pure tensor ops: no host sync, capturable in a CUDA graph."""
        exact = self.exact[tokens]
        if self.table is None:
            return state, torch.zeros_like(exact), exact
        codes = self.table[self._dfa_index, state, tokens[:, None]]
        hit = (codes & 1).bool().any(dim=1) & (step_len >= self.boundary.min_tokens)
        return (codes >> 1).long(), hit, exact


class _Automaton:
    """A character automaton. ``delta(state, ch)`` -> state; ``emits(state)`` says a boundary ends
    at that character. ``ends_with`` automata report a hit only when the token's text ends in an
    emitting state (the boundary is a property of the text's end, e.g. a sentence end); the others
    report a hit when any character of the token emits (e.g. a string occurs)."""

    def __init__(self, n_states: int, alphabet: str, delta: Callable[[int, str], int],
                 emits: Sequence[bool], *, ends_with: bool, wildcard_hits: bool = False):
        self.n_states = n_states
        self.alphabet = frozenset(alphabet)
        self.delta = delta
        self.emits = list(emits)
        self.ends_with = ends_with
        # A token whose text has U+FFFD (an incomplete UTF-8 sequence) may complete a non-ASCII
        # boundary: report it as a hit and let the host decide.
        self.wildcard_hits = wildcard_hits

    def run(self, state: int, text: str) -> tuple[int, bool]:
        hit = False
        for ch in text:
            state = self.delta(state, ch) if ch in self.alphabet else 0
            hit = hit or self.emits[state]
        if self.ends_with:
            hit = bool(text) and self.emits[state]
        return state, hit

    def token_table(self, texts: Sequence[str]):
        import numpy as np

        table = np.zeros((self.n_states, len(texts)), dtype=np.int32)
        for t, text in enumerate(texts):
            if not text:
                table[:, t] = np.arange(self.n_states) << 1  # state kept, no hit
                continue
            if self.wildcard_hits and "\ufffd" in text:
                table[:, t] = 1
                continue
            if self.alphabet.isdisjoint(text):
                continue  # resets to state 0, which never emits: (0, no hit), already zero
            # Only the part after the last character outside the alphabet depends on the state.
            cut = max((i + 1 for i, ch in enumerate(text) if ch not in self.alphabet), default=0)
            if cut and self.ends_with:
                nxt, hit = self.run(0, text[cut:])
                table[:, t] = (nxt << 1) | (hit and bool(text))
                continue
            for s in range(self.n_states):
                nxt, hit = self.run(s, text)
                table[s, t] = (nxt << 1) | hit
        return table


def _strings_automaton(strings: Sequence[str]) -> _Automaton:
    """Aho–Corasick over the strings: state = the longest suffix of the text that is a prefix of
    some string; emits when a whole string has just been read."""
    goto: list[dict[str, int]] = [{}]
    out = [False]
    for s in strings:
        node = 0
        for ch in s:
            if ch not in goto[node]:
                goto.append({})
                out.append(False)
                goto[node][ch] = len(goto) - 1
            node = goto[node][ch]
        out[node] = True
    fail = [0] * len(goto)
    queue = deque(goto[0].values())
    while queue:  # breadth-first, so a node's fail link is final before its children need it
        node = queue.popleft()
        for ch, child in goto[node].items():
            f = fail[node]
            while f and ch not in goto[f]:
                f = fail[f]
            fail[child] = goto[f].get(ch, 0)
            out[child] = out[child] or out[fail[child]]
            queue.append(child)
    memo: dict[tuple[int, str], int] = {}

    def delta(state: int, ch: str) -> int:
        key = (state, ch)
        if key not in memo:
            s = state
            while s and ch not in goto[s]:
                s = fail[s]
            memo[key] = goto[s].get(ch, 0)
        return memo[key]

    alphabet = "".join({ch for s in strings for ch in s})
    return _Automaton(len(goto), alphabet, delta, out, ends_with=False,
                      wildcard_hits=any(ord(ch) > 127 for ch in alphabet))


def _sentence_automaton() -> _Automaton:
    """Text ends with ``[.!?]`` + closers* + whitespace*: state 1 after the punctuation and
    closers, 2 after trailing whitespace; both emit."""
    whitespace = " \t\n\r\f\v\u00a0"

    def delta(state: int, ch: str) -> int:
        if ch in _SENTENCE_END:
            return 1
        if ch in _CLOSERS:
            return 1 if state == 1 else 0
        return 2 if state else 0  # whitespace

    return _Automaton(3, _SENTENCE_END + _CLOSERS + whitespace, delta, [False, True, True],
                      ends_with=True)


def _paragraph_automaton() -> _Automaton:
    """Text ends with two or more newlines: state = trailing newlines, capped at 2 (emits)."""
    return _Automaton(3, "\n", lambda state, ch: min(state + 1, 2), [False, False, True],
                      ends_with=True)


def vocab_texts(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text each token id adds when it follows other text (``decode([a, t])`` minus
    ``decode([a])``: SentencePiece tokenizers drop a leading space when a token is decoded alone).
    Ids past the tokenizer's vocabulary (padded embedding rows) get the empty text."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    if len(anchor) != 1:
        raise ValueError(f"cannot build the vocabulary texts: 'a' encodes to {anchor}, expected "
                         f"one token")
    n = min(len(tokenizer), vocab_size)
    opts = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    base = tokenizer.decode(anchor, **opts)
    pairs = tokenizer.batch_decode([[anchor[0], t] for t in range(n)], **opts)
    texts = [p[len(base):] if p.startswith(base) else tokenizer.decode([t], **opts)
             for t, p in enumerate(pairs)]
    return texts + [""] * (vocab_size - n)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts after an assistant turn (``<|im_end|>``,
    ``<|eot_id|>``, ``</s>``, ...), or None without a chat template or such a token."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "MAHALO_PROBE_TURN"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": probe}],
        tokenize=False)
    if probe not in text:
        return None
    after = text[text.rindex(probe) + len(probe):]
    special = set(getattr(tokenizer, "all_special_ids", []))
    special |= {i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(tok, "special", False)}
    for t in tokenizer.encode(after, add_special_tokens=False):
        if t in special:
            return t
    return None

