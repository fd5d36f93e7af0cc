"""torch.ops.mahalo.multihead_logits / multihead_sample as custom ops: opcheck (schema, fake,
autograd registration, AOT dispatch), torch.compile(fullgraph=True) of a decode step equal to
eager, torch.export of a module calling the op, and a CUDA-graph replay (gpu)."""
from __future__ import annotations

import pytest
import torch

import triton_kernels
from mahalo_engine.cache import KVCache
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.tiny import tiny_checkpoint
from triton_kernels.multihead import custom_ops  # noqa: F401  (registers torch.ops.mahalo.multihead_*)

B, H, V, D = 3, 2, 37, 16


def _inputs(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, D, generator=g).to(device)
    heads = torch.randn(H, V, D, generator=g).to(device)
    weights = torch.softmax(torch.randn(B, H, generator=g), -1).to(device)
    return hidden, heads, weights


def test_logits_op_matches_float64_math():
    hidden, heads, weights = _inputs()
    expected = torch.einsum("bh,hvd,bd->bv", weights.double(), heads.double(), hidden.double())
    got = torch.ops.mahalo.multihead_logits(hidden, heads, weights)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
    out = torch.empty(B, V)
    assert triton_kernels.multihead_logits(hidden, heads, weights, out=out) is out
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-5)


def test_opcheck_logits():
    torch.library.opcheck(torch.ops.mahalo.multihead_logits.default, _inputs())


@pytest.mark.parametrize("form", ["float", "greedy", "tensors", "topk", "filters",
                                  "filter-tensors", "topk-filters", "large-topk"])
def test_opcheck_sample(form):
    hidden, heads, weights = _inputs()
    args = {  # (temperature, temperature_tensor, top_k, seed, seed_tensor, offset, offset_tensor,
        #        [top_p, top_p_tensor, min_p, min_p_tensor])
        "float": (0.7, None, 0, 5, None, 2, None),
        "greedy": (0.0, None, 0, 0, None, 0, None),
        "tensors": (1.0, torch.tensor([0.5, 0.0, 2.0]), 0, 0, torch.tensor([9]), 0,
                    torch.tensor([4])),
        "topk": (1.3, None, 4, 11, None, 0, None),
        "filters": (0.9, None, 0, 3, None, 1, None, 0.8, None, 0.05, None),
        "filter-tensors": (1.0, torch.tensor([0.5, 0.0, 2.0]), 0, 0, torch.tensor([9]), 0,
                           torch.tensor([4]), 1.0, torch.tensor([0.9, 0.5, 1.0]), 0.0,
                           torch.tensor(0.1)),
        "topk-filters": (1.3, None, 6, 11, None, 0, None, 0.7, None, 0.1, None),
        "large-topk": (1.0, None, 30, 2, None, 0, None, 0.9, None, 0.0, None),
    }[form]
    torch.library.opcheck(torch.ops.mahalo.multihead_sample.default, (hidden, heads, weights, *args))


