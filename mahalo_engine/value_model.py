"""Process reward models: a decoder backbone plus a small value head read at a token's hidden state.

On disk (docs/design.md) a PRM is a Hugging Face backbone directory plus ``value_head.safetensors``:
tensors ``0.weight``/``0.bias`` (linear head) or ``0.weight``/``0.bias``/``2.weight``/``2.bias``
(2-layer MLP ``Linear -> ReLU -> Linear``, the paper's value head layout), with metadata
``format=mahalo-value-head-v1``, ``kind`` (value | binary | bt), ``arch`` (linear | mlp),
``hidden_size`` and, for mlp, ``mlp_hidden``. A multi-objective PRM (one backbone, one output per
objective: the "unified PRM") adds ``objectives=acc,style,...`` and its last layer has one output row
per objective. Loading is strict: the metadata fixes every expected tensor and shape, and any
mismatch is an error naming it.

A score is read at the last token of a sequence (for a step, its last token): ``kind=value`` ->
the regressed value, ``binary`` -> P(good) = sigmoid(raw), ``bt`` -> the raw Bradley–Terry reward.
The head runs in float32 whatever the backbone's dtype. A multi-objective PRM's score is a weighted
sum of its per-objective scores (``objective_weights``: uniform by default, one objective by name, or
``{name: weight}``), chosen per call or per scorer, so one backbone serves every weighting.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
from torch import nn

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.from_hf import as_decoder
from mahalo_engine.utils.padding import pad_right
from mahalo_engine.utils.safetensors_io import open_safetensors
from mahalo_engine.models.loader import check_tensor_shapes, load_decoder, save_checkpoint
from triton_kernels.argcheck import is_real

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_FORMAT = "mahalo-value-head-v1"
KINDS = ("value", "binary", "bt")
ARCHS = ("linear", "mlp")
# How a multi-objective PRM's outputs are combined into one score: None (uniform mean), an
# objective's name, {name: weight}, or one weight per objective in order.
ObjectiveWeights = Union[None, str, Mapping[str, float], Sequence[float]]


class ValueHead(nn.Sequential):
    """``hidden [..., d] -> raw score [...]``: ``Linear(d, 1)`` or ``Linear(d, m) -> ReLU ->
    Linear(m, 1)`` (m defaults to d, as in the paper's value model). With ``objectives`` (names,
    one output each) the last layer has ``len(objectives)`` outputs and the raw score is
    ``[..., len(objectives)]``."""

    def __init__(self, hidden_size: int, arch: str = "mlp", mlp_hidden: int | None = None,
                 objectives: Sequence[str] | None = None) -> None:
        if objectives is not None:
            objectives = list(objectives)
            bad = [o for o in objectives if not isinstance(o, str) or not o or "," in o]
            if not objectives or bad or len(set(objectives)) != len(objectives):
                raise ValueError(f"objectives must be distinct non-empty names without commas, "
                                 f"got {objectives!r}")
        outputs = 1 if objectives is None else len(objectives)
        if arch not in ARCHS:
            raise ValueError(f"value head arch must be one of {ARCHS}, got {arch!r}")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if arch == "linear":
            if mlp_hidden is not None:
                raise ValueError("mlp_hidden applies to arch='mlp' only")
            super().__init__(nn.Linear(hidden_size, outputs))
        else:
            mlp_hidden = hidden_size if mlp_hidden is None else mlp_hidden
            if mlp_hidden <= 0:
                raise ValueError(f"mlp_hidden must be positive, got {mlp_hidden}")
            super().__init__(nn.Linear(hidden_size, mlp_hidden), nn.ReLU(),
                             nn.Linear(mlp_hidden, outputs))
        self.arch = arch
        self.hidden_size = hidden_size
        self.mlp_hidden = mlp_hidden
        self.objectives = objectives

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = super().forward(hidden)
        return out.squeeze(-1) if self.objectives is None else out

    def metadata(self, kind: str) -> dict[str, str]:
        if kind not in KINDS:
            raise ValueError(f"PRM kind must be one of {KINDS}, got {kind!r}")
        meta = {"format": VALUE_HEAD_FORMAT, "kind": kind, "arch": self.arch,
                "hidden_size": str(self.hidden_size)}
        if self.arch == "mlp":
            meta["mlp_hidden"] = str(self.mlp_hidden)
        if self.objectives is not None:
            meta["objectives"] = ",".join(self.objectives)
        return meta


def objective_weights(objectives: Sequence[str] | None, spec: ObjectiveWeights) -> torch.Tensor | None:
    """float32 ``[O]`` weights over a multi-objective head's outputs (None for a single-output
    head, which takes no weights): ``spec`` None -> uniform ``1/O``; a name -> that objective
    alone; ``{name: weight}`` -> those weights (unnamed objectives 0); a sequence -> one weight per
    objective, in order. Weights are used as given (not renormalised)."""
    if objectives is None:
        if spec is not None:
            raise ValueError(f"objective weights {spec!r} given for a single-output PRM (its "
                             f"value_head.safetensors lists no objectives)")
        return None
    n = len(objectives)
    if spec is None:
        return torch.full((n,), 1.0 / n)
    if isinstance(spec, str):
        if spec not in objectives:
            raise ValueError(f"unknown PRM objective {spec!r}; this PRM has {list(objectives)}")
        return torch.tensor([float(o == spec) for o in objectives])
    if isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(objectives))
        if unknown:
            raise ValueError(f"unknown PRM objective(s) {unknown}; this PRM has {list(objectives)}")
        values = [spec.get(o, 0.0) for o in objectives]
    else:
        values = list(spec)
        if len(values) != n:
            raise ValueError(f"{len(values)} objective weights for a PRM with {n} objectives "
                             f"{list(objectives)}")
    if not all(is_real(v) and math.isfinite(v) for v in values):
        raise ValueError(f"objective weights must be finite numbers, got {spec!r}")
    if all(v == 0 for v in values):
        raise ValueError(f"objective weights {spec!r} are all zero")
    return torch.tensor([float(v) for v in values])


def combine_objectives(scores: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``[..., O] -> [...]`` weighted sum (identity for a single-output head: ``weights`` None)."""
    if weights is None:
        return scores
    return scores @ weights.to(device=scores.device, dtype=scores.dtype)


