"""The engine's CPU path for the multi-head projection and sampling: the reference's results, cheaply.

``triton_kernels.multihead.reference`` is the readable spec; this module returns the same tokens (bit for
bit: same logits, same mask, same softmax, same generator draw) at a fraction of its cost on a
real vocabulary (V = 151936):

- a shared-weights plan applies on CPU too (``triton_kernels.multihead.heads_plan``): with a merged plan
  (the engine's sampler keeps one), rows sharing U < H weight vectors read U merged heads
  instead of H; a call without a plan builds a one-off plan, which does not merge;
- greedy calls (float T = 0, every row of a temperature tensor 0, or ``top_k = 1``, which keeps
  only the argmax) take ``argmax``: no softmax, no mask, no draw;
- top-k truncation finds the k-th largest value with ``torch.topk`` instead of a stable sort of
  the whole vocabulary; ties at the threshold go to the lower index, as in the reference;
- top-p and min-p run only when they filter (a tensor, ``top_p < 1``, ``min_p > 0``), with the
  reference's own masks (``reference.top_p_mask``/``min_p_mask``: top-p ranks the row with one
  sort, so its cumulative sums, and so the mask, are the reference's bit for bit);
- the log-probability is ``s[token] - logsumexp(s)`` (no ``[B,V]`` log-softmax); it agrees with
  the reference's ``log_softmax`` to fp32 rounding, not bit for bit.

Same signatures and validation as the reference; CPU tensors only.
"""
from __future__ import annotations

import torch

from triton_kernels.checks import check_out, check_projection, check_sampling
from triton_kernels.multihead.heads_plan import HeadsPlan, checked_plan
from triton_kernels.multihead.reference import min_p_mask, sampling_generator, top_p_mask


def _check_cpu(hidden: torch.Tensor) -> None:
    if hidden.device.type != "cpu":
        raise ValueError(f"triton_kernels.multihead.cpu runs on CPU tensors, got hidden on {hidden.device}")


def project(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_i w[:,i] · h @ W_i.T`` in fp32 with the reference's operations in its order (so the
    same bits), minus its zero-fill and the copy of fp32 heads."""
    w = weights.float()
    h = hidden.float()
    z = None
    for i in range(heads.shape[0]):
        head = heads[i] if heads.dtype == torch.float32 else heads[i].float()
        term = w[:, i:i + 1] * (h @ head.t())
        z = term if z is None else z.add_(term)
    return z


def _planned(heads: torch.Tensor, weights: torch.Tensor,
             plan: HeadsPlan | None) -> tuple[torch.Tensor, torch.Tensor]:
    plan = checked_plan(heads, weights, plan, merge=False)
    return plan.heads, plan.weights


def multihead_logits(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     out: torch.Tensor | None = None,
                     plan: HeadsPlan | None = None) -> torch.Tensor:
    """``hidden [B,d]``, ``heads [H,V,d]``, ``weights [B,H]`` → float32 logits ``[B,V]``, through
    ``plan`` (``plan_heads(heads, weights)``: U merged heads when the rows share U < H weight
    vectors; None = a one-off plan, no merge)."""
    check_projection(hidden, heads, weights)
    check_out(out, hidden, heads.shape[1])
    _check_cpu(hidden)
    z = project(hidden, *_planned(heads, weights, plan))
    return z if out is None else out.copy_(z)


def top_k_mask(scaled: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool ``[B,V]``: the ``top_k`` largest entries per row, ties to the lower index — the
    reference's ``top_k_mask`` without sorting the vocabulary."""
    kth = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
    keep = scaled > kth
    tied = scaled == kth
    need = top_k - keep.sum(-1, keepdim=True)  # ≥ 1: the k-th value itself is tied
    if bool((tied.sum(-1, keepdim=True) > need).any()):  # more ties than places: lowest indices
        tied &= tied.cumsum(-1) <= need
    return keep | tied


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                     top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                     seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None,
                     plan: HeadsPlan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference.multihead_sample``'s tokens and log-probs (see the module docstring), through
    ``plan`` as in ``multihead_logits``."""
    check_projection(hidden, heads, weights)
    check_sampling(temperature, top_k, seed, offset, hidden.device, hidden.shape[0], top_p, min_p)
    _check_cpu(hidden)
    return sample_logits(project(hidden, *_planned(heads, weights, plan)), temperature=temperature,
                         top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, offset=offset)


def sample_logits(z: torch.Tensor, *, temperature: float | torch.Tensor, top_k: int,
                  seed: int | torch.Tensor, offset: int | torch.Tensor | None,
                  top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampling half of ``multihead_sample`` on fp32 logits ``z [B,V]`` (arguments checked by
    the caller)."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.reshape(-1, 1)  # [1, 1] (every row) or [B, 1]
        greedy = (t == 0)[:, 0]
        scaled = z / torch.where(greedy[:, None], 1.0, t)
        any_sampled = not bool(greedy.all())
    else:
        greedy = torch.tensor([temperature == 0])
        scaled = z / temperature if temperature > 0 else z
        any_sampled = temperature > 0
    tokens = torch.argmax(scaled, dim=-1)  # the first maximum: ties to the lower index
    # top_k = 1 keeps the argmax alone, so its draw is the argmax: no draw needed.
    if any_sampled and top_k != 1:
        # Every row draws, as in the reference, so each row sees the reference's random numbers.
        keep = None
        if 0 < top_k < scaled.shape[1]:
            keep = top_k_mask(scaled, top_k)
        if isinstance(top_p, torch.Tensor) or top_p < 1:
            keep = top_p_mask(scaled, torch.ones_like(scaled, dtype=torch.bool) if keep is None
                              else keep, top_p)
        if isinstance(min_p, torch.Tensor) or min_p > 0:
            above = min_p_mask(scaled, min_p)
            keep = above if keep is None else keep & above
        masked = scaled if keep is None else scaled.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(masked, dim=-1)
        drawn = torch.multinomial(probs, 1, generator=sampling_generator(seed, offset, z.device))
        tokens = torch.where(greedy, tokens, drawn.squeeze(1))
    logprobs = scaled.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(scaled, dim=-1)
    return tokens, logprobs
