"""Argument validation shared by the Triton launchers and the pure-torch reference.

Every check raises ``ValueError`` (``TypeError`` for a non-tensor where a tensor is required) naming
the argument, the value it got and what was expected. Value checks that read device memory (finite
weights) live with the caller, because they need a host read that CUDA-graph capture forbids.
"""
from __future__ import annotations

import math

import torch

from triton_kernels.argcheck import is_int, is_real

MAX_TOP_K = 128  # the fused top-k candidates path keeps at most this many per row (power of two);
# a larger top_k takes the exact threshold path (triton_kernels.multihead.kernels, MODE_FILTER)
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_SEED = 2**63  # Philox key is 64 bits; int64 tensors hold [0, 2**63)


def _require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_projection(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> None:
    """Shapes, dtypes and devices of ``hidden [B,d]``, ``heads [H,V,d]``, ``weights [B,H]``."""
    _require_tensor("hidden", hidden)
    if hidden.dim() != 2 or hidden.shape[0] < 1 or hidden.shape[1] < 1:
        raise ValueError(f"hidden must have shape [B, d] with B, d >= 1, got {tuple(hidden.shape)}")
    if hidden.dtype not in LOGIT_DTYPES:
        raise ValueError(f"hidden dtype {hidden.dtype} is not supported; expected one of "
                         f"{LOGIT_DTYPES}")
    check_mixture(heads, weights)
    if heads.shape[2] != hidden.shape[1]:
        raise ValueError(f"heads has hidden size {heads.shape[2]} (shape {tuple(heads.shape)}) but "
                         f"hidden has {hidden.shape[1]} (shape {tuple(hidden.shape)})")
    if weights.shape[0] != hidden.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} rows (shape {tuple(weights.shape)}) but "
                         f"hidden has B = {hidden.shape[0]} (shape {tuple(hidden.shape)})")
    if heads.dtype != hidden.dtype:
        raise ValueError(f"heads dtype {heads.dtype} must equal hidden dtype {hidden.dtype}")
    if heads.device != hidden.device:
        raise ValueError(f"heads is on {heads.device} but hidden is on {hidden.device}; "
                         "all inputs must be on one device")


def check_mixture(heads: torch.Tensor, weights: torch.Tensor) -> None:
    """``heads [H,V,d]`` and ``weights [B,H]``: shapes, dtypes, one device."""
    _require_tensor("heads", heads)
    _require_tensor("weights", weights)
    if heads.dim() != 3 or min(heads.shape) < 1:
        raise ValueError(f"heads must have shape [H, V, d] with H, V, d >= 1, got "
                         f"{tuple(heads.shape)}")
    if heads.dtype not in LOGIT_DTYPES:
        raise ValueError(f"heads dtype {heads.dtype} is not supported; expected one of "
                         f"{LOGIT_DTYPES}")
    if weights.dim() != 2 or weights.shape[1] != heads.shape[0]:
        raise ValueError(f"weights must have shape [B, H] with H = {heads.shape[0]} heads, got "
                         f"{tuple(weights.shape)}")
    if not weights.dtype.is_floating_point:
        raise ValueError(f"weights must be a floating-point tensor, got dtype {weights.dtype}")
    if weights.device != heads.device:
        raise ValueError(f"weights is on {weights.device} but heads is on {heads.device}; "
                         "all inputs must be on one device")


def check_finite_weights(weights_host: torch.Tensor) -> None:
    """``weights_host``: a host copy of the weights (the caller decides when it may read them).

    Non-finite weights are rejected. Negative weights are accepted: the kernels' arithmetic is
    defined for any real mixture, and the policy (``Policy.weight_matrix``) is where the
    non-negative, sum-to-one convention is enforced.
    """
    finite = torch.isfinite(weights_host)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"weights must be finite, got {weights_host[tuple(bad)].item()} at "
                         f"index {tuple(bad)}")


