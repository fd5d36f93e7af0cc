"""The tokenisation contract: how text becomes tokens, for training and for inference alike.

Every place that turns a prompt, a step or a response into token ids calls this module: the
engine (`Engine` prompts), its scorers (a PRM with its own tokenizer re-tokenising steps), the
trainers (``training.encode``) and the label builders (``training.labels``). So a PRM is trained
on exactly the ids the engine feeds it, and a policy on the ids it is prompted with.

The rules:

- **Prompt** (`encode_prompt`, `tokenize_prompt`): a chat message list always goes through the
  tokenizer's chat template with the generation prompt; a string does too when ``chat_template``
  (as one user turn). Rendered text is tokenised *without* the tokenizer's special tokens (the
  template writes its own BOS, if any, so it is never doubled); a plain string is tokenised
  *with* them (e.g. Llama's BOS).
- **Step** (`encode_step`): a step's text on its own, without special tokens; with a
  ``separator`` (the PRM trainer's ``--step-separator``) appended unless the step already ends
  with it. A response split into steps is the concatenation of its steps' ids: each step is
  tokenised separately, as the engine appends steps.
- **Response** (`encode_response`): a whole response is one step followed by EOS (the trainers'
  completions; the EOS carries loss). The engine never re-tokenises the policy's own samples (a
  step is the ids it sampled); only a PRM with another vocabulary gets step texts re-tokenised.
- **Steps of a text** (`split_steps`): where a `Boundary` (a preset, literal strings, …) ends
  steps in a text, by the engine's own rules (`Boundary.confirm` after its automata), every piece
  keeping its boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Messages = list[dict[str, str]]


@dataclass
class Prompt:
    """A prompt as the engine holds it: token ids, the text they came from (the user's string,
    the rendered chat template, or the decoded ids) and the chat messages when it was a
    conversation."""

    ids: list[int]
    text: str
    messages: Messages | None = None


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(encoding: Any) -> list[int]:
    ids = encoding if isinstance(encoding, list) else encoding["input_ids"]
    return [int(t) for t in ids]


def tokenize_prompt(tokenizer: Any, prompt: str | Messages,
                    chat_template: bool = False) -> Prompt:
    """``prompt`` (a string or a chat message list) by the module's prompt rule, as a `Prompt`."""
    if isinstance(prompt, str) and not chat_template:
        return Prompt(_ids(tokenizer(prompt)), prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not has_chat_template(tokenizer):
        raise ValueError("a chat prompt needs the tokenizer's chat template, but the tokenizer "
                         "has none; use string prompts without the chat template")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return Prompt(_ids(tokenizer(text, add_special_tokens=False)), text, messages)


def encode_prompt(tokenizer: Any, prompt: str | Messages, chat_template: bool = False) -> list[int]:
    """Prompt ids by the module's rule (`tokenize_prompt` without the text)."""
    return tokenize_prompt(tokenizer, prompt, chat_template).ids


def encode_step(tokenizer: Any, text: str, separator: str = "") -> list[int]:
    """One step's ids: ``text`` (plus ``separator`` unless it already ends with it) tokenised on
    its own, without special tokens."""
    if separator and not text.endswith(separator):
        text += separator
    return _ids(tokenizer(text, add_special_tokens=False))


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; responses need one appended")
    return int(tokenizer.eos_token_id)


def encode_response(tokenizer: Any, text: str) -> list[int]:
    """A whole response's ids: the text as one step, then EOS."""
    return encode_step(tokenizer, text) + [eos_id(tokenizer)]


def split_steps(text: str, boundary: Any, tokenizer: Any = None) -> list[str]:
    """``text`` cut into steps where ``boundary`` ends one, each piece keeping its boundary
    (``"".join(split_steps(t, b)) == t``).

    ``boundary`` is anything `SearchConfig.boundary` takes: a preset name (``math``,
    ``sentence``, ``paragraph``, ``turn``), a literal string (``"\\n\\n"``), a list of those, or a
    `Boundary`. A step ends where the engine would end it: at the unit completing a boundary
    string, a sentence end or a paragraph break (confirmed by `Boundary.confirm`: abbreviations
    and bare list markers do not end a step), once the step has ``min_tokens`` units. The units
    are the tokens of ``tokenizer`` (a step then ends with the whole token completing the
    boundary, as in the engine), or characters without one; a boundary with ``min_tokens > 1``
    (the ``sentence`` and ``paragraph`` presets) counts tokens, so it needs the tokenizer. The
    end of turn never occurs inside a text (the engine's texts drop special tokens): ``turn``
    leaves the text one step. Explicit token ids need the engine's token stream: ValueError.
    """
    # Imported here: Boundary brings in torch and Triton; the text rules need neither.
    from mahalo_engine.boundary import Boundary

    spec = Boundary.parse(boundary)
    if spec.token_ids:
        raise ValueError(f"boundary token ids {list(spec.token_ids)} cannot split a text (the "
                         f"engine ends steps on sampled ids); use boundary strings or presets")
    if tokenizer is None and spec.min_tokens > 1:
        raise ValueError(f"boundary {boundary!r} ends steps only after min_tokens="
                         f"{spec.min_tokens} tokens: pass the tokenizer to count them")
    automata = spec.automata()
    if not automata:
        return [text] if text else []
    states = [0] * len(automata)
    pieces, start, prev, count = [], 0, 0, 0
    for end, n in _units(text, tokenizer):
        count += n
        hit = False
        for d, a in enumerate(automata):  # the engine's device tables, run on the host
            states[d], h = a.run(states[d], text[prev:end])
            hit = hit or h
        if hit and count >= spec.min_tokens and spec.confirm(text[start:end], text[start:prev],
                                                             count):
            pieces.append(text[start:end])
            start, count, states = end, 0, [0] * len(automata)
        prev = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _units(text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """``(end offset, tokens)`` of each unit of ``text``: its characters, or its tokens. A token
    whose decoded text does not end on a character of ``text`` (part of a multi-byte character)
    joins the next unit, so every unit is whole text."""
    if tokenizer is None:
        return [(i + 1, 1) for i in range(len(text))]
    ids = encode_step(tokenizer, text)
    # Decoded after an anchor token: SentencePiece drops a word's leading space at the start.
    anchor = _ids(tokenizer("a", add_special_tokens=False))
    opts = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    base = tokenizer.decode(anchor, **opts)
    prefixes = tokenizer.batch_decode([anchor + ids[:i + 1] for i in range(len(ids))], **opts)
    units, end, pending = [], 0, 0
    for p in prefixes:
        pending += 1
        p = p[len(base):] if p.startswith(base) else None
        if p is not None and len(p) > end and text.startswith(p) and not p.endswith("\ufffd"):
            units.append((len(p), pending))
            end, pending = len(p), 0
    if end < len(text) or pending:
        units.append((len(text), pending))
    return units
