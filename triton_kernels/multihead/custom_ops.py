"""``torch.ops.mahalo.multihead_logits`` / ``multihead_sample``: the kernels as torch custom ops.

Owns the op registration (schema, device kernels, fake implementations) and the public Python
functions ``triton_kernels.multihead_logits`` / ``multihead_sample``, which check their arguments
and call the ops. With the ops, the fused kernels run inside ``torch.compile(fullgraph=True)``
(one opaque node, no graph break), ``torch.export`` and CUDA graphs.

Device kernels: both devices run the launchers of ``triton_kernels.multihead.launcher``, so the dispatch
rule stays the launchers' one: CUDA → Triton; CPU → Triton's interpreter when
``TRITON_INTERPRET=1``, else ``triton_kernels.multihead.cpu``. An op takes tensors, not plans: its launcher
builds a one-off shared-weights plan (``triton_kernels.multihead.heads_plan``: one host read of the
weights, the general H-head path; under CUDA-graph capture no host read). For merged heads, pass
a plan's operands (``merge_shared_heads``, built once) in place of ``(heads, weights)``.

Schema: an op argument has one concrete type, so the Python functions normalise the
"float or tensor" arguments into pairs — ``temperature: float`` + ``temperature_tensor: Tensor?``,
``seed: int`` + ``seed_tensor: Tensor?``, ``offset: int`` + ``offset_tensor: Tensor?`` — where a
given tensor wins over the scalar. The device-tensor forms stay device reads (no host sync).

Why ``custom_op`` and not ``triton_op``: ``triton_op`` lets Inductor trace into the kernels, but it
must trace the launcher's Python (launch config from the SM count, the shared-weights plan with its
host read, ``torch.topk`` between two kernels) and cannot run the CPU interpreter path; an opaque
op keeps one code path for eager, compile, export and graphs.
"""
from __future__ import annotations

import torch

from triton_kernels.multihead import launcher
from triton_kernels.checks import check_out, check_projection, check_sampling

_DEVICES = ("cpu", "cuda")


@torch.library.custom_op("mahalo::multihead_logits", mutates_args=(), device_types=_DEVICES)
def _logits_op(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return launcher.multihead_logits(hidden, heads, weights)


@_logits_op.register_fake
def _logits_fake(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return hidden.new_empty(hidden.shape[0], heads.shape[1], dtype=torch.float32)


@torch.library.custom_op("mahalo::multihead_sample", mutates_args=(), device_types=_DEVICES)
def _sample_op(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor,
               temperature: float, temperature_tensor: torch.Tensor | None, top_k: int,
               seed: int, seed_tensor: torch.Tensor | None, offset: int,
               offset_tensor: torch.Tensor | None, top_p: float = 1.0,
               top_p_tensor: torch.Tensor | None = None, min_p: float = 0.0,
               min_p_tensor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    return launcher.multihead_sample(
        hidden, heads, weights,
        temperature=temperature if temperature_tensor is None else temperature_tensor,
        top_k=top_k, top_p=top_p if top_p_tensor is None else top_p_tensor,
        min_p=min_p if min_p_tensor is None else min_p_tensor,
        seed=seed if seed_tensor is None else seed_tensor,
        offset=offset if offset_tensor is None else offset_tensor)


@_sample_op.register_fake
def _sample_fake(hidden, heads, weights, temperature, temperature_tensor, top_k, seed,
                 seed_tensor, offset, offset_tensor, top_p=1.0, top_p_tensor=None, min_p=0.0,
                 min_p_tensor=None) -> tuple[torch.Tensor, torch.Tensor]:
    batch = hidden.shape[0]
    return (hidden.new_empty(batch, dtype=torch.int64), hidden.new_empty(batch, dtype=torch.float32))


def _split(value: float | int | torch.Tensor | None, default: float | int
           ) -> tuple[float | int, torch.Tensor | None]:
    """``(scalar, tensor)`` schema pair of one "scalar or device tensor" argument."""
    if isinstance(value, torch.Tensor):
        return default, value
    return (default if value is None else value), None


def multihead_logits(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_i weights[b,i] · heads[i] @ hidden[b]`` → float32 ``[B,V]`` via
    ``torch.ops.mahalo.multihead_logits`` (contract: ``triton_kernels.multihead.launcher.multihead_logits``).

    ``out``: copied into when given (an op output cannot alias an input).
    """
    check_projection(hidden, heads, weights)
    check_out(out, hidden, heads.shape[1])
    logits = torch.ops.mahalo.multihead_logits(hidden, heads, weights)
    return logits if out is None else out.copy_(logits)


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                     top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                     seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused projection + sampling via ``torch.ops.mahalo.multihead_sample``:
    ``(tokens int64 [B], logprobs float32 [B])`` (contract:
    ``triton_kernels.multihead.multihead_sample``)."""
    check_projection(hidden, heads, weights)
    check_sampling(temperature, top_k, seed, offset, hidden.device, hidden.shape[0], top_p, min_p)
    temp, temp_t = _split(temperature, 1.0)
    top_p_f, top_p_t = _split(top_p, 1.0)
    min_p_f, min_p_t = _split(min_p, 0.0)
    seed_i, seed_t = _split(seed, 0)
    offset_i, offset_t = _split(offset, 0)
    return torch.ops.mahalo.multihead_sample(hidden, heads, weights, float(temp), temp_t, top_k,
                                             seed_i, seed_t, offset_i, offset_t, float(top_p_f),
                                             top_p_t, float(min_p_f), min_p_t)
