"""Sequence log-probabilities with one head per row, computed in chunks.

``sequence_logps`` projects each row's hidden states through *its own* head only, and only at the
positions that carry a label, in chunks of ``chunk_tokens`` positions. With autograd on, each
chunk runs under activation checkpointing, so its float32 logits ``[chunk, V]`` exist once in the
forward and once again in the backward, never all at once: the ``[N, T, V]`` (let alone
``[H, N, T, V]``) logits tensor is never built.

``PolicyLogps`` is the trainable unit (decoder + heads -> summed response log-probs per row) that
the trainers wrap in DDP / FSDP2, so every parameter is used inside its ``forward``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.collate import IGNORE


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # the matmul may run in bf16 under autocast
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(hidden: torch.Tensor, heads: torch.Tensor, head_ids: torch.Tensor,
                   labels: torch.Tensor, *, chunk_tokens: int = 1024) -> torch.Tensor:
    """Summed log-probs ``[N]`` (float32) of each row's labelled tokens under its head.

    ``hidden [N,T,d]`` (post-norm), ``heads [H,V,d]``, ``head_ids [N]`` in ``[0,H)``, ``labels
    [N,T]``: the token id at position t (predicted from position t-1) or ``IGNORE``. A row
    without labels gets 0.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden [N,T,d] and labels [N,T] disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(labels.shape)}")
    if heads.dim() != 3 or heads.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"heads must be [H,V,{hidden.shape[-1]}], got {tuple(heads.shape)}")
    n = hidden.shape[0]
    if head_ids.shape != (n,):
        raise ValueError(f"head_ids must be [{n}], got {tuple(head_ids.shape)}")
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    if rows.numel() == 0:
        return out + 0.0 * hidden.sum()  # keep the graph connected for DDP
    h_sel = hidden[:, :-1][rows, cols]  # [M,d], only labelled positions
    t_sel = targets[rows, cols]
    row_heads = head_ids.to(rows.device)[rows]
    if int(row_heads.min()) < 0 or int(row_heads.max()) >= heads.shape[0]:
        raise ValueError(f"head_ids must lie in [0, {heads.shape[0]})")
    use_ckpt = torch.is_grad_enabled() and (hidden.requires_grad or heads.requires_grad)
    parts, where = [], []
    for k in row_heads.unique().tolist():
        idx = (row_heads == k).nonzero(as_tuple=True)[0]
        weight = heads[k]
        for c in idx.split(chunk_tokens):
            args = (h_sel[c], weight, t_sel[c])
            parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if use_ckpt
                         else _chunk_logps(*args))
            where.append(rows[c])
    return out.index_add(0, torch.cat(where), torch.cat(parts))


def head_diagnostics(hidden: torch.Tensor, heads: torch.Tensor, labels: torch.Tensor, *,
                     chunk_tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """What every head says about every row, from hidden states already computed (no gradient):

    - ``all_logps [H,N]``: each row's summed response log-prob under each head (``sequence_logps``
      with every row on head k, for each k);
    - ``first_kl [N]``: the mean over ordered head pairs (i, j), i != j, of
      KL(p_i || p_j) between the heads' next-token distributions at the row's first response
      position (0 for one head or a row without labels).
    """
    with torch.no_grad():
        hidden = hidden.detach().float()
        heads = heads.detach().float()
        n, h = hidden.shape[0], heads.shape[0]
        all_logps = torch.stack([
            sequence_logps(hidden, heads, torch.full((n,), k, dtype=torch.long, device=hidden.device),
                           labels, chunk_tokens=chunk_tokens) for k in range(h)])
        labelled = labels[:, 1:] != IGNORE  # position t predicts labels[:, t + 1]
        has = labelled.any(1)
        first = labelled.float().argmax(1)
        x = hidden[torch.arange(n, device=hidden.device), first]  # [N,d]
        logp = torch.einsum("nd,hvd->hnv", x, heads).log_softmax(-1)  # [H,N,V]
        kl = torch.zeros(n, device=hidden.device)
        if h > 1:
            p = logp.exp()
            for i in range(h):
                for j in range(h):
                    if i != j:
                        kl += (p[i] * (logp[i] - logp[j])).sum(-1)
            kl = torch.where(has, kl / (h * (h - 1)), torch.zeros_like(kl))
        return all_logps, kl


def enable_gradient_checkpointing(decoder: nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward instead of storing them."""
    for layer in decoder.model.layers:
        if getattr(layer, "_mahalo_ckpt", False):
            continue
        inner = layer.forward

        def wrapped(*args, _inner=inner, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = wrapped
        layer._mahalo_ckpt = True


class PolicyLogps(nn.Module):
    """Decoder + LM heads -> summed response log-probs per row.

    ``heads`` (``[H,V,d]``) are trained separately from the decoder's own ``lm_head`` (MAH-DPO);
    with ``heads=None`` the decoder's ``lm_head`` is the single head (SFT, reference log-probs).
    """

    def __init__(self, decoder: nn.Module, heads: torch.Tensor | None = None, *,
                 chunk_tokens: int = 1024) -> None:
        super().__init__()
        self.decoder = decoder
        self.heads = nn.Parameter(heads) if heads is not None else None
        self.chunk_tokens = chunk_tokens

    def head_weights(self) -> torch.Tensor:
        return self.heads if self.heads is not None else self.decoder.lm_head.weight.unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                head_ids: torch.Tensor, diagnostics: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed log-probs ``[N]`` of each row under its head; with ``diagnostics`` also
        `head_diagnostics` of the same hidden states (inside the forward, where FSDP2 has the
        heads gathered)."""
        hidden = self.decoder(input_ids, attention_mask)
        heads = self.head_weights()
        logps = sequence_logps(hidden, heads, head_ids, labels, chunk_tokens=self.chunk_tokens)
        if not diagnostics:
            return logps
        return (logps, *head_diagnostics(hidden, heads, labels, chunk_tokens=self.chunk_tokens))
