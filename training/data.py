"""Training data: jsonl readers, tokenisation, the truncation rule, collation and balanced batching.

Readers check every row and raise ``DataError`` (a ``ValueError``) naming ``file:line`` and the
offending field. Formats (docs/design.md): preference ``{"prompt","chosen","rejected"[,"objective"]}``
(TRL; prompt may also be a chat message list), SFT ``{"prompt","completion"}``, step data
``{"prompt","completions","labels"}``, BT step pairs ``{"prompt","chosen":[steps],"rejected":[steps]}``,
rollouts ``{"prompt","steps","step_rewards","final_reward"[,"prefix_len"]}``.

Tokenisation: the prompt is tokenised on its own (with the tokenizer's special tokens, or through
its chat template), each response on its own without special tokens plus EOS. This matches how
the engine sees a generation: prompt ids, then sampled ids.

Truncation rule (prompt side first), for ``max_length`` L and ``max_prompt_length`` P < L: when
prompt + longest response exceeds L, the prompt is cut down to ``max(L - longest response, P)``
tokens; if that is still too long, the responses keep their first ``L - prompt`` tokens (losing
EOS). Which part of the prompt stays is ``keep``: ``"start"`` (the default, the paper's
``keep_start``: a BOS, system prompt and chat header survive; the tokens nearest the response,
e.g. the assistant header of a long dialogue, are lost) or ``"end"`` (the tokens next to the
response survive; the oldest go, header included). Trainers count and log both cases.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

IGNORE = -100  # label value of positions that carry no loss
T = TypeVar("T")


class DataError(ValueError):
    """Malformed training data; the message names the file and line."""


# ----------------------------------------------------------------------------------------- reading

def iter_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``("file:line", object)`` for each non-blank line; a bad line is a ``DataError``."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def _field(where: str, obj: dict, key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in obj:
        raise DataError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(f"{where}: field {key!r} must be {names}, got {type(v).__name__}")
    return v


def _messages(where: str, key: str, v: list) -> list[dict[str, str]]:
    for i, m in enumerate(v):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: {key}[{i}] must be a {{'role': str, 'content': str}} message")
    return v


def _prompt(where: str, obj: dict) -> str | list[dict[str, str]]:
    v = _field(where, obj, "prompt", (str, list))
    return _messages(where, "prompt", v) if isinstance(v, list) else v


def _response(where: str, obj: dict, key: str) -> str:
    """A response string; the TRL conversational form (one assistant message) is accepted."""
    v = _field(where, obj, key, (str, list))
    if isinstance(v, list):
        msgs = _messages(where, key, v)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise DataError(f"{where}: conversational {key!r} must be one assistant message")
        v = msgs[0]["content"]
    if not v:
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _finite(where: str, key: str, v: Any) -> float:
    if isinstance(v, bool):
        v = float(v)
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(f"{where}: {key} must be a finite number, got {v!r}")
    return float(v)


def _read_rows(path: str | Path, parse: Callable[[str, dict[str, Any]], T]) -> list[T]:
    """``parse(where, obj)`` for every row of a jsonl file; a file without rows is a ``DataError``."""
    rows = [parse(where, obj) for where, obj in iter_jsonl(path)]
    if not rows:
        raise DataError(f"{path}: no examples (empty file)")
    return rows


def _steps(where: str, obj: dict, key: str) -> list[str]:
    v = _field(where, obj, key, (str, list))
    steps = [v] if isinstance(v, str) else v
    if not steps:
        raise DataError(f"{where}: field {key!r} has no steps")
    for i, s in enumerate(steps):
        if not isinstance(s, str) or not s:
            raise DataError(f"{where}: {key}[{i}] must be a non-empty string")
    return list(steps)


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | list[dict[str, str]]
    chosen: str
    rejected: str
    objective: str
    source: str  # file:line


@dataclass
class PreferenceData:
    objectives: list[str]  # head order
    pairs: list[PreferencePair]

    def by_objective(self) -> list[list[PreferencePair]]:
        out: list[list[PreferencePair]] = [[] for _ in self.objectives]
        index = {o: i for i, o in enumerate(self.objectives)}
        for p in self.pairs:
            out[index[p.objective]].append(p)
        return out


def parse_data_spec(spec: str) -> tuple[str | None, Path]:
    """``"acc=path.jsonl"`` -> ``("acc", path)``; ``"path.jsonl"`` -> ``(None, path)`` (rows carry an
    ``objective`` field)."""
    name, sep, path = spec.partition("=")
    if not sep:
        return None, Path(spec)
    if not name or not path:
        raise ValueError(f"--data expects OBJECTIVE=FILE or FILE, got {spec!r}")
    return name, Path(path)


def read_preferences(specs: Sequence[tuple[str | None, Path]], *, objectives: Sequence[str] | None = None,
                     default_objective: str | None = None) -> PreferenceData:
    """Read preference files. A file named with an objective gives all its rows that objective;
    otherwise each row needs an ``objective`` field (or ``default_objective`` applies). Head order is
    ``objectives`` when given, else the order of first appearance. An empty file, an objective
    without rows, or one objective named for two files (``acc=a.jsonl acc=b.jsonl``: concatenate
    them instead, so that it is clear one head learns from both) is an error."""
    named: dict[str, Path] = {}
    for name, path in specs:
        if name is None:
            continue
        if name in named:
            raise DataError(f"objective {name!r} is named twice (--data {name}={named[name]} and "
                            f"--data {name}={path}); each objective trains its own head, so give "
                            f"it one file (concatenate them) or use distinct names")
        named[name] = path
    def parse(name: str | None, path: Path, where: str, obj: dict[str, Any]) -> PreferencePair:
        if name is not None:
            objective = name
        elif "objective" in obj:
            objective = _field(where, obj, "objective", str)
        elif default_objective is not None:
            objective = default_objective
        else:
            raise DataError(f"{where}: missing field 'objective' (or name the file's objective: "
                            f"--data NAME={path})")
        if not objective or "," in objective:
            raise DataError(f"{where}: objective name {objective!r} must be non-empty, no commas")
        return PreferencePair(_prompt(where, obj), _response(where, obj, "chosen"),
                              _response(where, obj, "rejected"), objective, where)

    pairs = [pair for name, path in specs
             for pair in _read_rows(path, lambda w, o, name=name, path=path: parse(name, path, w, o))]
    order = list(dict.fromkeys(p.objective for p in pairs))  # order of first appearance
    if objectives is not None:
        unknown = sorted(set(order) - set(objectives))
        if unknown:
            raise DataError(f"objectives {unknown} appear in the data but not in {list(objectives)}")
        order = list(objectives)
    counts = {o: 0 for o in order}
    for p in pairs:
        counts[p.objective] += 1
    empty = [o for o, c in counts.items() if c == 0]
    if empty:
        raise DataError(f"objective(s) {empty} have no examples")
    return PreferenceData(order, pairs)


@dataclass(frozen=True)
class SFTExample:
    prompt: str | list[dict[str, str]]
    completion: str
    source: str


def read_sft(path: str | Path) -> list[SFTExample]:
    return _read_rows(path, lambda w, o: SFTExample(_prompt(w, o), _response(w, o, "completion"), w))


@dataclass(frozen=True)
class StepExample:
    prompt: str | list[dict[str, str]]
    steps: list[str]
    labels: list[float]
    source: str


def read_steps(path: str | Path, *, num_objectives: int | None = None) -> list[StepExample]:
    """Step data with float labels (value targets or 0/1 / soft judge labels), one per step. With
    ``num_objectives`` (a multi-objective PRM) each step's label is a list of that many floats, one
    per objective (``"labels": [[v_acc, v_style], ...]``)."""
    def label(w: str, i: int, v: Any) -> Any:
        if num_objectives is None:
            return _finite(w, f"labels[{i}]", v)
        if not isinstance(v, list) or len(v) != num_objectives:
            raise DataError(f"{w}: labels[{i}] must be a list of {num_objectives} floats (one per "
                            f"objective), got {v!r}")
        return [_finite(w, f"labels[{i}][{j}]", x) for j, x in enumerate(v)]

    def parse(w: str, o: dict[str, Any]) -> StepExample:
        steps = _steps(w, o, "completions")
        labels = _field(w, o, "labels", list)
        if len(labels) != len(steps):
            raise DataError(f"{w}: {len(labels)} labels for {len(steps)} completions")
        return StepExample(_prompt(w, o), steps, [label(w, i, v) for i, v in enumerate(labels)], w)

    return _read_rows(path, parse)


@dataclass(frozen=True)
class StepPair:
    prompt: str | list[dict[str, str]]
    chosen: list[str]
    rejected: list[str]
    source: str


def read_step_pairs(path: str | Path) -> list[StepPair]:
    """Bradley–Terry pairs of (partial) responses, each a list of steps or one string."""
    return _read_rows(path, lambda w, o: StepPair(_prompt(w, o), _steps(w, o, "chosen"),
                                                  _steps(w, o, "rejected"), w))


def read_rollouts(path: str | Path) -> list[dict[str, Any]]:
    def parse(w: str, o: dict[str, Any]) -> dict[str, Any]:
        prompt = _field(w, o, "prompt", str)
        steps = _steps(w, o, "steps")
        rewards = _field(w, o, "step_rewards", list)
        if len(rewards) != len(steps):
            raise DataError(f"{w}: {len(rewards)} step_rewards for {len(steps)} steps")
        prefix_len = o.get("prefix_len", 0)
        if not isinstance(prefix_len, int) or isinstance(prefix_len, bool) or not (
                0 <= prefix_len <= len(steps)):
            raise DataError(f"{w}: prefix_len must be an int in [0, {len(steps)}], got {prefix_len!r}")
        return {"prompt": prompt, "steps": steps,
                "step_rewards": [_finite(w, f"step_rewards[{i}]", v) for i, v in enumerate(rewards)],
                "final_reward": _finite(w, "final_reward", o.get("final_reward")),
                "prefix_len": prefix_len}

    return _read_rows(path, parse)


def read_trajectories(path: str | Path) -> list[dict[str, Any]]:
    """``{"prompt": str, "steps": [str, ...]}`` rows (input of the judge / rollout label builders)."""
    return _read_rows(path, lambda w, o: {"prompt": _field(w, o, "prompt", str),
                                          "steps": _steps(w, o, "steps")})


def paper_pairs_to_trl(src: str | Path) -> list[dict[str, str]]:
    """The paper's per-objective JSON array ``[{"question","chosen","rejected",...}]`` as TRL
    preference rows ``{"prompt","chosen","rejected"}`` (extra fields such as metadata dropped)."""
    p = Path(src)
    try:
        rows = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{p}: expected a JSON array of pairs, got {type(rows).__name__}")
    out = []
    for i, r in enumerate(rows):
        where = f"{p}[{i}]"
        if not isinstance(r, dict):
            raise DataError(f"{where}: expected an object")
        out.append({"prompt": _field(where, r, "question", str),
                    "chosen": _response(where, r, "chosen"),
                    "rejected": _response(where, r, "rejected")})
    return out


# ------------------------------------------------------------------------------------ tokenisation

def _ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"] if not isinstance(encoding, list) else encoding
    return [int(t) for t in ids]


def encode_prompt(tokenizer, prompt: str | list[dict[str, str]], chat_template: bool) -> list[int]:
    """Prompt ids: a message list always goes through the chat template (with the generation
    prompt); a string does when ``chat_template`` (as one user turn), else it is tokenised with the
    tokenizer's own special tokens (e.g. Llama's BOS)."""
    if isinstance(prompt, list) or chat_template:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; drop --chat-template or use "
                             "string prompts")
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return _ids(tokenizer(text, add_special_tokens=False))
    return _ids(tokenizer(prompt))


def _prompt_ids(tokenizer, prompt: str | list[dict[str, str]], chat_template: bool,
                source: str) -> list[int]:
    ids = encode_prompt(tokenizer, prompt, chat_template)
    if not ids:  # the first response token needs a position to be predicted from
        raise DataError(f"{source}: the prompt tokenises to nothing; it needs at least one token")
    return ids


def eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; responses need one appended")
    return int(tokenizer.eos_token_id)


def encode_response(tokenizer, text: str) -> list[int]:
    """Response ids: the text without special tokens, then EOS (counted in the log-prob)."""
    return _ids(tokenizer(text, add_special_tokens=False)) + [eos_id(tokenizer)]


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


def _step_ids(tokenizer, steps: Sequence[str], separator: str) -> list[list[int]]:
    """Each step tokenised on its own, with ``separator`` appended unless it already ends with it
    (steps cut by ``training.labels.split_steps`` or the engine keep their boundary)."""
    return [_ids(tokenizer(s if not separator or s.endswith(separator) else s + separator,
                           add_special_tokens=False)) for s in steps]


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
        steps = _step_ids(tokenizer, e.steps, step_separator)
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
        sides = [[t for s in _step_ids(tokenizer, side, step_separator) for t in s]
                 for side in (p.chosen, p.rejected)]
        prompt, (c, r), pc, rc = truncate(_prompt_ids(tokenizer, p.prompt, chat_template, p.source), sides,
                                          max_length, max_prompt_length, keep_prompt)
        if not c or not r:
            raise DataError(f"{p.source}: a side tokenises to nothing")
        stats.add(pc, rc)
        out.append((prompt + c, prompt + r))
    return out, stats


# -------------------------------------------------------------------------------------- collation

@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, T] right-padded
    attention_mask: torch.Tensor  # [N, T] 1 on real tokens
    labels: torch.Tensor  # [N, T] token id where the token carries loss, else IGNORE
    head_ids: torch.Tensor  # [N] objective head of each row

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in
                       (self.input_ids, self.attention_mask, self.labels, self.head_ids)))


def collate(sequences: Sequence[tuple[list[int], list[int]]], head_ids: Sequence[int],
            pad_id: int) -> Batch:
    """Right-pad ``(prompt ids, response ids)`` rows; labels cover the response tokens only."""
    t = max(len(p) + len(r) for p, r in sequences)
    n = len(sequences)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    labels = torch.full((n, t), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, (p, r) in enumerate(sequences):
        row = torch.tensor(p + r, dtype=torch.long)
        input_ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
        labels[i, len(p):len(row)] = row[len(p):]
    return Batch(input_ids, mask, labels, torch.tensor(list(head_ids), dtype=torch.long))


def collate_pairs(items: Sequence[TokenizedPair], pad_id: int) -> Batch:
    """One batch for one forward: the n chosen rows, then the n rejected rows, each on its head."""
    seqs = [(it.prompt, it.chosen) for it in items] + [(it.prompt, it.rejected) for it in items]
    heads = [it.objective for it in items] * 2
    return collate(seqs, heads, pad_id)


def pad_id_of(tokenizer, config_pad: int | None = None) -> int:
    """Padding id (its value never matters: padded positions are masked and carry no loss)."""
    for v in (tokenizer.pad_token_id, config_pad, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


# ----------------------------------------------------------------------------- balanced batching

@dataclass
class BalancedBatches:
    """Global batches with ``batch_size // H`` rows of each objective, shuffled together.

    ``mode="truncate"``: each epoch uses a fresh random subset of every objective of the smallest
    objective's size (the paper). ``mode="replacement"``: every objective is drawn up to the largest
    one's size; smaller ones are re-drawn, cycling through fresh shuffles, so each example repeats
    at most ``ceil(largest / size)`` times per epoch. The batch at a step is a pure function of
    ``(seed, step)``: resuming needs only the step.
    """

    sizes: Sequence[int]
    batch_size: int
    mode: str = "truncate"
    seed: int = 0
    _epoch_cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        h = len(self.sizes)
        if h == 0 or any(n <= 0 for n in self.sizes):
            raise ValueError(f"every objective needs at least one example, got sizes {list(self.sizes)}")
        if self.mode not in ("truncate", "replacement"):
            raise ValueError(f"balance mode must be 'truncate' or 'replacement', got {self.mode!r}")
        if self.batch_size <= 0 or self.batch_size % h:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of the "
                             f"number of objectives ({h})")
        self.per_objective = self.batch_size // h
        per_epoch = min(self.sizes) if self.mode == "truncate" else max(self.sizes)
        self.steps_per_epoch = per_epoch // self.per_objective
        if self.steps_per_epoch == 0:
            raise ValueError(f"{per_epoch} examples per objective per epoch cannot fill one batch of "
                             f"{self.per_objective} per objective; lower --batch-size")

    def _gen(self, *key: int) -> torch.Generator:
        s = self.seed
        for k in key:
            s = (s * 1_000_003 + k + 1) % (2 ** 62)
        return torch.Generator().manual_seed(s)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache.clear()
            need = self.steps_per_epoch * self.per_objective
            orders = []
            for i, n in enumerate(self.sizes):
                g = self._gen(epoch, i)
                draws = [torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))]
                orders.append(torch.cat(draws)[:need].tolist())
            self._epoch_cache[epoch] = orders
        return self._epoch_cache[epoch]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """``[(objective, index within that objective), ...]`` of length ``batch_size``."""
        epoch, j = divmod(step, self.steps_per_epoch)
        orders = self._epoch(epoch)
        k = self.per_objective
        rows = [(i, orders[i][idx]) for i in range(len(self.sizes)) for idx in range(j * k, (j + 1) * k)]
        perm = torch.randperm(len(rows), generator=self._gen(epoch, len(self.sizes), j)).tolist()
        return [rows[p] for p in perm]


def shuffled_batch(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Global batch ``step`` of a fresh shuffle of ``range(n)`` per epoch (the last partial batch of
    an epoch is dropped); a pure function of its arguments, so resuming needs only the step."""
    steps_per_epoch = n // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n} examples cannot fill one batch of {batch_size}; lower --batch-size")
    epoch, j = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[j * batch_size:(j + 1) * batch_size].tolist()