def apply_kind(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """A PRM's score from its head's raw output: sigmoid for ``binary``, identity otherwise."""
    if kind == "binary":
        return torch.sigmoid(raw)
    if kind in ("value", "bt"):
        return raw
    raise ValueError(f"PRM kind must be one of {KINDS}, got {kind!r}")


def save_value_head(path: str | Path, value_head: ValueHead, kind: str) -> None:
    from safetensors.torch import save_file

    meta = value_head.metadata(kind)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in value_head.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)


def _meta_int(meta: dict[str, str], key: str, path: Path) -> int:
    try:
        v = int(meta[key])
    except KeyError:
        raise ValueError(f"{path}: metadata has no {key!r}") from None
    except ValueError:
        raise ValueError(f"{path}: metadata {key}={meta[key]!r} is not an integer") from None
    if v <= 0:
        raise ValueError(f"{path}: metadata {key}={v} must be positive")
    return v


def load_value_head(path: str | Path) -> tuple[ValueHead, str]:
    """``(value_head (float32, CPU), kind)`` from a ``value_head.safetensors``, strictly."""

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no value head file at {path}")
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != VALUE_HEAD_FORMAT:
        raise ValueError(f"{path}: metadata format={meta.get('format')!r}, expected "
                         f"{VALUE_HEAD_FORMAT!r}")
    kind, arch = meta.get("kind"), meta.get("arch")
    if kind not in KINDS:
        raise ValueError(f"{path}: metadata kind={kind!r}, expected one of {KINDS}")
    if arch not in ARCHS:
        raise ValueError(f"{path}: metadata arch={arch!r}, expected one of {ARCHS}")
    d = _meta_int(meta, "hidden_size", path)
    objectives = meta["objectives"].split(",") if "objectives" in meta else None
    try:
        head = ValueHead(d, arch, _meta_int(meta, "mlp_hidden", path) if arch == "mlp" else None,
                         objectives)
    except ValueError as e:
        raise ValueError(f"{path}: metadata objectives={meta.get('objectives')!r}: {e}") from None
    check_tensor_shapes(f"{path} (a {arch} value head)", {k: v.shape for k, v in tensors.items()},
                        {k: v.shape for k, v in head.state_dict().items()})
    head.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return head, kind


