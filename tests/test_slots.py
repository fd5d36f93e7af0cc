"""The request owner's batched promote (`engine.requests.Requests`, through the fork layout's
caches, `mahalo_engine.layouts`) against a dense reference written with plain tensor indexing:
policy cache contents and lengths, the decode runner's hidden states and a PRM scorer's cache
after each promote, over several steps with varying group counts. On CUDA (`gpu`), repeated
shapes replay the promote's CUDA graph and must give the same state. On CPU, the work a CUDA graph
captures (each layout's decode call, the whole promote with a PRM's cache) is run with every host
read of a tensor raising: a host read cannot be captured."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_prm import save_tiny_prm

from mahalo_engine import layouts
from mahalo_engine.cache import KVCache
from mahalo_engine.engine import Engine
from mahalo_engine.engine.records import SearchConfig
from mahalo_engine.engine.decode_runner import DecodeRunner
from mahalo_engine.engine.requests import Requests
from mahalo_engine.engine.scorers import ValueModelPRM
from mahalo_engine.layouts import ForkLayout, ForkSlots
from mahalo_engine.policy import load_policy
from mahalo_engine.value_model import load_prm
from mahalo_engine.tiny import tiny_checkpoint

K, GROUPS, MAX_LEN = 3, 5, 40


def _random_cache(config, device, gen) -> KVCache:
    cache = KVCache.allocate(config, GROUPS * K, MAX_LEN, dtype=torch.float32, device=device)
    cache.data.copy_(torch.randn(cache.data.shape, generator=gen))
    return cache


def _reference(state: dict, winners, groups, start, prm_committed) -> None:
    """In place on cloned tensors: every non-winning slot of each group copies its winner's
    ``[start, len)`` (policy) and ``[committed, len)`` (PRM), its length and hidden state."""
    for w, g, a in zip(winners, groups, start):
        for d in range(g * K, g * K + K):
            if d == w:
                continue
            n = int(state["lens"][w])
            state["data"][:, :, d, :, a:n] = state["data"][:, :, w, :, a:n]
            state["lens"][d] = n
            state["hidden"][d] = state["hidden"][w]
            c, m = int(prm_committed[w]), int(state["prm_lens"][w])
            state["prm_data"][:, :, d, :, c:m] = state["prm_data"][:, :, w, :, c:m]
            state["prm_lens"][d] = m


def _requests(model, cache: ForkSlots, runner, k: int, scorer) -> Requests:
    """The promote's owner over ``cache`` (no prompts: only its promote is driven here)."""
    return Requests([], None, None, SearchConfig(candidates=k), layout=ForkLayout(k),
                    cache=cache, model=model, runner=runner, sampler=None, scorer=scorer,
                    num_groups=cache.num_slots // k, max_seq_len=MAX_LEN - 1, text=None,
                    confirm=None)


def _run_promotes(device: str, graphs: bool) -> Requests:
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32, device=device)
    config = policy.config
    gen = torch.Generator().manual_seed(0)
    cache = _random_cache(config, device, gen)
    laid_out = ForkSlots(cache)
    runner = DecodeRunner(policy.model, laid_out, None, max_seq_len=MAX_LEN - 1, eos_ids=[],
                          cuda_graphs=graphs)
    runner.hidden.copy_(torch.randn(runner.hidden.shape, generator=gen))
    prm = ValueModelPRM(SimpleNamespace(model=SimpleNamespace(device=torch.device(device),
                                                              dtype=torch.float32)))
    prm.slots = ForkSlots(_random_cache(config, device, gen))
    slots = _requests(policy.model, laid_out, runner, K, prm)
    assert slots._scorer_in_graph
    rng = torch.Generator().manual_seed(1)
    # Group sets repeat so that, with graphs, shapes are captured (2nd use) and replayed (3rd+).
    for groups in ([0, 1, 2, 3, 4], [1, 3], [0, 2, 4, 1, 3], [0, 4], [4, 0], [2, 1, 0, 3, 4], [2]):
        # A step: every group's slots share [0, start); each candidate then grew its own tokens.
        start = torch.randint(0, 20, (len(groups),), generator=rng).tolist()
        prm_start = torch.randint(0, 20, (len(groups),), generator=rng)
        for i, g in enumerate(groups):
            sl = slice(g * K, g * K + K)
            cache.lens[sl] = (start[i] + torch.randint(0, 15, (K,), generator=rng)).to(device,
                                                                                       torch.int32)
            prm.cache.lens[sl] = (prm_start[i] + torch.randint(0, 15, (K,), generator=rng)
                                  ).to(device, torch.int32)
        committed = prm.cache.lens.clone()
        for i, g in enumerate(groups):
            committed[g * K:g * K + K] = int(prm_start[i])
            laid_out.committed[g * K:g * K + K] = start[i]  # the lengths when the step began
        prm.slots.committed.copy_(committed)
        winners = [g * K + int(torch.randint(0, K, (), generator=rng)) for g in groups]
        want = {"data": cache.data.clone(), "lens": cache.lens.clone(),
                "hidden": runner.hidden.clone(), "prm_data": prm.cache.data.clone(),
                "prm_lens": prm.cache.lens.clone()}
        _reference(want, winners, groups, start, committed)
        slots._promote([[w] for w in winners], groups)
        got = {"data": cache.data, "lens": cache.lens, "hidden": runner.hidden,
               "prm_data": prm.cache.data, "prm_lens": prm.cache.lens}
        for name in want:
            assert torch.equal(got[name], want[name]), f"groups {groups}: {name} differs"
    return slots