def check_out(out: torch.Tensor | None, hidden: torch.Tensor, V: int) -> None:
    if out is None:
        return
    _require_tensor("out", out)
    B = hidden.shape[0]
    if out.dtype != torch.float32 or tuple(out.shape) != (B, V) or out.device != hidden.device:
        raise ValueError(f"out must be float32 [{B}, {V}] on {hidden.device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"out must be contiguous, got strides {out.stride()}")


def _check_row_tensor(name: str, value: torch.Tensor, batch: int, device: torch.device) -> None:
    """A per-row sampling option given as a tensor: float32 on ``device``, shape ``[]``/``[1]``
    (every row) or ``[batch]`` (one per row)."""
    if (value.dtype != torch.float32 or value.device != device
            or tuple(value.shape) not in ((), (1,), (batch,))):
        raise ValueError(f"{name} tensor must be float32 of shape [], [1] or [{batch}] on "
                         f"{device}, got {value.dtype} shape {list(value.shape)} on "
                         f"{value.device}")


def check_temperature(temperature: float | torch.Tensor, batch: int,
                      device: torch.device | None) -> None:
    """A real number >= 0 and finite (0 = greedy), or a float32 tensor on ``device`` of shape
    ``[]``/``[1]`` (one temperature for every row) or ``[batch]`` (one per row); ``device`` None
    accepts numbers only (host-side options, such as an engine call's).

    A tensor's values are read on the device only (no host sync, so a CUDA graph can capture a call
    and replay it with new values): a negative or non-finite entry is the caller's responsibility.
    """
    if isinstance(temperature, torch.Tensor) and device is not None:
        _check_row_tensor("temperature", temperature, batch, device)
        return
    if not is_real(temperature):
        kinds = "a real number" if device is None else "a real number or a float32 tensor"
        raise ValueError(f"temperature must be {kinds}, got {temperature!r}")
    if not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature!r}")


def check_probability(name: str, value: float | torch.Tensor, low: float, high: float,
                      low_open: bool, batch: int, device: torch.device | None) -> None:
    """``top_p``/``min_p``: a finite real number in ``(low, high]`` (``[low, high]`` unless
    ``low_open``), or (``device`` given) a float32 tensor on ``device`` of shape ``[]``/``[1]``
    (every row) or ``[batch]`` (per row), whose values are read on the device only (like a
    temperature tensor's: out-of-range entries are the caller's bug)."""
    if isinstance(value, torch.Tensor) and device is not None:
        _check_row_tensor(name, value, batch, device)
        return
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    if not is_real(value):
        kinds = "a real number" if device is None else "a real number or a float32 tensor"
        raise ValueError(f"{name} must be {kinds} in {bounds}, got {value!r}")
    if (not math.isfinite(float(value)) or value > high or value < low
            or (low_open and value == low)):
        raise ValueError(f"{name} must be a finite number in {bounds}, got {value!r}")


def check_sampling(temperature: float | torch.Tensor, top_k: int, seed: int | torch.Tensor,
                   offset: int | torch.Tensor | None = None, device: torch.device | None = None,
                   batch: int = 1, top_p: float | torch.Tensor = 1.0,
                   min_p: float | torch.Tensor = 0.0) -> None:
    """The sampling options of every layer (kernels, engine, search config): ``check_temperature``;
    top_k an int >= 0 (0 = no truncation; any k, k >= V keeps every token); top_p in (0, 1]
    (1 = no nucleus filter) and min_p in [0, 1] (0 = none), numbers or float32 device tensors like
    the temperature; seed/offset ints in [0, 2**63) or 1-element int64 tensors on ``device`` (read
    on the device, so a CUDA graph replay sees their new values). ``device`` None accepts numbers
    only."""
    check_temperature(temperature, batch, device)
    if not is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = no truncation), got {top_k!r}")
    check_probability("top_p", top_p, 0.0, 1.0, True, batch, device)
    check_probability("min_p", min_p, 0.0, 1.0, False, batch, device)
    for name, value in (("seed", seed), ("offset", offset)):
        if value is None and name == "offset":
            continue
        if isinstance(value, torch.Tensor) and device is not None:
            if value.dtype != torch.int64 or value.numel() != 1 or value.device != device:
                raise ValueError(f"{name} tensor must be int64 with one element on {device}, got "
                                 f"{value.dtype} shape {tuple(value.shape)} on {value.device}")
        elif not is_int(value):
            kinds = "an int" if device is None else "an int or a 1-element int64 tensor"
            raise ValueError(f"{name} must be {kinds}, got {value!r}")
        elif not 0 <= value < _MAX_SEED:
            raise ValueError(f"{name} must be in [0, 2**63), got {value}")


