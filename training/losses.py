"""Training losses: MAH-DPO (multi-head sigmoid DPO) and the PRM losses (MSE, BCE, Bradley–Terry).

``mah_dpo_loss`` follows docs/design.md: for objective i, sigmoid DPO
``-log σ(β((π_c - ref_c) - (π_r - ref_r)))`` over objective i's rows, then ``Σ_i α_i · mean_i(L_i)``
with ``α_i = 1/H`` by default: the paper's equal weights, a mean over the H objectives. The
paper's code averages over the objectives *present* in a batch; with balanced batches (every
objective in every global batch, as ``training.batching.BalancedBatches`` builds them and
``objective_counts`` counts them) the two are equal. An objective with no rows in the batch
contributes nothing (its entry in ``per_objective_losses`` is 0). The ``objective_counts`` option
lets distributed / accumulated trainers divide each objective's sum by its count over the *global*
batch, so that a local slice contributes exactly its share.

``rpo_alpha`` A adds, per objective, A × the chosen answers' negative log-likelihood under their
own head, normalised by their token count (TRL's ``rpo_alpha``: a cross-entropy mean over the
chosen tokens of the objective's rows; ``objective_chosen_tokens`` gives the global counts). It
keeps the chosen answer's likelihood from falling with the rejected one's (the collapse plain DPO
allows); A = 0 is the paper's loss.

``value_mse_loss`` with ``example_steps`` is the paper's value-PRM loss: each example's mean
squared error over its own steps, then the mean over examples (a flat mean over all steps
weights long examples more).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F


def _check_logps(name: str, t: torch.Tensor, n: int | None) -> int:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {n} (same as policy_chosen_logps)")
    return t.shape[0]


def _resolve_alphas(alphas: Sequence[float] | torch.Tensor | None, num_objectives: int | None,
                    objective_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    if alphas is not None:
        a = torch.as_tensor(alphas, dtype=torch.float32, device=device).flatten()
        if num_objectives is not None and a.numel() != num_objectives:
            raise ValueError(f"alphas has {a.numel()} entries but num_objectives={num_objectives}")
        if not torch.isfinite(a).all() or (a < 0).any():
            raise ValueError(f"alphas must be finite and >= 0, got {a.tolist()}")
        return a
    if num_objectives is None:
        if objective_ids.numel() == 0:
            raise ValueError("empty batch: pass alphas or num_objectives to size the per-objective losses")
        num_objectives = int(objective_ids.max()) + 1
    if num_objectives <= 0:
        raise ValueError(f"num_objectives must be positive, got {num_objectives}")
    return torch.full((num_objectives,), 1.0 / num_objectives, dtype=torch.float32, device=device)


def dpo_margins(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor) -> torch.Tensor:
    """Implicit reward margin per row before β: ``(π_c - ref_c) - (π_r - ref_r)`` in float32."""
    return ((policy_chosen_logps.float() - ref_chosen_logps.float())
            - (policy_rejected_logps.float() - ref_rejected_logps.float()))


def mah_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    objective_ids: torch.Tensor,
    *,
    beta: float = 0.1,
    alphas: Sequence[float] | torch.Tensor | None = None,
    num_objectives: int | None = None,
    objective_counts: torch.Tensor | None = None,
    rpo_alpha: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    objective_chosen_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAH-DPO loss over a batch of preference pairs, each row belonging to one objective.

    All log-prob tensors are ``[N]`` sequence log-probs (summed over response tokens); the policy's
    come from the row's own objective head. ``objective_ids`` is an integer ``[N]`` in ``[0, H)``.
    H is ``len(alphas)``, else ``num_objectives``, else ``max(objective_ids) + 1``; ``alphas``
    defaults to ``1/H`` for every objective (the paper's mean over objectives; see the module
    docstring for why this equals the paper code's mean over the objectives present).
    ``objective_counts`` (``[H]``): divide objective i's summed loss by this count instead of its
    count in this batch (the trainers pass global-batch counts).

    ``rpo_alpha`` (>= 0) with ``chosen_tokens [N]`` (response tokens of each chosen answer) adds
    ``rpo_alpha · Σ_{rows of i} -π_c / Σ_{rows of i} tokens`` to objective i's loss; the token
    sum is ``objective_chosen_tokens[i]`` when given (global counts, like ``objective_counts``).

    Returns ``(loss, per_objective_losses[H])``: the scalar ``Σ_i α_i · mean_i(L_i)`` and the
    unweighted per-objective means (0 for an objective absent from the batch).
    """
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    if not isinstance(rpo_alpha, (int, float)) or not (math.isfinite(rpo_alpha) and rpo_alpha >= 0):
        raise ValueError(f"rpo_alpha must be a finite number >= 0, got {rpo_alpha!r}")
    if rpo_alpha > 0 and chosen_tokens is None:
        raise ValueError("rpo_alpha > 0 needs chosen_tokens (response tokens per chosen row)")
    n = _check_logps("policy_chosen_logps", policy_chosen_logps, None)
    _check_logps("policy_rejected_logps", policy_rejected_logps, n)
    _check_logps("ref_chosen_logps", ref_chosen_logps, n)
    _check_logps("ref_rejected_logps", ref_rejected_logps, n)
    if not isinstance(objective_ids, torch.Tensor) or objective_ids.dtype not in (
            torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"objective_ids must be an integer tensor, got "
                        f"{getattr(objective_ids, 'dtype', type(objective_ids).__name__)}")
    if objective_ids.shape != (n,):
        raise ValueError(f"objective_ids must have shape ({n},), got {tuple(objective_ids.shape)}")
    device = policy_chosen_logps.device
    a = _resolve_alphas(alphas, num_objectives, objective_ids, device)
    h = a.numel()
    ids = objective_ids.to(device=device, dtype=torch.int64)
    if n and (int(ids.min()) < 0 or int(ids.max()) >= h):
        raise ValueError(f"objective_ids must lie in [0, {h}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")

    margins = dpo_margins(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                          ref_rejected_logps)
    per_row = -F.logsigmoid(beta * margins)
    sums = torch.zeros(h, dtype=per_row.dtype, device=device).index_add(0, ids, per_row)
    present = torch.bincount(ids, minlength=h)
    if objective_counts is None:
        counts = present.to(per_row.dtype)
    else:
        counts = torch.as_tensor(objective_counts, device=device).to(per_row.dtype).flatten()
        if counts.numel() != h:
            raise ValueError(f"objective_counts has {counts.numel()} entries, expected {h}")
        short = (present > 0) & (counts < present.to(counts.dtype))
        if short.any():
            raise ValueError(f"objective_counts {counts.tolist()} is smaller than the rows present "
                             f"in the batch {present.tolist()}")
    per_objective = torch.where(present > 0, sums / counts.clamp(min=1), torch.zeros_like(sums))
    if rpo_alpha > 0:
        per_objective = per_objective + rpo_alpha * _chosen_nll(
            policy_chosen_logps, ids, h, chosen_tokens, objective_chosen_tokens, present)
    return (a * per_objective).sum(), per_objective


