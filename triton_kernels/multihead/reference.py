"""Pure-torch definition of the multi-head projection and sampling (the readable spec).

Same signatures as the launchers in ``triton_kernels.multihead.launcher``: what the Triton kernels
and the CPU path (``triton_kernels.multihead.cpu``) are tested against.

- ``multihead_logits``: ``z[b] = Σ_i w[b,i] · W_i h[b]`` in float32.
- ``multihead_sample``: temperature ``T`` (0 = greedy; a float, or a float32 tensor with one
  value for every row or one per row), optional top-k truncation (the ``top_k``
  largest ``z/T``, ties to the lower vocabulary index), a draw from ``softmax`` over what is left,
  and the drawn token's log-probability under the *untruncated* ``log_softmax(z/T)`` (T=0 → T=1).
  The random stream here is torch's generator seeded from ``(seed, offset)``: same distribution as
  the kernel's Philox/Gumbel stream, not the same numbers.
"""
from __future__ import annotations

import torch

from triton_kernels.checks import check_finite_weights, check_out, check_projection, check_sampling


def multihead_logits(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden [B,d]``, ``heads [H,V,d]``, ``weights [B,H]`` → float32 logits ``[B,V]``."""
    check_projection(hidden, heads, weights)
    check_out(out, hidden, heads.shape[1])
    check_finite_weights(weights.detach().cpu())
    w = weights.float()
    h = hidden.float()
    z = torch.zeros(hidden.shape[0], heads.shape[1], dtype=torch.float32, device=hidden.device)
    for i in range(heads.shape[0]):
        z += w[:, i:i + 1] * (h @ heads[i].float().t())
    if out is None:
        return z
    return out.copy_(z)


def sampling_generator(seed: int | torch.Tensor, offset: int | torch.Tensor | None,
                        device: torch.device) -> torch.Generator:
    """The reference's random stream for ``(seed, offset)``: same distribution as the kernels'
    Philox/Gumbel stream, not the same numbers (the CPU path draws from it too)."""
    seed = int(seed.item()) if isinstance(seed, torch.Tensor) else seed
    if isinstance(offset, torch.Tensor):
        offset = int(offset.item())
    offset = 0 if offset is None else offset
    gen = torch.Generator(device=device)
    # One 63-bit seed per (seed, offset) pair, so a new offset gives a new, independent stream.
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset * 0xBF58476D1CE4E5B9) % (2**63))
    return gen


def top_k_mask(scaled: torch.Tensor, top_k: int) -> torch.Tensor:
    """Bool ``[B,V]``: the ``top_k`` largest entries per row, ties to the lower index."""
    order = torch.sort(scaled, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return torch.zeros_like(scaled, dtype=torch.bool).scatter_(1, order, True)


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                     seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``softmax(z/T)`` (top-k truncated if ``top_k > 0``).

    ``temperature``: a float, or a float32 tensor ``[]``/``[1]`` (every row) or ``[B]`` (per row).
    Returns ``(tokens int64 [B], logprobs float32 [B])``; logprobs are under the untruncated
    ``log_softmax(z/T)`` with T=0 read as T=1 (the row is then greedy).
    """
    check_sampling(temperature, top_k, seed, offset, hidden.device, hidden.shape[0])
    z = multihead_logits(hidden, heads, weights)
    if isinstance(temperature, torch.Tensor):
        t = temperature.reshape(-1, 1)  # [1, 1] (every row) or [B, 1]
        greedy = (t == 0)[:, 0]
        scaled = z / torch.where(greedy[:, None], 1.0, t)
    else:
        greedy = torch.tensor([temperature == 0], device=z.device)
        scaled = z / temperature if temperature > 0 else z
    logprobs = torch.log_softmax(scaled, dim=-1)
    tokens = torch.argmax(scaled, dim=-1)
    # A tensor's values stay on the device: every row draws, greedy rows keep their argmax.
    if isinstance(temperature, torch.Tensor) or temperature > 0:
        if 0 < top_k < scaled.shape[1]:
            scaled = scaled.masked_fill(~top_k_mask(scaled, top_k), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        gen = sampling_generator(seed, offset, hidden.device)
        drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
