"""Process reward models: a decoder backbone plus a small value head read at a token's hidden state.

On disk (docs/design.md) a PRM is a Hugging Face backbone directory plus ``value_head.safetensors``:
tensors ``0.weight``/``0.bias`` (linear head) or ``0.weight``/``0.bias``/``2.weight``/``2.bias``
(2-layer MLP ``Linear -> ReLU -> Linear``, the paper's value head layout), with metadata
``format=mahalo-value-head-v1``, ``kind`` (value | binary | bt), ``arch`` (linear | mlp),
``hidden_size`` and, for mlp, ``mlp_hidden``. Loading is strict: the metadata fixes every expected
tensor and shape, and any mismatch is an error naming it.

A score is read at the last token of a sequence (for a step, its last token): ``kind=value`` ->
the regressed value, ``binary`` -> P(good) = sigmoid(raw), ``bt`` -> the raw Bradley–Terry reward.
The head runs in float32 whatever the backbone's dtype.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mahalo_engine.config import ModelConfig

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_HEAD_FORMAT = "mahalo-value-head-v1"
KINDS = ("value", "binary", "bt")
ARCHS = ("linear", "mlp")


class ValueHead(nn.Sequential):
    """``hidden [..., d] -> raw score [...]``: ``Linear(d, 1)`` or ``Linear(d, m) -> ReLU ->
    Linear(m, 1)`` (m defaults to d, as in the paper's value model)."""

    def __init__(self, hidden_size: int, arch: str = "mlp", mlp_hidden: int | None = None) -> None:
        if arch not in ARCHS:
            raise ValueError(f"value head arch must be one of {ARCHS}, got {arch!r}")
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if arch == "linear":
            if mlp_hidden is not None:
                raise ValueError("mlp_hidden applies to arch='mlp' only")
            super().__init__(nn.Linear(hidden_size, 1))
        else:
            mlp_hidden = hidden_size if mlp_hidden is None else mlp_hidden
            if mlp_hidden <= 0:
                raise ValueError(f"mlp_hidden must be positive, got {mlp_hidden}")
            super().__init__(nn.Linear(hidden_size, mlp_hidden), nn.ReLU(), nn.Linear(mlp_hidden, 1))
        self.arch = arch
        self.hidden_size = hidden_size
        self.mlp_hidden = mlp_hidden

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden).squeeze(-1)

    def metadata(self, kind: str) -> dict[str, str]:
        if kind not in KINDS:
            raise ValueError(f"PRM kind must be one of {KINDS}, got {kind!r}")
        meta = {"format": VALUE_HEAD_FORMAT, "kind": kind, "arch": self.arch,
                "hidden_size": str(self.hidden_size)}
        if self.arch == "mlp":
            meta["mlp_hidden"] = str(self.mlp_hidden)
        return meta


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
    from mahalo_engine.utils.safetensors_io import open_safetensors

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
    head = ValueHead(d, arch, _meta_int(meta, "mlp_hidden", path) if arch == "mlp" else None)
    expected = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: missing tensors {missing}, unexpected tensors {unexpected} for a "
                         f"{arch} value head")
    wrong = [f"{k}: {tuple(tensors[k].shape)} on disk, expected {expected[k]}" for k in sorted(expected)
             if tuple(tensors[k].shape) != expected[k]]
    if wrong:
        raise ValueError(f"{path}: mis-shaped tensors {wrong}")
    head.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return head, kind


class ValueModel(nn.Module):
    """A PRM: ``.model`` (Decoder backbone), ``.value_head``, ``.kind``, ``.tokenizer``, ``.config``."""

    def __init__(self, model: nn.Module, value_head: ValueHead, kind: str, tokenizer=None,
                 path: Path | None = None) -> None:
        super().__init__()
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

    def raw_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's raw output ``[...]`` (float32) for hidden states ``[..., d]`` (the trainers'
        loss input: regression output, BCE logit or BT reward)."""
        param = self.value_head[0].weight
        return self.value_head(hidden.to(device=param.device, dtype=param.dtype))

    def scores_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores ``[...]`` (float32) for hidden states ``[..., d]``: head plus the kind's transform."""
        return apply_kind(self.raw_scores(hidden), self.kind)

    @torch.no_grad()
    def score_full(self, token_ids: list[list[int]], *, batch_size: int = 16) -> torch.Tensor:
        """Score each whole sequence at its last token, re-encoding it from scratch (the reference
        path). Returns float32 ``[N]`` on the model's device."""
        if not token_ids or any(len(s) == 0 for s in token_ids):
            raise ValueError("score_full needs at least one sequence and no empty sequence")
        device = self.model.model.embed_tokens.weight.device
        out = []
        for i in range(0, len(token_ids), batch_size):
            chunk = token_ids[i:i + batch_size]
            lens = torch.tensor([len(s) for s in chunk], device=device)
            ids = torch.zeros(len(chunk), int(lens.max()), dtype=torch.long)
            for j, s in enumerate(chunk):
                ids[j, :len(s)] = torch.as_tensor(s, dtype=torch.long)
            ids = ids.to(device)
            mask = torch.arange(ids.shape[1], device=device)[None, :] < lens[:, None]
            hidden = self.model(ids, mask.long())
            last = hidden[torch.arange(len(chunk), device=device), lens - 1]
            out.append(self.scores_from_hidden(last))
        return torch.cat(out)


def load_prm(path: str | Path, *, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> ValueModel:
    """Load a PRM directory: backbone (strict, ``dtype``/``device`` as ``load_decoder``) plus its
    value head (float32, same device)."""
    from transformers import AutoTokenizer

    from mahalo_engine.utils.loader import load_decoder

    root = Path(path)
    head, kind = load_value_head(root / VALUE_HEAD_FILE)
    model = load_decoder(root, dtype=dtype, device=device)
    tokenizer = AutoTokenizer.from_pretrained(root)
    return ValueModel(model, head.to(model.model.embed_tokens.weight.device), kind, tokenizer,
                      root).eval()


def save_prm(out_dir: str | Path, model: nn.Module, value_head: ValueHead, kind: str,
             tokenizer=None) -> Path:
    """Write a PRM directory: the backbone as a Hugging Face directory plus ``value_head.safetensors``."""
    from mahalo_engine.utils.loader import save_checkpoint

    out = Path(out_dir)
    value_head.metadata(kind)  # validate kind before writing anything
    if value_head.hidden_size != model.config.hidden_size:
        raise ValueError(f"value head expects hidden size {value_head.hidden_size}, the backbone "
                         f"has {model.config.hidden_size}")
    save_checkpoint(out, model, tokenizer)
    save_value_head(out / VALUE_HEAD_FILE, value_head, kind)
    return out