def _chosen_nll(chosen_logps: torch.Tensor, ids: torch.Tensor, h: int, chosen_tokens: torch.Tensor,
                objective_tokens: torch.Tensor | None, present: torch.Tensor) -> torch.Tensor:
    """Per objective: the chosen answers' summed NLL over their token count ``[H]``."""
    device = chosen_logps.device
    tokens = torch.as_tensor(chosen_tokens, device=device).float().flatten()
    if tokens.shape != ids.shape:
        raise ValueError(f"chosen_tokens must have shape {tuple(ids.shape)}, got {tuple(tokens.shape)}")
    nll = torch.zeros(h, device=device).index_add(0, ids, -chosen_logps.float())
    if objective_tokens is None:
        denom = torch.zeros(h, device=device).index_add(0, ids, tokens)
    else:
        denom = torch.as_tensor(objective_tokens, device=device).float().flatten()
        if denom.numel() != h:
            raise ValueError(f"objective_chosen_tokens has {denom.numel()} entries, expected {h}")
    return torch.where(present > 0, nll / denom.clamp(min=1), torch.zeros_like(nll))


def _reduce(x: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return x.mean()
    if reduction == "sum":
        return x.sum()
    if reduction == "none":
        return x
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _same_shape(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {tuple(a.shape)} and {b_name} {tuple(b.shape)} must have the "
                         f"same shape")


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, *,
                       reduction: str = "mean") -> torch.Tensor:
    """``-log σ(r_c - r_r)`` per pair of raw scalar rewards (equal shapes), reduced."""
    _same_shape("chosen_scores", chosen_scores, "rejected_scores", rejected_scores)
    return _reduce(-F.logsigmoid(chosen_scores.float() - rejected_scores.float()), reduction)


def value_mse_loss(predictions: torch.Tensor, targets: torch.Tensor, *, reduction: str = "mean",
                   example_steps: Sequence[int] | None = None) -> torch.Tensor:
    """Squared error between predicted values and value targets (equal shapes), reduced.

    ``example_steps``: the number of steps of each example, when ``predictions`` holds the steps
    of several examples one example after another (1-D). Each example's errors are then first
    averaged over its own steps, and ``reduction`` applies to those per-example means: with
    ``"mean"`` this is the paper's loss. Without it, ``reduction`` applies to every step alike."""
    _same_shape("predictions", predictions, "targets", targets)
    err = (predictions.float() - targets.float()).square()
    if example_steps is None:
        return _reduce(err, reduction)
    counts = [int(n) for n in example_steps]
    if err.dim() != 1 or any(n < 1 for n in counts) or sum(counts) != err.numel():
        raise ValueError(f"example_steps {counts} must be positive and sum to the number of "
                         f"predictions, {err.numel()} (1-D)")
    sizes = torch.tensor(counts, device=err.device)
    example = torch.repeat_interleave(torch.arange(len(counts), device=err.device), sizes)
    means = torch.zeros(len(counts), device=err.device).index_add(0, example, err) / sizes
    return _reduce(means, reduction)


def soft_bce_loss(logits: torch.Tensor, labels: torch.Tensor, *,
                  reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of raw logits against 0/1 or soft labels in [0, 1], reduced."""
    _same_shape("logits", logits, "labels", labels)
    if labels.numel() and (labels.min() < 0 or labels.max() > 1):
        raise ValueError(f"BCE labels must lie in [0, 1], got values in "
                         f"[{float(labels.min())}, {float(labels.max())}]")
    return _reduce(F.binary_cross_entropy_with_logits(logits.float(), labels.float(),
                                                      reduction="none"), reduction)