class ValueModel(nn.Module):
    """A PRM: ``.model`` (Decoder backbone), ``.value_head``, ``.kind``, ``.tokenizer``, ``.config``,
    ``.objectives`` (None for a single-output PRM, else one name per output). ``model`` may be a
    transformers ``*ForCausalLM``: its parameters are shared (`as_decoder`)."""

    def __init__(self, model: nn.Module, value_head: ValueHead, kind: str, tokenizer=None,
                 path: Path | None = None) -> None:
        super().__init__()
        model = as_decoder(model)
        if kind not in KINDS:
            raise ValueError(f"PRM kind must be one of {KINDS}, got {kind!r}")
        if value_head.hidden_size != model.config.hidden_size:
            raise ValueError(f"value head expects hidden size {value_head.hidden_size}, the backbone "
                             f"has {model.config.hidden_size}")
        self.model = model
        self.value_head = value_head
        self.kind = kind
        self.tokenizer = tokenizer
        self.config: ModelConfig = model.config
        self.path = path

    @property
    def objectives(self) -> list[str] | None:
        return self.value_head.objectives

    def raw_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[...]`` (``[..., O]`` for a multi-objective PRM; float32) for
        hidden states ``[..., d]`` (the trainers' loss input: regression output, BCE logit or BT
        reward)."""
        param = self.value_head[0].weight
        return self.value_head(hidden.to(device=param.device, dtype=param.dtype))

    def scores_from_hidden(self, hidden: torch.Tensor, objectives: ObjectiveWeights = None
                           ) -> torch.Tensor:
        """Scores ``[...]`` (float32) for hidden states ``[..., d]``: head plus the kind's transform;
        a multi-objective PRM's per-objective scores are combined by ``objectives``
        (`objective_weights`: default the uniform mean)."""
        weights = objective_weights(self.objectives, objectives)
        return combine_objectives(apply_kind(self.raw_scores(hidden), self.kind), weights)

    @torch.no_grad()
    def score_full(self, token_ids: list[list[int]], *, batch_size: int = 16,
                   objectives: ObjectiveWeights = None) -> torch.Tensor:
        """Score each whole sequence at its last token, re-encoding it from scratch (the reference
        path). Returns float32 ``[N]`` on the model's device (``objectives`` as in
        `scores_from_hidden`)."""
        if not token_ids or any(len(s) == 0 for s in token_ids):
            raise ValueError("score_full needs at least one sequence and no empty sequence")
        device = self.model.device
        out = []
        for i in range(0, len(token_ids), batch_size):
            chunk = token_ids[i:i + batch_size]
            ids, lens = pad_right(chunk)
            ids, lens = ids.to(device), lens.to(device)
            mask = torch.arange(ids.shape[1], device=device)[None, :] < lens[:, None]
            hidden = self.model(ids, mask.long())
            last = hidden[torch.arange(len(chunk), device=device), lens - 1]
            out.append(self.scores_from_hidden(last, objectives))
        return torch.cat(out)


def load_prm(path: str | Path, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> ValueModel:
    """Load a PRM directory: backbone (strict, ``dtype``/``device`` as ``load_decoder``) plus its
    value head (float32, same device)."""
    from transformers import AutoTokenizer

    root = Path(path)
    head, kind = load_value_head(root / VALUE_HEAD_FILE)
    model = load_decoder(root, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(root)
    return ValueModel(model, head.to(model.device), kind, tokenizer,
                      root).eval()


def save_prm(out_dir: str | Path, model: nn.Module, value_head: ValueHead, kind: str,
             tokenizer=None) -> Path:
    """Write a PRM directory: the backbone as a Hugging Face directory plus ``value_head.safetensors``."""
    out = Path(out_dir)
    value_head.metadata(kind)  # validate kind before writing anything
    if value_head.hidden_size != model.config.hidden_size:
        raise ValueError(f"value head expects hidden size {value_head.hidden_size}, the backbone "
                         f"has {model.config.hidden_size}")
    save_checkpoint(out, model, tokenizer)
    save_value_head(out / VALUE_HEAD_FILE, value_head, kind)
    return out
