"""Training data readers: jsonl files as checked example records.

Every row is checked; a bad one raises ``DataError`` (a ``ValueError``) naming ``file:line`` and the
offending field. Formats (docs/design.md): preference ``{"prompt","chosen","rejected"[,"objective"]}``
(TRL; prompt may also be a chat message list), SFT ``{"prompt","completion"}``, step data
``{"prompt","completions","labels"}``, BT step pairs ``{"prompt","chosen":[steps],"rejected":[steps]}``,
rollouts ``{"prompt","steps","step_rewards","final_reward"[,"prefix_len"]}``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from triton_kernels.argcheck import is_int

T = TypeVar("T")


class DataError(ValueError):
    """Malformed training data; the message names the file and line."""


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
        if not is_int(prefix_len) or not 0 <= prefix_len <= len(steps):
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
