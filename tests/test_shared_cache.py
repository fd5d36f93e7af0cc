"""The shared_prefix cache layout (`SharedPrefixCache`) and the decoder's cascade decode on it,
against the fork layout (every candidate slot holding its own copy of the prefix, plain SDPA
decode) and against a fresh prefill of the committed text."""
import pytest
import torch

from mahalo_engine.cache import KVCache
from mahalo_engine.ops import kv_fork, kv_promote
from mahalo_engine.layouts import SharedPrefixCache
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder

PROMPTS = [[5, 9, 17, 3, 8, 2, 11], [4, 4, 30, 12]]
K, MAX_LEN, STEP = 3, 40, 6


@pytest.fixture(scope="module")
def model():
    # Every model family runs this path in tests/test_engine_layouts.py.
    return load_decoder(tiny_checkpoint("qwen2"), dtype=torch.float32)


def _layouts(model):
    cfg, g = model.config, len(PROMPTS)
    fork = KVCache.allocate(cfg, g * K, MAX_LEN, dtype=torch.float32, device="cpu")
    first = torch.arange(g) * K
    model.prefill(fork, PROMPTS, first)
    kv_fork(fork.data, fork.lens, first.repeat_interleave(K - 1),
            torch.tensor([s for f in first.tolist() for s in range(f + 1, f + K)]))
    shared = SharedPrefixCache.allocate(cfg, g, K, MAX_LEN, STEP + 1, dtype=torch.float32,
                                        device="cpu")
    model.prefill(shared.prefix, PROMPTS, torch.arange(g))
    return fork, shared


def _decode_both(model, fork, shared, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    n = fork.num_slots
    for _ in range(steps):
        tok = torch.randint(0, model.config.vocab_size, (n,), generator=gen)
        h_fork = model.decode(fork, tok, slice(0, n))
        h_shared = model.decode_shared(shared, tok, slice(0, n))
        torch.testing.assert_close(h_shared, h_fork, rtol=1e-5, atol=1e-5)
        assert torch.equal(shared.lens, fork.lens)


def test_cascade_decode_equals_fork_decode_across_a_commit(model):
    fork, shared = _layouts(model)
    _decode_both(model, fork, shared, 4, seed=0)
    # Commit candidate 1 of group 0 and candidate 2 of group 1.
    winners, groups = torch.tensor([1, 5]), torch.tensor([0, 1])
    start = torch.tensor([len(p) for p in PROMPTS])
    kv_promote(fork.data, fork.lens, winners, torch.arange(2 * K).view(2, K), start)
    shared.commit(winners, groups)
    assert shared.suffix.lens.tolist() == [0] * (2 * K)
    assert shared.prefix.lens.tolist() == [len(p) + 4 for p in PROMPTS]
    _decode_both(model, fork, shared, 3, seed=1)


def test_committed_prefix_equals_a_fresh_prefill(model):
    _, shared = _layouts(model)
    steps = torch.tensor([[7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18], [1, 2, 3, 4, 5, 6],
                          [19, 20, 21, 22, 23, 24], [25, 26, 27, 28, 29, 30], [31, 1, 2, 3, 4, 5]])
    for j in range(3):  # a partial range: groups run whole, the padded candidates stay put
        model.decode_shared(shared, steps[:5, j], slice(0, 5))
    assert shared.suffix.lens.tolist() == [3, 3, 3, 3, 3, 0]
    shared.commit(torch.tensor([2, 4]), torch.tensor([0, 1]))
    committed = [PROMPTS[0] + steps[2, :3].tolist(), PROMPTS[1] + steps[4, :3].tolist()]
    fresh = KVCache.allocate(model.config, 2, MAX_LEN, dtype=torch.float32, device="cpu")
    model.prefill(fresh, committed, torch.arange(2))
    assert shared.prefix.lens.tolist() == fresh.lens.tolist()
    for g, ids in enumerate(committed):
        torch.testing.assert_close(shared.prefix.data[:, :, g, :, :len(ids)],
                                   fresh.data[:, :, g, :, :len(ids)], rtol=1e-5, atol=1e-5)


def test_move_and_memory_formula(model):
    fork, shared = _layouts(model)
    model.decode_shared(shared, torch.tensor([3] * (2 * K)), slice(0, 2 * K))
    shared.move(torch.tensor([1]), torch.tensor([0]))
    assert shared.prefix.lens.tolist() == [len(PROMPTS[1])] * 2
    assert shared.suffix.lens[:K].tolist() == [0] * K
    cfg = model.config
    per_pos = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * 4
    groups = len(PROMPTS)
    allocated = shared.prefix.data.nbytes + shared.suffix.data.nbytes
    assert allocated == groups * (MAX_LEN + K * (STEP + 1)) * per_pos
    assert SharedPrefixCache.nbytes(cfg, groups, K, MAX_LEN, STEP + 1, torch.float32) == \
        allocated + 4 * groups * (1 + K)


def test_decode_rejects_ranges_off_group_boundaries(model):
    _, shared = _layouts(model)
    with pytest.raises(ValueError, match="multiple of K=3"):
        model.decode_shared(shared, torch.tensor([1, 2]), slice(1, 3))
    with pytest.raises(ValueError, match="slot range"):
        model.decode_shared(shared, torch.tensor([1, 2]), torch.tensor([0, 1]))


def test_plain_decode_and_extend_name_the_shared_calls(model):
    _, shared = _layouts(model)
    with pytest.raises(ValueError, match="use decode_shared"):
        model.decode(shared, torch.tensor([1] * K), slice(0, K))
    with pytest.raises(ValueError, match="use extend_shared"):
        model.extend(shared, torch.tensor([[1]]), torch.tensor([1]), torch.tensor([0]))
