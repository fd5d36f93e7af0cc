"""The shared-weights plan's owners: one plan function (``triton_kernels.plan_heads``) used by the
policy and the engine's sampler, plans and merged heads held by the sampler (rebuilt when the heads
change), and no plan state at module level.

Runs the kernels in Triton's interpreter with TRITON_INTERPRET=1 (or on CUDA); without either the
sampler runs ``triton_kernels.multihead.cpu``, with the same plans.
"""
import importlib

import pytest
import torch

import mahalo_engine.engine.sampler as sampler_module
import mahalo_engine.policy as policy_module
import triton_kernels.multihead.heads_plan as heads_plan
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.tiny import tiny_checkpoint
from triton_kernels import HeadsPlan, MergeCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
V, D = 64, 16


def random_heads(seed: int, H: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (4 * torch.randn(H, V, D, generator=g) / D**0.5).to(DEVICE)


def greedy64(hidden, heads, weights):
    """Float64 argmax of ``Σ_i w_bi W_i h_b`` and each row's margin over the runner-up."""
    z = torch.einsum("bh,hvd,bd->bv", weights.double().cpu(), heads.double().cpu(),
                     hidden.double().cpu())
    top2 = z.topk(2, dim=1).values
    return z.argmax(dim=1), (top2[:, 0] - top2[:, 1]).min().item()


def greedy_sampler(heads, weights):
    sampler = Sampler(heads, weights.shape[0], merge_budget_bytes=1 << 20)
    sampler.configure(0.0, 0, 0)
    sampler.set_weights(weights)
    return sampler


SHARED = torch.tensor([[0.3, 0.7]] * 4)  # U = 1 < H = 2: the merged path


def test_sampler_replans_when_the_heads_change_in_place():
    heads = random_heads(0)
    hidden = torch.randn(4, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    sampler = greedy_sampler(heads, SHARED)
    want, margin = greedy64(hidden, heads, SHARED)
    assert margin > 1e-3 and sampler.plan(4).merged
    assert torch.equal(sampler.sample(hidden)[0].cpu(), want)
    assert torch.equal(sampler.sample(hidden[:2])[0].cpu(), want[:2])
    assert sampler.merged.merges == 1  # one merge serves both row counts: the owner's cache
    key = sampler.graph_operands(4)[2]
    with torch.no_grad():
        heads.copy_(random_heads(5))  # a trainer's new weights, written in place
    new, margin = greedy64(hidden, heads, SHARED)
    assert margin > 1e-3 and not torch.equal(new, want)  # the change has teeth
    assert torch.equal(sampler.sample(hidden)[0].cpu(), new)  # no stale plan or merged head
    assert sampler.merged.merges == 2
    assert sampler.graph_operands(4)[2] != key  # a merged graph captured before must miss


def test_invalidate_is_the_hook_for_unversioned_or_replaced_heads():
    with torch.inference_mode():
        heads = random_heads(0)  # inference tensors carry no version counter
    hidden = torch.randn(4, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    sampler = greedy_sampler(heads, SHARED)
    sampler.sample(hidden)
    key = sampler.graph_operands(4)[2]
    with torch.inference_mode():
        heads.copy_(random_heads(5))
    sampler.invalidate()
    want, margin = greedy64(hidden, heads, SHARED)
    assert margin > 1e-3 and torch.equal(sampler.sample(hidden)[0].cpu(), want)
    assert sampler.graph_operands(4)[2] != key
    other = random_heads(7)
    sampler.invalidate(other)  # a new heads tensor
    want, margin = greedy64(hidden, other, SHARED)
    assert margin > 1e-3 and torch.equal(sampler.sample(hidden)[0].cpu(), want)
    with pytest.raises(ValueError, match="new heads must match"):
        sampler.invalidate(random_heads(7, H=3))


def test_sampler_general_path_for_distinct_rows():
    heads = random_heads(2)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8]])
    hidden = torch.randn(4, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    sampler = greedy_sampler(heads, weights)
    plan = sampler.plan(4)
    assert not plan.merged and plan.heads is heads and sampler.merged.merges == 0
    want, margin = greedy64(hidden, heads, weights)
    assert margin > 1e-3 and torch.equal(sampler.sample(hidden)[0].cpu(), want)
    h, w, key = sampler.graph_operands(4)  # the live heads and weights buffer, read in place
    assert h is heads and w.data_ptr() == sampler.weights.data_ptr()
    other = random_heads(9)
    sampler.invalidate(other)  # new heads: a graph that read the old ones must miss
    h, _, new_key = sampler.graph_operands(4)
    assert h is other and new_key != key
    want, margin = greedy64(hidden, other, weights)
    assert margin > 1e-3 and torch.equal(sampler.sample(hidden)[0].cpu(), want)


def test_no_plan_state_at_module_level():
    """Plans and merged heads live with their owners: no module of triton_kernels holds a dict,
    cache, plan or tensor (an ``id()``-keyed cache or an import-time, environment-sized one)."""
    names = ["triton_kernels", "triton_kernels.device", "triton_kernels.multihead",
             "triton_kernels.multihead.merge", "triton_kernels.multihead.heads_plan",
             "triton_kernels.multihead.launcher", "triton_kernels.multihead.cpu",
             "triton_kernels.multihead.custom_ops", "triton_kernels.cascade.launcher",
             "mahalo_engine.engine.sampler", "mahalo_engine.policy"]
    for name in names:
        for attr, value in vars(importlib.import_module(name)).items():
            if attr.startswith("__"):
                continue
            assert not isinstance(value, (dict, set, list, MergeCache, HeadsPlan, torch.Tensor)), \
                f"{name}.{attr} is module-level state: {type(value).__name__}"


def test_policy_and_sampler_share_the_one_plan_function(monkeypatch):
    assert policy_module.plan_heads is heads_plan.plan_heads
    assert sampler_module.plan_heads is heads_plan.plan_heads
    base = load_policy(tiny_checkpoint("qwen2"), device=DEVICE)
    noise = torch.randn(base.heads.shape[1:], generator=torch.Generator().manual_seed(1))
    heads = torch.cat([base.heads, base.heads + 0.05 * noise.to(base.heads)])
    policy = Policy(base.model, base.tokenizer, heads, ["acc", "eng"])
    calls = []

    def spy(heads, weights, **kw):
        calls.append((heads, weights.shape[0]))
        return heads_plan.plan_heads(heads, weights, **kw)

    monkeypatch.setattr(policy_module, "plan_heads", spy)
    monkeypatch.setattr(sampler_module, "plan_heads", spy)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 2, 3, 4]])
    weights = [[0.3, 0.7], [1.0, 0.0], [0.3, 0.7]]
    logits = policy.logits(ids, weights)
    assert len(calls) == 1 and calls[0][0] is heads
    with torch.no_grad():
        hidden = policy.model(ids.to(DEVICE)).double()
    w = torch.tensor(weights, dtype=torch.float64, device=DEVICE)
    expect = torch.einsum("bh,hvd,btd->btv", w, heads.double(), hidden)
    assert ((logits.double() - expect).abs().max() / expect.abs().max()).item() <= 1e-5
    sampler = Sampler(policy.heads, 3)
    sampler.configure(0.0, 0, 0)
    sampler.set_weights(torch.tensor(weights))
    tokens, _ = sampler.sample(hidden[:, -1].to(heads.dtype))
    assert len(calls) == 2 and calls[1] == (heads, 3)
    assert torch.equal(tokens, logits[:, -1].argmax(dim=1))