def test_sample_wrapper_normalises_scalar_and_tensor_forms():
    """The same (temperature, seed, offset) as Python scalars or as device tensors give the same
    draw; a greedy call gives the float64 argmax."""
    hidden, heads, weights = _inputs()
    a = triton_kernels.multihead_sample(hidden, heads, weights, temperature=0.8, seed=3, offset=7)
    b = triton_kernels.multihead_sample(hidden, heads, weights, temperature=torch.tensor(0.8),
                                        seed=torch.tensor([3]), offset=torch.tensor([7]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    z = torch.einsum("bh,hvd,bd->bv", weights.double(), heads.double(), hidden.double())
    tokens, logprobs = triton_kernels.multihead_sample(hidden, heads, weights, temperature=0.0)
    assert tokens.tolist() == z.argmax(-1).tolist()
    expected = torch.log_softmax(z, -1).gather(1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs.double(), expected, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        triton_kernels.multihead_sample(hidden, heads, weights, top_k=-1)


def _decode_setup():
    config = ModelConfig.from_pretrained(tiny_checkpoint("qwen2"))
    torch.manual_seed(0)
    model = Decoder(config).eval()
    cache = KVCache.allocate(config, 4, 16, dtype=torch.float32, device="cpu")
    model.prefill(cache, [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [0, 1, 2])
    heads = torch.randn(2, config.vocab_size, config.hidden_size) * 0.2
    weights = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.25, 0.75]])
    return model, cache, heads, weights


def test_compiled_decode_step_equals_eager():
    """Backbone decode + fused multi-head sampling, compiled with fullgraph=True (a graph break
    would raise), gives eager's tokens, log-probs, cache contents and lengths."""
    model, cache, heads, weights = _decode_setup()
    slots = torch.tensor([0, 1, 2])

    top_p, min_p = torch.tensor([1.0, 0.9, 0.6]), torch.tensor(0.05)

    def step(c: KVCache, ids: torch.Tensor, seed: torch.Tensor, temperature: torch.Tensor):
        hidden = model.decode(c, ids, slots)
        first = triton_kernels.multihead_sample(hidden, heads, weights, temperature=temperature,
                                                top_k=5, seed=seed, offset=c.lens[:1].long())
        nucleus = triton_kernels.multihead_sample(hidden, heads, weights, temperature=temperature,
                                                  top_p=top_p, min_p=min_p, seed=seed)
        return torch.cat([first[0], nucleus[0]]), torch.cat([first[1], nucleus[1]])

    eager_cache = KVCache(cache.data.clone(), cache.lens.clone())
    compiled_cache = KVCache(cache.data.clone(), cache.lens.clone())
    compiled = torch.compile(step, fullgraph=True)
    ids, temp = torch.tensor([3, 1, 4]), torch.tensor([0.9, 0.0, 1.5])
    for i in range(2):  # the second call feeds back the sampled tokens, new seed
        seed = torch.tensor([10 + i])
        eager = step(eager_cache, ids, seed, temp)
        got = compiled(compiled_cache, ids, seed, temp)
        assert torch.equal(got[0], eager[0])
        torch.testing.assert_close(got[1], eager[1], atol=1e-5, rtol=1e-5)
        ids = eager[0][:3]  # the top-k draw feeds back; the nucleus draw is checked alongside
    torch.testing.assert_close(compiled_cache.data, eager_cache.data, atol=1e-5, rtol=1e-5)
    assert torch.equal(compiled_cache.lens, eager_cache.lens)
    assert compiled_cache.lens.tolist() == [5, 4, 6, 0]


def test_sample_wrapper_passes_top_p_and_min_p():
    """The op's top_p/min_p (numbers or tensors) reach the sampler: a tiny top_p or min_p = 1 is
    the greedy token; the tensor and number forms draw alike."""
    hidden, heads, weights = _inputs()
    greedy = triton_kernels.multihead_sample(hidden, heads, weights, temperature=0.0)[0]
    for kw in (dict(top_p=1e-4), dict(min_p=1.0), dict(top_p=torch.tensor([1e-4] * B))):
        assert torch.equal(triton_kernels.multihead_sample(hidden, heads, weights, seed=4,
                                                           **kw)[0], greedy), kw
    a = triton_kernels.multihead_sample(hidden, heads, weights, top_p=0.8, min_p=0.1, seed=2)
    b = triton_kernels.multihead_sample(hidden, heads, weights, top_p=torch.tensor(0.8),
                                        min_p=torch.tensor([0.1]), seed=2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="top_p must be a finite number in"):
        triton_kernels.multihead_sample(hidden, heads, weights, top_p=0.0)


class _Sampler(torch.nn.Module):
    def __init__(self, heads: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("heads", heads)

    def forward(self, hidden, weights, seed):
        return triton_kernels.multihead_sample(hidden, self.heads, weights, temperature=1.0,
                                               seed=seed)


def test_export_module_calling_the_op():
    hidden, heads, weights = _inputs()
    module = _Sampler(heads)
    exported = torch.export.export(module, (hidden, weights, torch.tensor([1])))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "mahalo.multihead_sample.default" in targets
    seed = torch.tensor([8])
    got = exported.module()(hidden, weights, seed)
    want = module(hidden, weights, seed)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_sample_op_replays_in_a_cuda_graph():
    hidden, heads, weights = _inputs("cuda")
    seed = torch.tensor([1], device="cuda")
    temp = torch.tensor([1.0], device="cuda")
    heads_eff, weights_eff = triton_kernels.merge_shared_heads(heads, weights)

    def run():
        return torch.ops.mahalo.multihead_sample(hidden, heads_eff, weights_eff, 1.0, temp, 0, 0,
                                                 seed, 0, None)

    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens, logprobs = run()
    for s in (2, 3):
        seed.fill_(s)
        graph.replay()
        want = run()
        assert torch.equal(tokens, want[0]) and torch.equal(logprobs, want[1])


@pytest.mark.gpu
def test_compiled_sample_with_cuda_graphs_equals_eager():
    hidden, heads, weights = _inputs("cuda")
    fn = torch.compile(lambda h, s: triton_kernels.multihead_sample(h, heads, weights, seed=s),
                       fullgraph=True, mode="reduce-overhead")
    for s in (1, 2, 3):
        seed = torch.tensor([s], device="cuda")
        got, want = fn(hidden, seed), triton_kernels.multihead_sample(hidden, heads, weights,
                                                                      seed=seed)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