def shard(rows: Sequence, rank: int, world_size: int) -> list:
    """This rank's equal share of a global batch (strided, so each rank sees mixed objectives)."""
    if len(rows) % world_size:
        raise ValueError(f"global batch of {len(rows)} rows does not split over {world_size} ranks")
    return list(rows[rank::world_size])


def micro_batches(rows: Sequence, size: int) -> list[list]:
    if size <= 0:
        raise ValueError(f"micro batch size must be positive, got {size}")
    return [list(rows[i:i + size]) for i in range(0, len(rows), size)]


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    from mahalo_engine.utils.cli import run_cli

    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    from mahalo_engine.utils.cli import HelpFormatter, add_debug_flag

    p = argparse.ArgumentParser(
        prog="python -m training.data", formatter_class=HelpFormatter,
        description="Data utilities: convert the paper's preference JSON arrays to TRL jsonl, or "
        "check a training file (rows, token lengths, truncation under --max-length).")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert-pairs", formatter_class=HelpFormatter, help='paper JSON array [{"question","chosen","rejected"}] '
                       '-> TRL jsonl {"prompt","chosen","rejected"[,"objective"]}')
    c.add_argument("src", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--objective", default=None, help="add this objective field to every row")
    c.add_argument("--limit", type=int, default=None, help="keep the first N rows (default: all)")
    add_debug_flag(c)
    s = sub.add_parser("check", formatter_class=HelpFormatter,
                       help="validate a preference file and report token lengths")
    s.add_argument("--model", type=Path, required=True, help="directory with the tokenizer")
    s.add_argument("--data", action="append", required=True, help="OBJECTIVE=FILE or FILE")
    s.add_argument("--max-length", type=int, default=1024, help="max tokens per sequence")
    s.add_argument("--max-prompt-length", type=int, default=None,
                   help="default: max-length // 2 (as the trainers)")
    s.add_argument("--truncate", choices=TRUNCATE_KEEP, default="start",
                   help="which part of an over-long prompt is kept (as the trainers)")
    s.add_argument("--chat-template", action="store_true",
                   help="wrap string prompts in the tokenizer's chat template")
    add_debug_flag(s)
    args = p.parse_args(argv)
    if args.cmd == "convert-pairs":
        from training.checkpoint import atomic_write_text

        rows = paper_pairs_to_trl(args.src)[:args.limit]
        if args.objective is not None:
            rows = [{**r, "objective": args.objective} for r in rows]
        atomic_write_text(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {args.out}")
        return 0
    from transformers import AutoTokenizer

    data = read_preferences([parse_data_spec(s) for s in args.data])
    tok = AutoTokenizer.from_pretrained(args.model)
    items, stats = tokenize_pairs(tok, data, max_length=args.max_length,
                                  max_prompt_length=(args.max_length // 2 if args.max_prompt_length
                                                     is None else args.max_prompt_length),
                                  chat_template=args.chat_template, keep_prompt=args.truncate)
    for i, name in enumerate(data.objectives):
        lens = sorted(it.length for it in items if it.objective == i)
        print(f"{name}: {len(lens)} pairs, tokens median {lens[len(lens) // 2]}, max {lens[-1]}")
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
