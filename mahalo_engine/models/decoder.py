"""The native decoder for the Llama / Mistral / Qwen2 / Qwen3 families, with three ways to run it:

- ``forward``: a full, differentiable pass without a cache (right padding, positions 0..T-1);
- ``extend`` / ``prefill``: append ragged chunks of tokens to chosen cache slots;
  ``extend_shared`` appends them to candidate slots of a `SharedPrefixCache` (a PRM scoring
  candidate steps), with cascade extend attention (the group's prefix read once for all its
  candidates' tokens, a causal mask over each candidate's own suffix);
- ``decode``: one token per chosen slot, each at its own position, attending over a host-given
  prefix ``[0, kv_len)`` of the cache; a contiguous slot range is read as a view, not gathered.
  On a `SharedPrefixCache` the token enters its candidate's suffix and attention is cascade
  attention (the group's prefix read once for its K candidates: ``triton_kernels.cascade``, which
  picks the device's implementation).
  Shapes depend only on the inputs' shapes and ``kv_len``, and indexing is done with index ops,
  so a decode step performs no host sync and can be captured in a CUDA graph.

Parameter names equal transformers' (``model.layers.{i}.self_attn.q_proj.weight``, ...), so the
state_dict is the Hugging Face checkpoint. All masks are built from positions with comparisons.
"""
from __future__ import annotations

import torch
from torch import nn

