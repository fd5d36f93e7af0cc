"""Pure-torch definition of the multi-head projection and sampling (the readable spec).

Same signatures as the launchers in ``triton_kernels.multihead.launcher``: what the Triton kernels
and the CPU path (``triton_kernels.multihead.cpu``) are tested against.

- ``multihead_logits``: ``z[b] = Σ_i w[b,i] · W_i h[b]`` in float32.
- ``multihead_sample``: the sampling semantics, in transformers' order (``TemperatureLogitsWarper``,
  ``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``), on ``s = z/T``:

  1. temperature ``T`` (0 = greedy; a float, or a float32 tensor with one value for every row or
     one per row);
  2. top-k (``top_k`` > 0): keep the ``top_k`` largest ``s`` (``top_k >= V`` keeps every token);
  3. top-p (``top_p`` < 1): rank what is left by ``s`` and keep each token whose *exclusive*
     prefix mass — the renormalised probability of the tokens ranked strictly above it — is
     ``< top_p`` (the smallest prefix whose mass reaches ``top_p``; the top token always stays;
     ``top_p = 1`` filters nothing);
  4. min-p (``min_p`` > 0): keep the tokens whose probability is ``>= min_p`` times the top
     token's, i.e. ``s >= max(s) + log(min_p)`` (top-k and top-p never drop the top token, and
     renormalising does not change a ratio, so this is the same relative to the filtered or the
     full distribution);

  ties in the ranking go to the lower vocabulary index; then a draw from ``softmax`` over what is
  left, and the drawn token's log-probability under the *untruncated* ``log_softmax(z/T)``
  (T=0 → T=1). ``top_p``/``min_p`` are numbers or float32 tensors like the temperature. The
  random stream here is torch's generator seeded from ``(seed, offset)``: same distribution as
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


def _per_row(value: float | torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """A number or a ``[]``/``[1]``/``[B]`` tensor as a float32 ``[B|1, 1]`` column."""
    return torch.as_tensor(value, dtype=torch.float32, device=scaled.device).reshape(-1, 1)


def top_p_mask(scaled: torch.Tensor, keep: torch.Tensor, top_p: float | torch.Tensor
               ) -> torch.Tensor:
    """``keep`` narrowed to the nucleus of the renormalised distribution over it: each kept token
    whose exclusive prefix mass (ranked by ``scaled``, ties to the lower index) is ``< top_p``;
    rows with ``top_p >= 1`` keep ``keep`` unchanged. Shared with ``triton_kernels.multihead.cpu`` so both
    give the same mask bit for bit."""
    p = _per_row(top_p, scaled)
    masked = scaled.masked_fill(~keep, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    ranked = torch.softmax(masked, dim=-1).gather(1, order)
    above = ranked.cumsum(-1) - ranked  # mass ranked strictly above each token
    nucleus = torch.zeros_like(keep).scatter_(1, order, above < p)
    return keep & (nucleus | (p >= 1))


def min_p_mask(scaled: torch.Tensor, min_p: float | torch.Tensor) -> torch.Tensor:
    """Bool ``[B,V]``: ``softmax(scaled) >= min_p · its max``, as ``scaled >= max + log(min_p)``
    (``min_p = 0`` keeps every token)."""
    return scaled >= scaled.amax(-1, keepdim=True) + torch.log(_per_row(min_p, scaled))


def filter_mask(scaled: torch.Tensor, top_k: int, top_p: float | torch.Tensor,
                min_p: float | torch.Tensor) -> torch.Tensor:
    """Bool ``[B,V]``: the tokens top-k, then top-p, then min-p leave (module docstring)."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < top_k < scaled.shape[1]:
        keep = top_k_mask(scaled, top_k)
    keep = top_p_mask(scaled, keep, top_p)
    return keep & min_p_mask(scaled, min_p)


def multihead_sample(hidden: torch.Tensor, heads: torch.Tensor, weights: torch.Tensor, *,
                     temperature: float | torch.Tensor = 1.0, top_k: int = 0,
                     top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                     seed: int | torch.Tensor = 0,
                     offset: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from ``softmax(z/T)`` filtered by top-k, top-p and min-p (module
    docstring for the order and the ties).

    ``temperature``/``top_p``/``min_p``: numbers, or float32 tensors ``[]``/``[1]`` (every row) or
    ``[B]`` (per row). Returns ``(tokens int64 [B], logprobs float32 [B])``; logprobs are under the
    untruncated ``log_softmax(z/T)`` with T=0 read as T=1 (the row is then greedy).
    """
    check_sampling(temperature, top_k, seed, offset, hidden.device, hidden.shape[0], top_p, min_p)
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
        scaled = scaled.masked_fill(~filter_mask(scaled, top_k, top_p, min_p), float("-inf"))
        probs = torch.softmax(scaled, dim=-1)
        gen = sampling_generator(seed, offset, hidden.device)
        drawn = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        tokens = torch.where(greedy, tokens, drawn)
    return tokens, logprobs.gather(1, tokens[:, None]).squeeze(1)
