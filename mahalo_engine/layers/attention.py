"""Grouped-query self-attention over torch SDPA, with optional q/k RMSNorm (Qwen3) and biases.

GQA is handled per query length, so that no path pays for a large copy:
- one new token per sequence (decode): the G query heads sharing a KV head are folded into SDPA's
  query axis (a free view), so K/V are read as stored, never expanded;
- several tokens: K/V heads are expanded G-fold (``[B, H, Tk, hd]``, small next to a
  ``[B, H, T, Tk]`` score matrix) so SDPA's fused kernels apply, with ``is_causal`` when no mask
  is given and a boolean mask (True = attend) broadcast over heads otherwise.
Where K/V come from is the caller's business (``kv_update``): the new tokens alone (plain forward)
or a slot cache the new K/V were just written into. A caller whose cache is not one K/V tensor per
sequence (the shared-prefix layout) passes ``attend`` instead: it stores the new K/V and returns
the attention output itself (cascade attention).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.layers.rmsnorm import RMSNorm
from mahalo_engine.layers.rotary import apply_rotary

# (layer index, k [B,T,n_kv,hd], v [B,T,n_kv,hd]) -> (k, v) as [B, n_kv, Tk, hd] to attend over;
# any strides with a unit last one (SDPA takes strided inputs): e.g. a view into the slot cache.
KVUpdate = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (layer index, q [B,T,H,hd], k [B,T,n_kv,hd], v [B,T,n_kv,hd]) -> attention output [B,T,H,hd]
# (q and k after rotary/norm): stores the new K/V and attends in the caller's own way.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """One new token per sequence: ``q [B,1,H,hd]`` over ``k/v [B,n_kv,Tk,hd]`` (any strides with
    a unit last one: a view of the slot cache), ``mask [B|1,1,1,Tk]`` bool or None →
    ``[B,n_kv,G,hd]``. The G query heads sharing a KV head (head h = kv * G + g, transformers'
    repeat_kv order) are folded onto SDPA's query axis, a free view: K/V are read as stored."""
    b, _, h, hd = q.shape
    n_kv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(b, n_kv, h // n_kv, hd), k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.groups = config.num_kv_groups
        self.head_dim = hd = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(hd, config.rms_norm_eps)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None, kv_update: KVUpdate | None = None,
                attend: Attend | None = None) -> torch.Tensor:
        """x ``[B,T,d]``, cos/sin ``[B|1,T,hd]``, mask ``[B|1,1,T,Tk]`` bool or None (= causal
        over the T new tokens alone) → ``[B,T,d]``."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if attend is not None:
            o = attend(self.layer_idx, q, k, v)
            return self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim))
        if kv_update is None:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = kv_update(self.layer_idx, k, v)
        if t == 1:
            o = decode_attention(q, k, v, mask)
        else:
            if self.groups > 1:
                k = k.repeat_interleave(self.groups, dim=1)
                v = v.repeat_interleave(self.groups, dim=1)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                               is_causal=mask is None)
            o = o.transpose(1, 2)
        return self.o_proj(o.reshape(b, t, self.n_heads * self.head_dim))
