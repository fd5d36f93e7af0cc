"""Slot layouts of step search: the one home of the group → slot arithmetic and of every event on
a cache laid out for K candidates per request, whichever model the cache serves (the policy's or a
scorer's).

Request group g runs its K candidates in candidate slots ``g*K .. g*K+K-1``; with ``beams=N``
(beam search) it keeps N partial solutions, beam b's K candidates in slots ``g*N*K + b*K ..
g*N*K + b*K + K-1`` (N*K = the layout's ``width``), and every per-group event below applies to
each beam of the group (a cache call sees each beam as one group of K slots). A `SlotLayout`
(`ForkLayout`, `SharedPrefixLayout`) maps groups to slots on the host, sizes a cache of its layout
and allocates it; the cache it returns (`ForkSlots` over a `KVCache`, `SharedPrefixSlots` over a
`SharedPrefixCache`) applies the slot events to its storage and makes the model's attention call
for its layout:

- ``admit``: prefill new requests' prompts; every candidate slot starts from the prompt;
- ``begin_step``: candidate slots start a new step from the committed text;
- ``decode`` / ``extend_steps``: one token per candidate slot (the policy's decode) / each
  candidate's step appended at once (a scorer's scoring pass);
- ``promote``: each continuing group's winner becomes the group's committed text; with beams,
  each new beam's source candidate (`SlotLayout.place_beams`: a survivor stays in its beam's
  slots where it can, the others, duplicates included, take the beams no survivor came from);
- ``move``: a live group's committed text moves to a lower, free group (compaction).

``fork`` keeps a full copy of the committed text in each of the K slots (promote copies only the
step's new tokens, `KVCache.promote`); ``shared_prefix`` keeps it once per group in a prefix slot
plus K step-sized candidate slots (cascade attention reads the prefix once for all K; a promote
appends the winner's step to the prefix, ``kv_append``). A promote is given both as
``(src, dst)`` slot pairs and per group (``winners``, ``groups``), plus the ``moves``: slot pairs
whose destination beam takes a survivor of another beam (one source slot feeding several beams when
a survivor is duplicated). A move reads a slot the ``(src, dst)`` pairs overwrite, so it is applied
first, in a launch of its own (fork: copy from the prompt's end, the text every slot of the request
shares, each cache knowing its own prompt length; shared_prefix: copy the source beam's prefix,
before the winners' steps are appended); no slot a launch writes is read by it (`place_beams` keeps
every source slot in a beam it keeps). Without moves (one beam, or no survivor leaving its beam) a
promote is one launch per cache.

Every event is index ops on device tensors of fixed shapes (graph-safe, no host sync), except
``admit`` and ``extend_steps``, which encode ragged token lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch

from mahalo_engine.cache import KVCache, available_bytes
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.utils.padding import pad_right
from triton_kernels.argcheck import check_int

T = TypeVar("T")


# -- the shared-prefix storage -------------------------------------------------------------------


@dataclass
class SharedPrefixCache:
    """The ``shared_prefix`` storage: request group g owns slot g of ``prefix`` (a `KVCache` of
    ``max_len`` positions: the committed text) and slots ``g*K .. g*K+K-1`` of ``suffix`` (a
    `KVCache` of ``step_len`` positions: each candidate's tokens of the current step). KV memory
    per request is ``max_len + K * step_len`` positions instead of the fork layout's
    ``K * max_len``. Candidate slot s = g*K + k has total length ``prefix.lens[g] +
    suffix.lens[s]`` (``lens``) and its tokens sit at those absolute positions (rotary)."""

    prefix: KVCache  # [L, 2, G, n_kv, max_len, hd]
    suffix: KVCache  # [L, 2, G*K, n_kv, step_len, hd]
    k: int  # candidates per group

    @property
    def num_groups(self) -> int:
        return self.prefix.num_slots

    @property
    def num_slots(self) -> int:
        """Candidate slots (``G * K``): what a decode step runs over."""
        return self.suffix.num_slots

    @property
    def max_len(self) -> int:
        """Total positions a candidate may reach (prefix + step)."""
        return self.prefix.max_len

    @property
    def step_len(self) -> int:
        return self.suffix.max_len

    @property
    def dtype(self) -> torch.dtype:
        return self.prefix.dtype

    @property
    def device(self) -> torch.device:
        return self.prefix.device

    @property
    def lens(self) -> torch.Tensor:
        """Total length of every candidate slot, int32 ``[G*K]`` (a new tensor: read-only)."""
        return self.per_candidate(self.prefix.lens) + self.suffix.lens

    @staticmethod
    def nbytes(config: ModelConfig, num_groups: int, k: int, max_len: int, step_len: int,
               dtype: torch.dtype) -> int:
        """Bytes of both caches: ``num_groups * (max_len + k * step_len)`` positions."""
        return KVCache.nbytes(config, num_groups, max_len, dtype) \
            + KVCache.nbytes(config, num_groups * k, step_len, dtype)

    @classmethod
    def allocate(cls, config: ModelConfig, num_groups: int, k: int, max_len: int, step_len: int,
                 *, dtype: torch.dtype, device: torch.device | str) -> "SharedPrefixCache":
        """Zeroed caches; ValueError (bytes needed/available) if both together cannot fit."""
        for name, value in (("num_groups", num_groups), ("k", k), ("step_len", step_len)):
            check_int(name, value, 1)
        need = cls.nbytes(config, num_groups, k, max_len, step_len, dtype)
        available = available_bytes(torch.device(device))
        if available is not None and need > available:
            raise ValueError(
                f"shared-prefix KV cache ({num_groups} groups x (max_len={max_len} + {k} x "
                f"step_len={step_len}) positions, {dtype}) needs {need:,} bytes but only "
                f"{available:,} bytes are free on {device}")
        prefix = KVCache.allocate(config, num_groups, max_len, dtype=dtype, device=device)
        suffix = KVCache.allocate(config, num_groups * k, step_len, dtype=dtype, device=device)
        return cls(prefix, suffix, k)

    # -- its slot arithmetic (used by the decoder's cascade calls too) --------------------------

    def candidate_slots(self, groups: torch.Tensor) -> torch.Tensor:
        """``[G', K]`` candidate slots of ``groups [G']``."""
        return groups.long()[:, None] * self.k + torch.arange(self.k, device=groups.device)

    def group_of(self, slots: torch.Tensor) -> torch.Tensor:
        """The group of each candidate slot."""
        return slots // self.k

    def per_candidate(self, per_group: torch.Tensor) -> torch.Tensor:
        """A per-group tensor ``[G', ...]`` repeated for each of its K candidates."""
        return per_group.repeat_interleave(self.k, dim=0)

    def group_range(self, start: int, n: int) -> tuple[int, int, int]:
        """``(first group, group count, their slot count)`` covering candidate slots ``[start,
        start + n)``, which must start at a group's first candidate; a partial last group counts
        whole."""
        if start % self.k:
            raise ValueError(f"slot range must start at a group's first candidate (a multiple of "
                             f"K={self.k}), got start={start}")
        groups = -(-n // self.k)
        return start // self.k, groups, groups * self.k

    # -- storage events (index tensors on the device; no host sync) ----------------------------

    def begin_step(self, slots: torch.Tensor) -> None:
        """Empty the suffixes of candidate ``slots`` (their stale K/V is overwritten later)."""
        self.suffix.reset(slots)

    def commit(self, winners: torch.Tensor, groups: torch.Tensor,
               moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """Append each winner candidate slot's step to its group's prefix (one launch), then empty
        the groups' suffixes. ``winners [G']`` candidate slots, ``groups [G']`` distinct.
        ``moves``: ``(src, dst, start)`` per group whose winner is of another group (a beam
        taking another beam's survivor): prefix ``dst`` first takes prefix ``src``'s positions
        ``[start, len)`` (one more launch: the append below reads the copied prefix, and its
        source is the suffix cache, not this one); ``dst`` groups are never a ``src``."""
        if moves is not None and moves[0].numel():
            self.prefix.promote(moves[0].long(), moves[1].long(), moves[2].long())
        self.prefix.append(self.suffix, winners.long(), groups.long())
        self.suffix.reset(self.candidate_slots(groups).reshape(-1))

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Group ``dst[i]`` takes over group ``src[i]``'s committed prefix (suffixes emptied)."""
        self.prefix.move(src.long(), dst.long())
        self.suffix.reset(self.candidate_slots(dst).reshape(-1))


# -- layouts: host-side arithmetic and sizing ------------------------------------------------------


@dataclass(frozen=True)
class SlotLayout:
    """How a cache holds K candidates per beam (``k``) and ``beams`` beams per request group
    (``width`` = beams * K slots; ``step_len``: the positions one step may take, for layouts that
    keep steps apart). Subclasses: `ForkLayout`, `SharedPrefixLayout`; `slot_layout` builds one
    by name."""

    k: int = 1
    step_len: int = 1
    beams: int = 1
    name: ClassVar[str] = ""

    @property
    def width(self) -> int:
        """Candidate slots per request group: ``beams * k``."""
        return self.beams * self.k

    def slots(self, groups: list[int]) -> torch.Tensor:
        """``[len(groups), beams*K]`` candidate slots (on the host), beam by beam."""
        w = self.width
        return torch.tensor(groups, dtype=torch.long)[:, None] * w + torch.arange(w)

    def span(self, groups: list[int]) -> int:
        """Slots ``[0, span)`` hold every candidate slot of ``groups``."""
        return (max(groups) + 1) * self.width

    def repeat(self, per_beam: list[T]) -> torch.Tensor:
        """Host values per beam ``[G'*beams]`` as a tensor per candidate slot ``[G'*beams*K]``."""
        return torch.tensor(per_beam).repeat_interleave(self.k)

    def num_groups(self, num_slots: int) -> int:
        return num_slots // self.width

    def num_slots(self, num_groups: int) -> int:
        return num_groups * self.width

    def move_pairs(self, moves: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Host ``(src, dst)`` slot pairs of ``(from group, to group)`` moves: every candidate
        slot of each beam of the destination takes that beam's committed text in the source
        group (from the beam's first slot)."""
        src = self.slots([h for h, _ in moves])[:, ::self.k]
        return (src.repeat_interleave(self.k, dim=1).reshape(-1),
                self.slots([f for _, f in moves]).reshape(-1))

    @staticmethod
    def place_beams(origins: list[int]) -> list[int]:
        """New beam of each survivor of a step, from ``origins[i]``, the beam survivor i (in rank
        order; a duplicated survivor appears once per copy) was a candidate of: in rank order,
        each survivor keeps its own beam if no better survivor kept it; the others take the
        beams no survivor kept, lowest first. So a beam any survivor came from is kept by one
        of them: a promote never writes a slot (fork) or prefix (shared_prefix) that another
        survivor is still to be copied from."""
        new = [-1] * len(origins)
        kept: set[int] = set()
        for i, b in enumerate(origins):
            if b not in kept:
                kept.add(b)
                new[i] = b
        free = iter(b for b in range(len(origins)) if b not in kept)
        return [b if b >= 0 else next(free) for b in new]

    def promote_index(self, sources: list[list[int]], groups: list[int]
                      ) -> tuple[torch.Tensor, tuple[int, int]]:
        """One host index for a promote: ``sources[i][b]`` is the candidate slot that beam b of
        group ``groups[i]`` continues from (`place_beams`). Concatenates ``src`` (a kept beam's
        source, once per other slot of the beam), ``dst`` (those slots), the moves' ``src`` and
        ``dst`` (every slot of a beam whose source is of another beam), the sources per beam
        (``winners``) and each beam's slots; returns it with the pair and move counts
        (`split_promote` takes it apart). ValueError if a source is not of its group."""
        k = self.k
        src, dst, msrc, mdst = [], [], [], []
        slots = self.slots(groups)
        for i, row in enumerate(sources):
            group_slots = slots[i].tolist()
            beam_slots = [group_slots[b * k:b * k + k] for b in range(self.beams)]
            if len(row) != self.beams or any(s not in group_slots for s in row):
                raise ValueError(f"winners {row} must be one candidate slot of each group per "
                                 f"beam: {self.beams} of group {groups[i]}'s slots "
                                 f"{group_slots}")
            for s, mine in zip(row, beam_slots):
                if s in mine:
                    others = [d for d in mine if d != s]
                    src += [s] * len(others)
                    dst += others
                else:
                    msrc += [s] * k
                    mdst += mine
        winners = [s for row in sources for s in row]
        index = torch.tensor(src + dst + msrc + mdst + winners, dtype=torch.long)
        return torch.cat((index, slots.reshape(-1))), (len(src), len(msrc))

    def split_promote(self, index: torch.Tensor, sizes: tuple[int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                 tuple[torch.Tensor, torch.Tensor]]:
        """``(src, dst, winners [B], groups [B, K], moves (src, dst))`` views of a
        `promote_index` (B = beams of the continuing groups; ``groups`` each beam's slots)."""
        p, m = sizes
        moves = (index[2 * p:2 * p + m], index[2 * p + m:2 * p + 2 * m])
        rest = index[2 * p + 2 * m:]
        b = rest.numel() // (self.k + 1)
        return index[:p], index[p:2 * p], rest[:b], rest[b:].view(b, self.k), moves

    def nbytes(self, config: ModelConfig, num_groups: int, max_len: int,
               dtype: torch.dtype) -> int:
        """Bytes `allocate` would take."""
        raise NotImplementedError

    def allocate(self, config: ModelConfig, num_groups: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> "LaidOutCache":
        raise NotImplementedError

    def holds(self, cache: "LaidOutCache | None", num_groups: int, max_len: int) -> bool:
        """Whether ``cache`` serves ``num_groups`` groups of this layout as it is (a larger cache
        does: a search with fewer requests or candidates after a bigger one reuses it)."""
        raise NotImplementedError

    def for_scorer(self, same_tokens: bool) -> "SlotLayout":
        """The layout a scorer's own cache takes when the policy's is this one; ``same_tokens``:
        whether the scorer is fed the policy's token ids."""
        return self


@dataclass(frozen=True)
class ForkLayout(SlotLayout):
    """Each of a group's K slots holds its own copy of the committed text (`KVCache`)."""

    name: ClassVar[str] = "fork"

    def nbytes(self, config: ModelConfig, num_groups: int, max_len: int,
               dtype: torch.dtype) -> int:
        return KVCache.nbytes(config, self.num_slots(num_groups), max_len, dtype)

    def allocate(self, config: ModelConfig, num_groups: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> "ForkSlots":
        return ForkSlots(KVCache.allocate(config, self.num_slots(num_groups), max_len,
                                          dtype=dtype, device=device))

    def holds(self, cache: "LaidOutCache | None", num_groups: int, max_len: int) -> bool:
        return isinstance(cache, ForkSlots) and cache.num_slots >= self.num_slots(num_groups) \
            and cache.max_len == max_len


@dataclass(frozen=True)
class SharedPrefixLayout(SlotLayout):
    """One prefix slot per group plus K candidate slots of ``step_len`` positions
    (`SharedPrefixCache`)."""

    name: ClassVar[str] = "shared_prefix"

    # The storage's groups are beams: one prefix slot per beam of each request.

    def nbytes(self, config: ModelConfig, num_groups: int, max_len: int,
               dtype: torch.dtype) -> int:
        return SharedPrefixCache.nbytes(config, num_groups * self.beams, self.k, max_len,
                                        self.step_len, dtype)

    def allocate(self, config: ModelConfig, num_groups: int, max_len: int, *,
                 dtype: torch.dtype, device: torch.device | str) -> "SharedPrefixSlots":
        return SharedPrefixSlots(SharedPrefixCache.allocate(
            config, num_groups * self.beams, self.k, max_len, self.step_len, dtype=dtype,
            device=device))

    def holds(self, cache: "LaidOutCache | None", num_groups: int, max_len: int) -> bool:
        return isinstance(cache, SharedPrefixSlots) and cache.storage.k == self.k \
            and cache.storage.num_groups >= num_groups * self.beams \
            and cache.max_len == max_len and cache.storage.step_len >= self.step_len

    def for_scorer(self, same_tokens: bool) -> SlotLayout:
        # A scorer that re-tokenises step texts may take more tokens for a step than a candidate
        # slot holds, so it forks; with one candidate there is no prefix to share.
        if self.k > 1 and same_tokens:
            return self
        return ForkLayout(self.k, self.step_len, self.beams)


FORK = ForkLayout()
LAYOUTS: dict[str, type[SlotLayout]] = {"fork": ForkLayout, "shared_prefix": SharedPrefixLayout}
CACHE_LAYOUTS = tuple(LAYOUTS)


def slot_layout(name: str, k: int = 1, step_len: int = 1, beams: int = 1) -> SlotLayout:
    """The layout called ``name`` (one of `CACHE_LAYOUTS`)."""
    if name not in LAYOUTS:
        raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}, got {name!r}")
    return LAYOUTS[name](k, step_len, beams)


# -- caches in a layout: the slot events and the attention call ------------------------------------


class LaidOutCache:
    """A cache's storage in a slot layout, with the events every cache of that layout goes
    through. ``slots`` arguments are int64 device tensors: ``[G', K]`` (each group's candidate
    slots; with beams each beam is such a group, except in ``admit``) or flat."""

    storage: Any

    @property
    def num_slots(self) -> int:
        return self.storage.num_slots

    @property
    def max_len(self) -> int:
        return self.storage.max_len

    @property
    def lens(self) -> torch.Tensor:
        """Each candidate slot's total length, int32 (read-only)."""
        return self.storage.lens

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def admit(self, model: Any, slots: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        """Encode prompt ``ids[i]`` as the committed text of every slot of ``slots[i]`` (a request
        group's ``beams * K`` slots, beam by beam); returns ``model``'s hidden state at the
        prompt's last token, per candidate slot ``[G'*beams*K, d]``."""
        raise NotImplementedError

    def begin_step(self, slots: torch.Tensor) -> None:
        """Candidate ``slots`` (flat) start a step from their committed text."""
        raise NotImplementedError

    def decode(self, model: Any, tokens: torch.Tensor, slots: slice,
               advance: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """``model``'s decode of one token per candidate slot of the range ``slots``."""
        raise NotImplementedError

    def extend_steps(self, model: Any, rows: list[list[int]], slots: torch.Tensor
                     ) -> tuple[list[int], torch.Tensor | None]:
        """Start a step on ``slots [G', K]`` and append candidate i's ``rows[i]`` (row-major) to
        its slot in one ``model`` pass. Returns the candidates that went in (those that are
        non-empty and fit ``max_len``) and ``model``'s hidden state at each one's last token."""
        self.begin_step(slots.reshape(-1))
        start = self._committed(slots)
        ok = [i for i, r in enumerate(rows) if r and int(start[i]) + len(r) <= self.max_len]
        return ok, (self._extend(model, rows, ok, slots) if ok else None)

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Non-winning slot ``dst[p]`` takes the committed text of ``src[p]``, its group's winner;
        equally: group ``groups[i] [K]`` commits ``winners[i]`` (`Scorer.promote`'s event).
        ``moves`` ``(src, dst)``: every slot of a group (beam) whose winner is another group's
        candidate of the same request (`SlotLayout.promote_index`); applied first."""
        raise NotImplementedError

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Slot ``dst[p]`` takes the committed text of slot ``src[p]`` (`SlotLayout.move_pairs`:
        whole groups, between steps)."""
        raise NotImplementedError

    def _committed(self, slots: torch.Tensor) -> torch.Tensor:
        """Host lengths of the committed text of each slot of ``slots [G', K]``, flat."""
        raise NotImplementedError

    def _extend(self, model: Any, rows: list[list[int]], ok: list[int],
                slots: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ForkSlots(LaidOutCache):
    """The fork layout over a `KVCache`: every candidate slot holds its own copy of the committed
    text. ``committed``: each slot's length when its step began; ``prompt``: its request's prompt
    length, the text every slot of a request shares (buffers for the cache's life: a promote
    captured in a CUDA graph reads them there)."""

    def __init__(self, storage: KVCache) -> None:
        self.storage = storage
        self.committed = torch.zeros_like(storage.lens)
        self.prompt = torch.zeros_like(storage.lens)

    def admit(self, model: Any, slots: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        first = slots[:, 0]
        hidden = model.prefill(self.storage, ids, first)
        k = slots.shape[1]
        if k > 1:
            self.storage.fork(first.repeat_interleave(k - 1), slots[:, 1:].reshape(-1))
        flat = slots.reshape(-1)
        self.prompt.index_copy_(0, flat, self.storage.lens.index_select(0, flat))
        return hidden.repeat_interleave(k, dim=0)

    def begin_step(self, slots: torch.Tensor) -> None:
        self.committed.copy_(self.storage.lens)

    def decode(self, model: Any, tokens: torch.Tensor, slots: slice,
               advance: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        return model.decode(self.storage, tokens, slots, advance=advance, kv_len=kv_len)

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if moves is not None and moves[0].numel():
            # A beam taking another beam's survivor shares only the prompt with it. A launch of
            # its own, before the pairs below: they may overwrite a slot it copies from (a
            # survivor that left its beam), and one launch's pairs must not read what it writes.
            self.storage.promote(moves[0], moves[1], self.prompt.index_select(0, moves[1]).long())
        if src.numel():  # with one candidate the slot already is its own winner
            # Every slot of a group held the same text when the step began: only the winner's
            # step is copied.
            self.storage.promote(src, dst, self.committed.index_select(0, src).long())

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.storage.move(src, dst)
        self.prompt.index_copy_(0, dst, self.prompt.index_select(0, src))

    def _committed(self, slots: torch.Tensor) -> torch.Tensor:
        return self.committed.index_select(0, slots.reshape(-1)).cpu()

    def _extend(self, model: Any, rows: list[list[int]], ok: list[int],
                slots: torch.Tensor) -> torch.Tensor:
        dev = self.device
        ids, num_new = pad_right([rows[i] for i in ok])
        num_new = num_new.to(dev)
        sel = torch.tensor(ok, device=dev)
        hidden = model.extend(self.storage, ids.to(dev), num_new, slots.reshape(-1)[sel])
        return hidden[torch.arange(len(ok), device=dev), num_new - 1]


class SharedPrefixSlots(LaidOutCache):
    """The shared-prefix layout over a `SharedPrefixCache`: a group's committed text once, its K
    candidates' steps apart; cascade attention reads the prefix once per group. ``prompt``: each
    prefix's prompt length (with beams, what a request's prefixes share)."""

    def __init__(self, storage: SharedPrefixCache) -> None:
        self.storage = storage
        self.prompt = torch.zeros_like(storage.prefix.lens)

    def admit(self, model: Any, slots: torch.Tensor, ids: list[list[int]]) -> torch.Tensor:
        k, width = self.storage.k, slots.shape[1]
        first = self.storage.group_of(slots[:, 0])
        hidden = model.prefill(self.storage.prefix, ids, first)
        if width > k:  # every beam's prefix holds the prompt: encoded once, then copied
            self.storage.prefix.fork(first.repeat_interleave(width // k - 1),
                                     self.storage.group_of(slots[:, k::k]).reshape(-1))
        prefixes = self.storage.group_of(slots[:, ::k]).reshape(-1)
        self.prompt.index_copy_(0, prefixes, self.storage.prefix.lens.index_select(0, prefixes))
        self.storage.begin_step(slots.reshape(-1))
        return hidden.repeat_interleave(width, dim=0)

    def begin_step(self, slots: torch.Tensor) -> None:
        self.storage.begin_step(slots)

    def decode(self, model: Any, tokens: torch.Tensor, slots: slice,
               advance: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        return model.decode_shared(self.storage, tokens, slots, advance, kv_len=kv_len)

    def extend_steps(self, model: Any, rows: list[list[int]], slots: torch.Tensor
                     ) -> tuple[list[int], torch.Tensor | None]:
        if slots.shape[1] != self.storage.k:
            raise ValueError(f"{slots.shape[1]} candidates per request, but the shared-prefix "
                             f"cache was allocated for K={self.storage.k}")
        long = [i for i, r in enumerate(rows) if len(r) > self.storage.step_len]
        if long:  # the policy's steps are capped below step_len: this is a caller's bug
            raise ValueError(f"candidates {long} have more than step_len="
                             f"{self.storage.step_len} tokens")
        return super().extend_steps(model, rows, slots)

    def promote(self, src: torch.Tensor, dst: torch.Tensor, winners: torch.Tensor,
                groups: torch.Tensor,
                moves: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        k = self.storage.k
        if moves is not None:  # per group (beam): its first slot's pair
            to = self.storage.group_of(moves[1][::k])
            moves = (self.storage.group_of(moves[0][::k]), to, self.prompt.index_select(0, to))
        self.storage.commit(winners, self.storage.group_of(groups[:, 0]), moves)

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        k = self.storage.k
        src, dst = self.storage.group_of(src[::k]), self.storage.group_of(dst[::k])
        self.storage.move(src, dst)
        self.prompt.index_copy_(0, dst, self.prompt.index_select(0, src))

    def _committed(self, slots: torch.Tensor) -> torch.Tensor:
        groups = self.storage.group_of(slots[:, 0])
        return self.storage.per_candidate(self.storage.prefix.lens.index_select(0, groups).cpu())

    def _extend(self, model: Any, rows: list[list[int]], ok: list[int],
                slots: torch.Tensor) -> torch.Tensor:
        dev, (g, k) = self.device, slots.shape
        width = max(len(rows[i]) for i in ok)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        num_new = torch.zeros(len(rows), dtype=torch.long)
        for i in ok:
            ids[i, : len(rows[i])] = torch.as_tensor(rows[i])
            num_new[i] = len(rows[i])
        hidden = model.extend_shared(self.storage, ids.view(g, k, width).to(dev),
                                     num_new.view(g, k), self.storage.group_of(slots[:, 0]))
        sel = torch.tensor(ok)
        return hidden.reshape(len(rows), width, -1)[sel.to(dev), (num_new[sel] - 1).to(dev)]