CASCADE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_cascade(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                  prefix_lens: torch.Tensor, suffix_k: torch.Tensor, suffix_v: torch.Tensor,
                  suffix_lens: torch.Tensor) -> None:
    """Shapes, dtypes and devices of a cascade decode attention call (no device read):
    ``q [R,K,H,hd]``, ``prefix_k/v [R,n_kv,Tp,hd]``, ``prefix_lens [R]``, ``suffix_k/v
    [R,K,n_kv,Ts,hd]``, ``suffix_lens [R,K]``; H a multiple of n_kv; one float dtype; int lens."""
    named = {"q": q, "prefix_k": prefix_k, "prefix_v": prefix_v, "prefix_lens": prefix_lens,
             "suffix_k": suffix_k, "suffix_v": suffix_v, "suffix_lens": suffix_lens}
    for name, t in named.items():
        _require_tensor(name, t)
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if q.dim() != 4:
        raise ValueError(f"q must be [R, K, H, head_dim], got shape {tuple(q.shape)}")
    r, k, h, hd = q.shape
    if q.dtype not in CASCADE_DTYPES:
        raise ValueError(f"q dtype {q.dtype} is not supported; expected one of {CASCADE_DTYPES}")
    if prefix_k.dim() != 4 or prefix_k.shape[0] != r or prefix_k.shape[3] != hd:
        raise ValueError(f"prefix_k must be [R={r}, n_kv, Tp, head_dim={hd}], got shape "
                         f"{tuple(prefix_k.shape)}")
    n_kv = prefix_k.shape[1]
    if n_kv < 1 or h % n_kv:
        raise ValueError(f"q has {h} heads, not a multiple of prefix_k's {n_kv} KV heads")
    if suffix_k.dim() != 5 or tuple(suffix_k.shape[:3]) != (r, k, n_kv) or suffix_k.shape[4] != hd:
        raise ValueError(f"suffix_k must be [R={r}, K={k}, n_kv={n_kv}, Ts, head_dim={hd}], got "
                         f"shape {tuple(suffix_k.shape)}")
    for name, kt, vt in (("prefix", prefix_k, prefix_v), ("suffix", suffix_k, suffix_v)):
        if vt.shape != kt.shape:
            raise ValueError(f"{name}_v shape {tuple(vt.shape)} differs from {name}_k's "
                             f"{tuple(kt.shape)}")
        for name_t, t in ((f"{name}_k", kt), (f"{name}_v", vt)):
            if t.dtype != q.dtype:
                raise ValueError(f"{name_t} dtype {t.dtype} differs from q's {q.dtype}")
            if t.stride(-1) != 1:
                raise ValueError(f"{name_t} must have a unit last stride, got {t.stride()}")
    for name, t, shape in (("prefix_lens", prefix_lens, (r,)), ("suffix_lens", suffix_lens, (r, k))):
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")


def check_cascade_extend(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                         prefix_lens: torch.Tensor, suffix_k: torch.Tensor,
                         suffix_v: torch.Tensor, suffix_lens: torch.Tensor,
                         num_new: torch.Tensor) -> None:
    """`check_cascade` for several new tokens per candidate: ``q [R,K,T,H,hd]`` (T >= 1) and
    ``num_new [R,K]`` int (no device read: values are the caller's contract)."""
    _require_tensor("q", q)
    if q.dim() != 5 or q.shape[2] < 1:
        raise ValueError(f"q must be [R, K, T, H, head_dim] with T >= 1, got shape "
                         f"{tuple(q.shape)}")
    check_cascade(q.select(2, 0), prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v,
                  suffix_lens)
    _require_tensor("num_new", num_new)
    if num_new.device != q.device:
        raise ValueError(f"num_new is on {num_new.device} but q is on {q.device}")
    if num_new.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"num_new must be int32 or int64, got {num_new.dtype}")
    if tuple(num_new.shape) != tuple(q.shape[:2]):
        raise ValueError(f"num_new must have shape {list(q.shape[:2])}, got "
                         f"{tuple(num_new.shape)}")