def test_promote_matches_dense_reference_cpu():
    slots = _run_promotes("cpu", graphs=False)
    assert not len(slots.graphs)


def test_single_candidate_promote_is_a_no_op():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    cache = KVCache.allocate(policy.config, 4, MAX_LEN, dtype=torch.float32, device="cpu")
    cache.data.copy_(torch.randn(cache.data.shape, generator=gen))
    cache.lens.copy_(torch.tensor([3, 9, 5, 7], dtype=torch.int32))
    slots = ForkSlots(cache)
    runner = DecodeRunner(policy.model, slots, None, max_seq_len=MAX_LEN - 1, eos_ids=[],
                          cuda_graphs=False)
    before = cache.data.clone(), cache.lens.clone()
    slots.committed.copy_(torch.tensor([1, 0, 2, 0], dtype=torch.int32))
    _requests(policy.model, slots, runner, 1, None)._promote([[0], [2]], [0, 2])
    assert torch.equal(cache.data, before[0]) and torch.equal(cache.lens, before[1])


def test_promote_rejects_a_winner_outside_its_group():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    cache = ForkSlots(KVCache.allocate(policy.config, 6, MAX_LEN, dtype=torch.float32,
                                       device="cpu"))
    runner = DecodeRunner(policy.model, cache, None, max_seq_len=MAX_LEN - 1, eos_ids=[],
                          cuda_graphs=False)
    with pytest.raises(ValueError, match="one candidate slot of each group"):
        _requests(policy.model, cache, runner, 3, None)._promote([[4]], [0])


@pytest.mark.gpu
def test_graph_replayed_promote_matches_reference_cuda():
    slots = _run_promotes("cuda", graphs=True)
    assert len(slots.graphs), "no promote was captured in a CUDA graph"


_HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__",
               "__index__")


@pytest.mark.parametrize("layout", ["fork", "shared_prefix"])
def test_captured_work_makes_no_host_read(layout, tmp_path, monkeypatch):
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    prm = load_prm(save_tiny_prm(tmp_path / "prm", tiny_checkpoint("qwen2", seed=1)),
                   dtype=torch.float32)
    ran = []

    def no_host_reads(fn, name):
        def raising(attr):
            def read(*args, **kwargs):
                raise AssertionError(f"{name} reads Tensor.{attr} on the host")
            return read

        def run(*args, **kwargs):
            ran.append(name)
            with monkeypatch.context() as m:
                for attr in _HOST_READS:
                    m.setattr(torch.Tensor, attr, raising(attr))
                return fn(*args, **kwargs)
        return run

    laid_out = layouts.ForkSlots if layout == "fork" else layouts.SharedPrefixSlots
    monkeypatch.setattr(laid_out, "decode", no_host_reads(laid_out.decode, "decode"))
    run_captured = Requests._run_captured
    monkeypatch.setattr(Requests, "_run_captured", lambda self, name, host, apply: run_captured(
        self, name, host, no_host_reads(apply, name)))
    engine = Engine(policy, prm=prm, max_batch=2, max_seq_len=48, cache_layout=layout,
                    cuda_graphs=False)
    cfg = SearchConfig(candidates=3, boundary=" ", max_steps=3, max_step_tokens=4, check_every=2)
    results = engine.search(["a b", "c d e", "f"], config=cfg)
    assert all(len(r.steps) == 3 for r in results)  # every request promoted twice
    assert {"decode", "promote"} <= {n if isinstance(n, str) else n[0] for n in ran}
    assert prm is engine.prm.prm and engine.prm.graph_safe()  # the PRM's promote ran guarded
