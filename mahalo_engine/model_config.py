"""Model configuration: one dataclass parsed from a Hugging Face ``config.json``.

Owns the per-family rules that transformers hard-codes in its model classes (which families carry
q/k/v biases, Qwen3's default ``head_dim``, Mistral's sliding window, ...), so that the decoder reads
plain fields and never branches on ``model_type``. Accepts both the classic layout
(``rope_theta`` + ``rope_scaling``) and transformers v5's ``rope_parameters``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Keys each rope type needs, beyond rope_type itself.
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE, else a dict with "rope_type" in SUPPORTED_ROPE_TYPES and its parameters.
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # bias on q/k/v projections
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    raw: dict[str, Any] = field(repr=False)
    attention_out_bias: bool = False  # bias on o_proj (Llama/Qwen3 with attention_bias)
    mlp_bias: bool = False  # bias on gate/up/down (Llama's mlp_bias)
    sliding_window: int | None = None
    # Per layer: True where the layer attends only to the last `sliding_window` positions.
    sliding_layers: tuple[bool, ...] = ()
    pad_token_id: int | None = None
    # eos_token_id of generation_config.json (an int or a list, e.g. Llama-3 instruct's
    # [<|end_of_text|>, <|eom_id|>, <|eot_id|>]): transformers' generate stops on any of them.
    generation_eos_token_id: int | list[int] | None = None

    @property
    def eos_token_ids(self) -> list[int]:
        """Every end-of-sequence id named by config.json or generation_config.json, sorted."""
        ids: set[int] = set()
        for src in (self.eos_token_id, self.generation_eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif isinstance(src, (list, tuple)):
                ids.update(int(t) for t in src)
        return sorted(ids)

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Parse ``<path>/config.json`` (``path`` may also be the json file itself), plus the
        EOS ids of ``generation_config.json`` beside it when present."""
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"no config.json at {p}")
        config = cls.from_dict(_read_json(p))
        gen = p.parent / "generation_config.json"
        if gen.is_file():
            eos = _read_json(gen).get("eos_token_id")
            if eos is not None and not (isinstance(eos, int) or (
                    isinstance(eos, list) and all(isinstance(t, int) for t in eos))):
                raise ValueError(f"{gen}: eos_token_id must be an int or a list of ints, got "
                                 f"{eos!r}")
            config.generation_eos_token_id = eos
        return config

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} for {model_type}; supported: 'silu' (SwiGLU)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(d.get(key), int) or d[key] <= 0:
                raise ValueError(f"config.json: {key} must be a positive int, got {d.get(key)!r}")
        hidden, n_heads, n_layers = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
        n_kv = d.get("num_key_value_heads") or n_heads
        if n_heads % n_kv:
            raise ValueError(
                f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}"
            )
        # Qwen3 defaults head_dim to 128 when absent; the others derive it.
        default_head_dim = 128 if model_type == "qwen3" else hidden // n_heads
        head_dim = d.get("head_dim") or default_head_dim
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")

        rope_theta, rope_scaling = _parse_rope(d)

        # Which projections carry biases is fixed per family in transformers.
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "mistral":
            qkv_bias, o_bias = False, False
        else:  # llama, qwen3: attention_bias covers q/k/v/o
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        mlp_bias = bool(d.get("mlp_bias", False)) if model_type == "llama" else False

        sliding_window, sliding_layers = _parse_sliding(d, model_type, n_layers)

        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=hidden,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            raw=dict(d),
            attention_out_bias=o_bias,
            mlp_bias=mlp_bias,
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            pad_token_id=d.get("pad_token_id"),
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _parse_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from either config layout."""
    params = d.get("rope_parameters")
    scaling = d.get("rope_scaling")
    if params is not None and scaling is not None:
        raise ValueError("config.json has both rope_parameters and rope_scaling; expected one")
    src = dict(params if params is not None else scaling or {})
    if src and all(isinstance(v, dict) for v in src.values()):
        raise ValueError(
            f"per-layer-type rope_parameters ({sorted(src)}) are not supported; expected one dict"
        )
    theta = float(src.pop("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = src.pop("rope_type", src.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = src.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={partial} is not supported; expected 1.0")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        src.setdefault("original_max_position_embeddings", d.get("max_position_embeddings"))
    missing = [k for k in _ROPE_KEYS[rope_type] if src.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r} needs {missing} in its rope parameters")
    return theta, {"rope_type": rope_type, **{k: src[k] for k in _ROPE_KEYS[rope_type]}}


def _parse_sliding(d: dict[str, Any], model_type: str, n_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Sliding-window attention as transformers applies it per family."""
    if model_type == "llama":
        return None, (False,) * n_layers
    if model_type == "mistral":
        # Mistral applies its window (default 4096 when the key is absent) to every layer.
        window = d["sliding_window"] if "sliding_window" in d else 4096
        return window, (window is not None,) * n_layers
    # qwen2 / qwen3: the window only counts with use_sliding_window, on the layers layer_types marks.
    window = d.get("sliding_window", 4096) if d.get("use_sliding_window", False) else None
    if window is None:
        return None, (False,) * n_layers
    types = d.get("layer_types") or [
        "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention"
        for i in range(n_layers)
    ]
    if len(types) != n_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {n_layers} layers")
    return window, tuple(t == "sliding_attention" for t in types)