from mahalo_engine.cache import KVCache
from mahalo_engine.layouts import SharedPrefixCache
from triton_kernels.argcheck import is_int
from triton_kernels.cascade import cascade_decode_attention, cascade_extend_attention
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.layers.attention import Attend, Attention, KVUpdate
from mahalo_engine.layers.mlp import SwiGLU
from mahalo_engine.layers.rmsnorm import RMSNorm
from mahalo_engine.layers.rotary import Rotary
from mahalo_engine.utils.padding import pad_right


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.sliding = config.sliding_layers[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                masks: dict[bool, torch.Tensor | None], kv_update: KVUpdate | None,
                attend: Attend | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, masks[self.sliding], kv_update,
                               attend)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """The backbone (``model.*`` in checkpoints): embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = Rotary(config)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype (that of the embedding; every parameter shares it)."""
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def tie_weights(self) -> None:
        """Share lm_head's weight with the embedding when the config says so (call after re-materialising)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- masks ---------------------------------------------------------------------------------

    def _masks(self, q_pos: torch.Tensor, k_pos: torch.Tensor, k_valid: torch.Tensor | None,
               q_valid: torch.Tensor | None = None) -> dict[bool, torch.Tensor]:
        """Boolean masks ``{sliding: [B,1,T,Tk]}`` from query positions ``[B,T]``, key positions
        ``[Tk]`` and key validity ``[B,Tk]`` (None: all valid): causal, valid keys, and for sliding
        layers the last ``sliding_window`` positions only. Padded queries (``q_valid [B,T]`` False)
        also attend to key 0, so that no row is empty (SDPA would return NaN for it)."""
        causal = k_pos[None, None, :] <= q_pos[:, :, None]
        if k_valid is not None:
            causal = causal & k_valid[:, None, :]
        masks = {False: causal}
        if any(self.config.sliding_layers):
            window = k_pos[None, None, :] > q_pos[:, :, None] - self.config.sliding_window
            masks[True] = causal & window
        if q_valid is not None:
            padded = ~q_valid[:, :, None] & (k_pos == 0)[None, None, :]
            masks = {s: m | padded for s, m in masks.items()}
        return {s: m.unsqueeze(1) for s, m in masks.items()}

    def _run(self, input_ids: torch.Tensor, positions: torch.Tensor,
             masks: dict[bool, torch.Tensor | None],
             kv_update: KVUpdate | None, attend: Attend | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, masks, kv_update, attend)
        return self.model.norm(x)

    # -- no cache --------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Hidden states ``[B,T,d]`` after the final norm. ``attention_mask [B,T]``: 1 for real
        tokens, right padding only; hidden at padded positions is undefined."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            _check_right_padded(attention_mask, input_ids.shape)
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)[None, :]
        # Right padding never reaches a real token through a causal mask, so real positions need
        # no padding mask: plain causal attention (fused kernels), plus a window where layers slide.
        masks: dict[bool, torch.Tensor | None] = {False: None}
        if any(self.config.sliding_layers):
            masks[True] = self._masks(pos, pos[0], None)[True]
        return self._run(input_ids, pos, masks, None)

    # -- slot cache ------------------------------------------------------------------------------

    def _check_cache(self, cache: KVCache, op: str = "") -> None:
        if op and not isinstance(cache, KVCache):  # the shared-prefix storage has its own calls
            raise ValueError(f"{op} takes a KVCache; use {op}_shared for a "
                             f"{type(cache).__name__}")
        expected = KVCache.shape(self.config, cache.num_slots, cache.max_len)
        if tuple(cache.data.shape) != expected:
            raise ValueError(f"cache shape {tuple(cache.data.shape)} does not fit this model: "
                             f"expected {expected}")
        dtype = self.dtype
        if cache.dtype != dtype:
            raise TypeError(f"cache dtype {cache.dtype} differs from the model's {dtype}")

    @torch.no_grad()
    def extend(self, cache: KVCache, input_ids: torch.Tensor, num_new: torch.Tensor,
               slots: torch.Tensor) -> torch.Tensor:
        """Append ``num_new[n]`` tokens of row n (right-padded ``input_ids [N,T]``) to slot
        ``slots[n]`` at positions ``lens[slot]...``; returns hidden ``[N,T,d]`` (undefined at padded
        positions) and advances the slots' lens.

        Validates on the host (one sync): slots distinct and in range, 0 <= num_new <= T, and the
        new lengths within max_len. Padded tokens are not written to the cache.
        """
        self._check_cache(cache, "extend")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [N, T], got shape {tuple(input_ids.shape)}")
        n, t = input_ids.shape
        dev = cache.device
        slots = slots.to(device=dev, dtype=torch.long)
        num_new = num_new.to(device=dev, dtype=torch.long)
        if slots.shape != (n,) or num_new.shape != (n,):
            raise ValueError(f"slots {tuple(slots.shape)} and num_new {tuple(num_new.shape)} must "
                             f"both be [{n}] for input_ids {tuple(input_ids.shape)}")
        # Clamped so that an out-of-range slot is reported below instead of faulting on the device.
        start = cache.lens.index_select(0, slots.clamp(0, cache.num_slots - 1)).long()
        slot_list, new_list, start_list = torch.stack((slots, num_new, start)).tolist()  # the sync
        if len(set(slot_list)) != n or not all(0 <= s < cache.num_slots for s in slot_list):
            raise ValueError(f"slots must be distinct and in [0, {cache.num_slots}), got {slot_list}")
        bad = [(s, a, m) for s, a, m in zip(slot_list, start_list, new_list)
               if not 0 <= m <= t or a + m > cache.max_len]
        if bad:
            raise ValueError(f"extend: (slot, len, num_new) {bad} need 0 <= num_new <= {t} and "
                             f"len + num_new <= max_len={cache.max_len}")
        length = max(1, max(a + m for a, m in zip(start_list, new_list)))  # >= 1: no empty rows

        offs = torch.arange(t, device=dev)
        q_pos = start[:, None] + offs[None, :]  # [N,T]
        k_pos = torch.arange(length, device=dev)
        masks = self._masks(q_pos, k_pos, k_pos[None, :] < (start + num_new)[:, None],
                            q_valid=offs[None, :] < num_new[:, None])
        # Flat (row, t) indices of the real tokens, built on the host from the values checked above.
        rows = torch.tensor([r for r, m in enumerate(new_list) for _ in range(m)], device=dev,
                            dtype=torch.long)
        cols = torch.tensor([c for m in new_list for c in range(m)], device=dev, dtype=torch.long)
        w_slots, w_pos = slots[rows], q_pos[rows, cols]
        # Ascending contiguous slots (the engine's usual case) are read in place, not gathered:
        # a gather would copy every slot's whole prefix in every layer.
        first = slot_list[0]
        reads = slice(first, first + n) if slot_list == list(range(first, first + n)) else slots

        def kv_update(layer: int, k: torch.Tensor, v: torch.Tensor):
            cache.write(layer, w_slots, w_pos, k[rows, cols], v[rows, cols])
            return cache.read(layer, reads, length)

        hidden = self._run(input_ids.to(dev), q_pos, masks, kv_update)
        cache.lens.index_add_(0, slots, num_new.to(torch.int32))
        return hidden

    @torch.no_grad()
    def prefill(self, cache: KVCache, prompts: list[list[int]], slots: torch.Tensor | list[int]
                ) -> torch.Tensor:
        """Reset ``slots`` and encode one prompt into each; hidden ``[N,d]`` at each last token."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt and no empty prompt")
        dev = cache.device
        slots = torch.as_tensor(slots, dtype=torch.long, device=dev)
        if slots.shape != (len(prompts),):
            raise ValueError(f"{len(prompts)} prompts but slots has shape {tuple(slots.shape)}")
        lens = [len(p) for p in prompts]
        if max(lens) > cache.max_len:  # checked before the slots are reset
            raise ValueError(f"prompt lengths {lens} exceed the cache's max_len={cache.max_len}")
        ids, num_new = pad_right(prompts)
        num_new = num_new.to(dev)
        cache.reset(slots)
        hidden = self.extend(cache, ids.to(dev), num_new, slots)
        return hidden[torch.arange(len(prompts), device=dev), num_new - 1]

    @torch.no_grad()
    def decode(self, cache: KVCache, input_ids: torch.Tensor,
               slots: torch.Tensor | slice, advance: torch.Tensor | None = None, *,
               kv_len: int | None = None, check: bool = False) -> torch.Tensor:
        """One token per slot: ``input_ids [N]`` enters slot ``slots[n]`` at position
        ``lens[slot]``; returns hidden ``[N,d]``; ``lens[slot] += advance[n]`` (all when None).

        ``slots``: N distinct slot indices (a tensor), or a contiguous range ``slice(start,
        start + N)``, whose K/V are then read as a view of the cache instead of gathered (copied).
        ``kv_len``: attention covers positions ``[0, kv_len)`` only (None: max_len). The caller
        guarantees ``lens[slot] < kv_len <= max_len`` for every slot that advances; a slot that
        does not advance and breaks it still writes its K/V at ``lens[slot]``, but its hidden is
        undefined (finite). ``lens < max_len`` always.

        Graph-safe: no host sync, shapes fixed by ``(N, kv_len)``; so the contract is not checked
        unless ``check=True`` (host syncs: for eager debugging, never under graph capture).

        A `SharedPrefixCache` goes through `decode_shared` (the layout's cache picks the call:
        `mahalo_engine.layouts`).
        """
        self._check_cache(cache, "decode")
        n = input_ids.shape[0]
        kv_len = _kv_len(kv_len, cache.max_len)
        if isinstance(slots, slice):
            start, stop = _slot_range(slots, n, cache.num_slots)
            ids = torch.arange(start, stop, device=cache.device)
        else:
            ids = slots = slots.long()
        step = (torch.ones_like(ids, dtype=torch.int32) if advance is None
                else advance.to(torch.int32))
        if check:
            _check_decode(cache, ids, step, kv_len)
        pos = cache.lens.index_select(0, ids).long()  # [N]
        k_pos = torch.arange(kv_len, device=cache.device)
        masks = self._masks(pos[:, None], k_pos, None)  # causal = the slot's own length

        def kv_update(layer: int, k: torch.Tensor, v: torch.Tensor):
            cache.write(layer, ids, pos, k[:, 0], v[:, 0])
            return cache.read(layer, slots, kv_len)

        hidden = self._run(input_ids.reshape(n, 1), pos[:, None], masks, kv_update)
        cache.lens.index_add_(0, ids, step)
        return hidden[:, 0]


    def _check_shared_cache(self, cache: SharedPrefixCache) -> None:
        for part in (cache.prefix, cache.suffix):
            self._check_cache(part)
        window = self.config.sliding_window
        if any(self.config.sliding_layers) and window is not None and window < cache.max_len:
            raise ValueError(f"the shared_prefix layout has no sliding-window attention: "
                             f"sliding_window={window} < max_len={cache.max_len}; use the fork "
                             "layout for this model")

    @torch.no_grad()
    def extend_shared(self, cache: SharedPrefixCache, input_ids: torch.Tensor,
                      num_new: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """`extend` on the shared-prefix layout: candidate k of group ``groups[i]`` (slot
        ``groups[i]·K + k``) appends ``num_new[i, k]`` tokens of ``input_ids [G', K, T]``
        (right-padded) to its suffix, at absolute positions ``prefix.lens[g] + suffix.lens[slot]
        ...``; they attend the group's whole prefix and, causally, the candidate's suffix
        (cascade extend attention, ``triton_kernels.cascade``). Returns hidden ``[G', K, T, d]``
        (undefined at padded tokens) and advances the suffix lengths.

        Validates on the host (one sync): groups distinct and in range, ``0 <= num_new <= T``,
        suffixes within ``step_len`` and totals within ``max_len``.
        """
        self._check_shared_cache(cache)
        k = cache.k
        if input_ids.dim() != 3 or input_ids.shape[1] != k:
            raise ValueError(f"input_ids must be [G, K={k}, T], got shape "
                             f"{tuple(input_ids.shape)}")
        g, _, t = input_ids.shape
        dev = cache.device
        groups = groups.to(device=dev, dtype=torch.long)
        num_new = num_new.to(device=dev, dtype=torch.long)
        if groups.shape != (g,) or num_new.shape != (g, k):
            raise ValueError(f"groups {tuple(groups.shape)} and num_new {tuple(num_new.shape)} "
                             f"must be [{g}] and [{g}, {k}] for input_ids {tuple(input_ids.shape)}")
        safe = groups.clamp(0, cache.num_groups - 1)  # a bad group is reported below, not faulted
        slots = cache.candidate_slots(safe).reshape(-1)
        plen = cache.prefix.lens.index_select(0, safe)
        slen = cache.suffix.lens.index_select(0, slots).long()
        group_list, slot_list, new_list, plen_list, slen_list = (
            groups.tolist(), slots.tolist(), num_new.reshape(-1).tolist(),
            cache.per_candidate(plen).tolist(), slen.tolist())  # sync
        if len(set(group_list)) != g or not all(0 <= x < cache.num_groups for x in group_list):
            raise ValueError(f"groups must be distinct and in [0, {cache.num_groups}), got "
                             f"{group_list}")
        bad = [(s, p, a, m) for s, p, a, m in zip(slot_list, plen_list, slen_list, new_list)
               if not 0 <= m <= t or a + m > cache.step_len or p + a + m > cache.max_len]
        if bad:
            raise ValueError(f"extend_shared: (slot, prefix len, suffix len, num_new) {bad} need "
                             f"0 <= num_new <= {t}, suffix len + num_new <= step_len="
                             f"{cache.step_len} and the total <= max_len={cache.max_len}")
        n = len(slot_list)
        offs = torch.arange(t, device=dev)
        s_pos = slen[:, None] + offs[None, :]  # suffix positions [N, T]
        q_pos = cache.per_candidate(plen.long())[:, None] + s_pos  # absolute (rotary)
        rows = torch.tensor([r for r, m in enumerate(new_list) for _ in range(m)], device=dev,
                            dtype=torch.long)
        cols = torch.tensor([c for m in new_list for c in range(m)], device=dev, dtype=torch.long)
        w_slots, w_pos = slots[rows], s_pos[rows, cols]
        seen = (slen + num_new.reshape(-1)).view(g, k)
        # Contiguous ascending groups (the engine's usual case) are read as views, not gathered.
        first = group_list[0]
        if group_list == list(range(first, first + g)):
            p_reads, s_reads = slice(first, first + g), slice(slot_list[0], slot_list[0] + n)
        else:
            p_reads, s_reads = groups, slots
        kv_len = max(1, max(plen_list))  # a host bound on the prefix the kernel scans
        n_kv, hd, ts = self.config.num_key_value_heads, self.config.head_dim, cache.step_len

        def attend(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
            cache.suffix.write(layer, w_slots, w_pos, k_new[rows, cols], v_new[rows, cols])
            pk, pv = cache.prefix.read(layer, p_reads, kv_len)
            sk, sv = cache.suffix.read(layer, s_reads)
            o = cascade_extend_attention(q.view(g, k, t, -1, hd), pk, pv, plen,
                                         sk.view(g, k, n_kv, ts, hd), sv.view(g, k, n_kv, ts, hd),
                                         seen, num_new)
            return o.view(n, t, -1, hd)

        hidden = self._run(input_ids.reshape(n, t).to(dev), q_pos, {False: None, True: None}, None,
                           attend)
        cache.suffix.lens.index_add_(0, slots, num_new.reshape(-1).to(torch.int32))
        return hidden.view(g, k, t, -1)

    @torch.no_grad()
    def decode_shared(self, cache: SharedPrefixCache, input_ids: torch.Tensor, slots: slice,
                      advance: torch.Tensor | None = None, *, kv_len: int | None = None
                      ) -> torch.Tensor:
        """`decode` on the shared-prefix layout: token n enters candidate slot ``start + n`` at
        suffix position ``suffix.lens[slot]`` (absolute position: its group's prefix length plus
        that), and attends over the group's prefix ``[0, prefix.lens[g])`` (bounded by
        ``kv_len``) and its own suffix. ``slots = slice(start, start + N)`` with ``start`` a
        multiple of K; a partial last group runs whole (its extra candidates do not advance) so
        that every group's prefix is read once for all its candidates. Graph-safe like `decode`;
        the caller keeps active slots' suffix lengths below ``step_len``.
        """
        self._check_shared_cache(cache)
        n, k = input_ids.shape[0], cache.k
        if not isinstance(slots, slice):
            raise ValueError("decode on a SharedPrefixCache takes a slot range slice(start, "
                             f"start + N), got {type(slots).__name__}")
        start, _ = _slot_range(slots, n, cache.num_slots)
        kv_len = _kv_len(kv_len, cache.max_len)
        first, groups, m = cache.group_range(start, n)
        if start + m > cache.num_slots:
            raise ValueError(f"slots [{start}, {start + n}) end in a partial group past the "
                             f"cache's {cache.num_slots} candidate slots")
        dev = cache.device
        ids = torch.arange(start, start + m, device=dev)
        step = torch.zeros(m, dtype=torch.int32, device=dev)
        step[:n] = 1 if advance is None else advance.to(torch.int32)
        tokens = torch.zeros(m, dtype=input_ids.dtype, device=dev)
        tokens[:n] = input_ids
        plen = cache.prefix.lens[first:first + groups]
        slen = cache.suffix.lens[start:start + m].long()
        pos = cache.per_candidate(plen.long()) + slen  # absolute positions [m]
        seen = (slen + 1).view(groups, k)  # the new token included
        n_kv, hd = self.config.num_key_value_heads, self.config.head_dim
        ts = cache.step_len

        def attend(layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor):
            cache.suffix.write(layer, ids, slen, k_new[:, 0], v_new[:, 0])
            pk, pv = cache.prefix.read(layer, slice(first, first + groups), kv_len)
            sk, sv = cache.suffix.read(layer, slice(start, start + m))
            o = cascade_decode_attention(q.view(groups, k, -1, hd), pk, pv, plen,
                                         sk.view(groups, k, n_kv, ts, hd),
                                         sv.view(groups, k, n_kv, ts, hd), seen)
            return o.view(m, 1, -1, hd)

        hidden = self._run(tokens.reshape(m, 1), pos[:, None], {False: None, True: None}, None,
                           attend)
        cache.suffix.lens[start:start + m] += step
        return hidden[:n, 0]


def _slot_range(slots: slice, n: int, num_slots: int) -> tuple[int, int]:
    """``(start, stop)`` of a slot range for N tokens; ValueError unless it is ``slice(start,
    start + n)`` with ``0 <= start`` and ``start + n <= num_slots``."""
    start, stop = slots.start or 0, slots.stop
    if slots.step not in (None, 1) or not isinstance(start, int) or stop != start + n \
            or not 0 <= start <= num_slots - n:
        raise ValueError(f"slots {slots} must be a range slice(start, start + {n}) within the "
                         f"cache's {num_slots} slots for {n} input_ids")
    return start, stop


def _check_decode(cache: KVCache, ids: torch.Tensor, step: torch.Tensor, kv_len: int) -> None:
    """Host check of decode's contract (syncs): distinct slots in range, ``lens < max_len``, and
    ``lens < kv_len`` where the slot advances."""
    slot_list, adv = torch.stack((ids, step.long())).tolist()
    if len(set(slot_list)) != len(slot_list) or not all(0 <= s < cache.num_slots
                                                        for s in slot_list):
        raise ValueError(f"slots must be distinct and in [0, {cache.num_slots}), got {slot_list}")
    bad = [(s, m) for s, m, a in zip(slot_list, cache.lens[ids].tolist(), adv)
           if m >= cache.max_len or (a and m >= kv_len)]
    if bad:
        raise ValueError(f"decode: (slot, len) {bad} need len < max_len={cache.max_len} and, "
                         f"where the slot advances, len < kv_len={kv_len}")


def _check_right_padded(attention_mask: torch.Tensor, shape: torch.Size) -> None:
    """ValueError unless ``attention_mask`` is ``[B,T]`` of ones then zeros per row (one sync)."""
    if attention_mask.shape != shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(shape)}")
    m = attention_mask.to(torch.int8)
    if bool(((m != 0) & (m != 1)).any() | (m[:, 1:] > m[:, :-1]).any()):
        raise ValueError("attention_mask must be 0/1 with right padding only (ones, then zeros)")


def _kv_len(kv_len: int | None, max_len: int) -> int:
    """The attention width of a decode: ``kv_len``, or the whole cache (``max_len``) when None."""
    if kv_len is None:
        return max_len
    if not is_int(kv_len) or not 1 <= kv_len <= max_len:
        raise ValueError(f"kv_len must be an int in [1, max_len={max_len}], got {kv_len!r}")
    return kv_len
