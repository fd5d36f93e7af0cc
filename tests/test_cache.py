"""The slot KV cache: ragged prefill, decode in any subset of slots, extend over a prefix and
non-advancing decode all reproduce a plain forward; decode over a contiguous slot range and a
bounded prefix (``kv_len``) equals the gathered full-length decode, and the engine's decode loop
uses it; decode is graph-safe; sizes and errors."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mahalo_engine.cache import KVCache
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder

FAMILIES = {
    "qwen2": ("qwen2", {}),
    "qwen3-headdim-gqa4": ("qwen3", dict(head_dim=24, num_key_value_heads=1)),
    "mistral-sliding": ("mistral", dict(num_heads=8, num_key_value_heads=2, sliding_window=5)),
}


def sequences(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 512, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("slot_ids", [[4, 0, 2], [1, 2, 3]], ids=["scattered", "range"])
@pytest.mark.parametrize("case", list(FAMILIES))
def test_prefill_decode_extend_reproduce_forward(case, slot_ids):
    family, kw = FAMILIES[case]
    path = tiny_checkpoint(family, **kw)
    model = load_decoder(path)
    ref_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache = KVCache.allocate(model.config, 6, 48, dtype=torch.float32, device="cpu")
    seqs = sequences(0, [34, 26, 30])
    # not in order and not contiguous (gathered reads), or an ascending range (read in place)
    slots = torch.tensor(slot_ids)
    cur = [9, 2, 14]  # ragged prompts
    got: list[dict[int, torch.Tensor]] = [{} for _ in seqs]

    h = model.prefill(cache, [s[:n] for s, n in zip(seqs, cur)], slots)
    for i in range(3):
        got[i][cur[i] - 1] = h[i]
    assert cache.lens[slots].tolist() == cur

    def decode(rows: list[int]):
        ids = torch.tensor([seqs[i][cur[i]] for i in rows])
        out = model.decode(cache, ids, slots[rows])
        for j, i in enumerate(rows):
            got[i][cur[i]] = out[j]
            cur[i] += 1

    for _ in range(4):  # N decode steps over all slots
        decode([0, 1, 2])
    decode([2, 0])  # subsets, in any order
    decode([1])

    new = [5, 1, 3]  # ragged extend over the existing prefixes
    ids = torch.zeros(3, 5, dtype=torch.long)
    for i in range(3):
        ids[i, : new[i]] = torch.tensor(seqs[i][cur[i]: cur[i] + new[i]])
    out = model.extend(cache, ids, torch.tensor(new), slots)
    for i in range(3):
        for t in range(new[i]):
            got[i][cur[i] + t] = out[i, t]
        cur[i] += new[i]
    decode([0, 1, 2])  # and decode again after the extend
    assert cache.lens[slots].tolist() == cur
    others = [s for s in range(6) if s not in slot_ids]
    assert cache.lens[others].tolist() == [0, 0, 0]

    for i, s in enumerate(seqs):
        ids = torch.tensor([s[: cur[i]]])
        with torch.no_grad():
            full = model(ids)[0]
            ref_logits = ref_model(input_ids=ids).logits[0]
        pos = sorted(got[i])
        hidden = torch.stack([got[i][p] for p in pos])
        torch.testing.assert_close(hidden, full[pos], rtol=0, atol=2e-5)
        logits = model.lm_head(hidden)
        err = (logits - ref_logits[pos]).abs().max() / ref_logits[pos].abs().max()
        assert err <= 1e-4


def test_decode_without_advance_keeps_length():
    """advance=False leaves lens alone, and the next token overwrites the tentative one."""
    model = load_decoder(tiny_checkpoint("qwen2"))
    cache = KVCache.allocate(model.config, 2, 16, dtype=torch.float32, device="cpu")
    a, b = sequences(1, [7, 7])
    slots = torch.tensor([1, 0])
    model.prefill(cache, [a[:5], b[:3]], slots)
    junk = torch.tensor([11, 12])
    model.decode(cache, junk, slots, advance=torch.tensor([False, True]))
    assert cache.lens.tolist() == [4, 5]
    out = model.decode(cache, torch.tensor([a[5], b[4]]), slots)  # b's junk became its 4th token
    with torch.no_grad():
        ref_a = model(torch.tensor([a[:6]]))[0, -1]
        ref_b = model(torch.tensor([b[:3] + [12, b[4]]]))[0, -1]
    torch.testing.assert_close(out, torch.stack([ref_a, ref_b]), rtol=0, atol=2e-5)


@pytest.mark.parametrize("case", list(FAMILIES))
def test_range_decode_over_a_bounded_prefix_equals_the_gathered_full_read(case):
    """slots=slice + kv_len (K/V viewed in place, attention over [0, kv_len)) against the gathered
    full-length decode (itself checked against transformers above): same hidden, same cache."""
    family, kw = FAMILIES[case]
    model = load_decoder(tiny_checkpoint(family, **kw))
    full, bounded = (KVCache.allocate(model.config, 6, 64, dtype=torch.float32, device="cpu")
                     for _ in range(2))
    slots = torch.tensor([1, 2, 3, 4])
    for cache in (full, bounded):
        model.prefill(cache, sequences(3, [2, 13, 7, 20]), slots)  # ragged
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        ids = torch.randint(0, 512, (4,), generator=g)
        advance = torch.tensor([True, step % 2 == 0, True, step < 3])
        kv_len = int(bounded.lens[1:5].max()) + 1  # the tightest legal bound
        ref = model.decode(full, ids, slots, advance)
        got = model.decode(bounded, ids, slice(1, 5), advance, kv_len=kv_len, check=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert torch.equal(bounded.lens, full.lens) and bounded.lens.tolist() == [0, 8, 16, 13, 23, 0]
    torch.testing.assert_close(bounded.data, full.data, rtol=0, atol=1e-5)
    # The bound matters: one position short, the longest slot misses its own new token.
    ids = torch.tensor([5, 6, 7, 8])
    short = int(bounded.lens[1:5].max())
    with pytest.raises(ValueError, match=rf"\(slot, len\) \[\(4, 23\)\].*len < kv_len={short}"):
        model.decode(bounded, ids, slice(1, 5), kv_len=short, check=True)
    saved = (bounded.data.clone(), bounded.lens.clone())
    bad = model.decode(bounded, ids, slice(1, 5), kv_len=short)
    bounded.data.copy_(saved[0]), bounded.lens.copy_(saved[1])
    good = model.decode(bounded, ids, slice(1, 5), kv_len=short + 1)
    torch.testing.assert_close(bad[:3], good[:3], rtol=0, atol=1e-5)
    assert (bad[3] - good[3]).abs().max() > 1e-3


def test_engine_decode_loop_reads_a_growing_bounded_prefix(monkeypatch):
    """Greedy generation and step search long enough to cross kv_len buckets: the runner's decode
    steps read slot ranges over power-of-two prefixes shorter than the cache, each advancing slot
    inside its prefix, and every generated token is still the argmax of a full forward over the
    text so far, with its log-prob; search (one candidate, greedy) gives the same tokens."""
    from mahalo_engine.engine import Engine, SearchConfig
    from mahalo_engine.engine.engine import GENERATE_CHECK_EVERY as C
    from mahalo_engine.policy import load_policy

    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    model, seen = policy.model, []
    real_decode = model.decode

    def decode(cache, input_ids, slots, advance=None, *, kv_len=None):
        assert isinstance(slots, slice) and slots.start == 0
        seen.append((kv_len, int((cache.lens[slots] * advance).max())))
        return real_decode(cache, input_ids, slots, advance, kv_len=kv_len)

    monkeypatch.setattr(model, "decode", decode)
    engine = Engine(policy, max_batch=2, max_seq_len=300)  # the cache holds 301 positions
    prompts = sequences(5, [60 - C, 30])  # C steps fit in 64 positions, 2C do not
    gens = engine.generate(prompts, temperature=0, max_new_tokens=2 * C)
    assert [k for k, _ in seen] == [64] * C + [128] * C
    assert all(n < k for k, n in seen)
    for p, gen in zip(prompts, gens):
        seq = torch.tensor([p + gen.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(policy.logits(seq)[0, len(p) - 1:-1], dim=-1)
        chosen = logp[torch.arange(len(gen.token_ids)), gen.token_ids]
        assert (chosen >= logp.max(dim=-1).values - 1e-4).all()  # greedy, up to exact ties
        torch.testing.assert_close(torch.tensor(gen.logprobs), chosen, rtol=0, atol=1e-4)

    seen.clear()  # search: each step's run starts from the committed lengths
    config = SearchConfig(candidates=1, temperature=0, max_step_tokens=5, check_every=3,
                          max_new_tokens=2 * C)
    found = engine.search(prompts, config=config)
    assert {k for k, _ in seen} == {64, 128} and all(n < k for k, n in seen)
    assert [r.token_ids for r in found] == [g.token_ids for g in gens]


def test_decode_is_graph_safe():
    """Decode on the meta device: any host sync (.item/.tolist), nonzero/masked_select or other
    data-dependent shape raises there, since meta tensors hold no data. Extend does sync."""
    config = ModelConfig.from_pretrained(
        tiny_checkpoint("mistral", num_heads=8, num_key_value_heads=2, sliding_window=5))
    with torch.device("meta"):
        model = Decoder(config)
        cache = KVCache(torch.empty(KVCache.shape(config, 4, 32)), torch.zeros(4, dtype=torch.int32))
        ids, slots = torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        hidden = model.decode(cache, ids, slots, advance=torch.ones(3, dtype=torch.bool))
        assert hidden.shape == (3, config.hidden_size)
        hidden = model.decode(cache, ids, slice(1, 4), advance=torch.ones(3, dtype=torch.bool),
                              kv_len=16)  # the in-place view over a bounded prefix
        assert hidden.shape == (3, config.hidden_size)
        with pytest.raises(NotImplementedError):  # the host check does sync
            model.decode(cache, ids, slice(1, 4), kv_len=16, check=True)
        with pytest.raises(NotImplementedError):
            model.extend(cache, ids[:, None], torch.ones(3, dtype=torch.long), slots)


@pytest.mark.gpu
@pytest.mark.parametrize("contiguous", [False, True])
def test_decode_replays_in_a_cuda_graph(contiguous):
    model = load_decoder(tiny_checkpoint("qwen2"), device="cuda")
    cache = KVCache.allocate(model.config, 4, 64, dtype=torch.float32, device="cuda")
    slots = torch.tensor([1, 2] if contiguous else [3, 1], device="cuda")
    # The range form reads K/V in place over a prefix that the 3 replays below stay inside.
    read, kv_len = (slice(1, 3), 16) if contiguous else (slots, None)
    prompts = sequences(2, [9, 5])
    model.prefill(cache, prompts, slots)
    ids = torch.tensor([7, 8], device="cuda")
    saved = cache.lens.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up outside capture
            model.decode(cache, ids, read, kv_len=kv_len)
    torch.cuda.current_stream().wait_stream(stream)
    cache.lens.copy_(saved)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = model.decode(cache, ids, read, kv_len=kv_len)
    cache.lens.copy_(saved)
    expect = []
    for tokens in ([7, 8], [20, 21], [5, 6]):
        ids.copy_(torch.tensor(tokens))
        graph.replay()
        expect.append(out.clone())
    assert cache.lens[slots].tolist() == [12, 8]
    for i, p in enumerate(prompts):
        seq = p + [tok[i] for tok in ([7, 8], [20, 21], [5, 6])]
        with torch.no_grad():
            full = model(torch.tensor([seq], device="cuda"))[0]
        torch.testing.assert_close(torch.stack([e[i] for e in expect]), full[-3:], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_available_bytes_counts_blocks_cached_by_torch():
    """Memory torch's allocator holds but does not use (e.g. left by checkpoint loading) is free
    for the cache: the driver reports it as used, available_bytes must not."""
    from mahalo_engine.cache import available_bytes

    device = torch.device("cuda", torch.cuda.current_device())
    block = 512 * 2**20
    x = torch.empty(block, dtype=torch.uint8, device=device)
    del x  # back to torch's cache, not to the driver
    free, _ = torch.cuda.mem_get_info(device)
    assert available_bytes(device) >= free + block
    torch.cuda.empty_cache()


def test_nbytes_and_allocation_errors():
    config = ModelConfig.from_pretrained(tiny_checkpoint("qwen3", head_dim=24, num_key_value_heads=1))
    cache = KVCache.allocate(config, 3, 20, dtype=torch.bfloat16, device="cpu")
    assert cache.data.shape == (2, 2, 3, 1, 20, 24) and cache.lens.dtype == torch.int32
    assert (cache.num_slots, cache.max_len) == (3, 20)
    assert KVCache.nbytes(config, 3, 20, torch.bfloat16) == cache.data.nbytes + cache.lens.nbytes
    assert torch.count_nonzero(cache.data) == 0  # zeroed: stale positions are always finite
    huge = 1 << 40
    need = KVCache.nbytes(config, huge, 20, torch.float32)
    with pytest.raises(ValueError, match=f"needs {need:,} bytes .* only [0-9,]+ bytes .* free"):
        KVCache.allocate(config, huge, 20, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="num_slots"):
        KVCache.allocate(config, 0, 20, dtype=torch.float32, device="cpu")
    with pytest.raises(TypeError, match="floating"):
        KVCache.allocate(config, 1, 20, dtype=torch.int32, device="cpu")


def test_cache_misuse_errors():
    model = load_decoder(tiny_checkpoint("qwen2"))
    cache = KVCache.allocate(model.config, 2, 8, dtype=torch.float32, device="cpu")
    model.prefill(cache, [list(range(6))], [1])
    with pytest.raises(ValueError, match=r"prompt lengths \[2, 9\] exceed the cache's max_len=8"):
        model.prefill(cache, [[1, 2], list(range(9))], [0, 1])
    assert cache.lens.tolist() == [0, 6]  # nothing was reset
    with pytest.raises(ValueError, match=r"\(slot, len, num_new\) \[\(1, 6, 3\)\].*max_len=8"):
        model.extend(cache, torch.zeros(1, 3, dtype=torch.long), torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(ValueError, match="distinct"):
        model.extend(cache, torch.zeros(2, 1, dtype=torch.long), torch.tensor([1, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="distinct and in"):
        model.extend(cache, torch.zeros(1, 1, dtype=torch.long), torch.tensor([1]), torch.tensor([2]))
    ids = torch.zeros(2, dtype=torch.long)
    for bad in (slice(1, 3), slice(0, 1), slice(0, 2, 2), slice(-1, 1)):
        with pytest.raises(ValueError, match=r"must be a range slice\(start, start \+ 2\) within "
                                             r"the cache's 2 slots"):
            model.decode(cache, ids, bad)
    for bad in (0, 9, 4.0, True):
        with pytest.raises(ValueError, match=rf"kv_len must be an int in \[1, max_len=8\], got {bad}"):
            model.decode(cache, ids, slice(0, 2), kv_len=bad)
    with pytest.raises(ValueError, match=r"distinct and in \[0, 2\), got \[1, 1\]"):
        model.decode(cache, ids, torch.tensor([1, 1]), check=True)
    with pytest.raises(ValueError, match=r"\(slot, len\) \[\(1, 6\)\] need len < max_len=8"):
        model.decode(cache, ids, slice(0, 2), kv_len=6, check=True)
    assert cache.lens.tolist() == [0, 6]  # nothing was decoded
    with pytest.raises(TypeError, match="cache dtype torch.bfloat16"):
        other = KVCache.allocate(model.config, 2, 8, dtype=torch.bfloat16, device="cpu")
        model.decode(other, torch.zeros(1, dtype=torch.long), torch.tensor([0]))
