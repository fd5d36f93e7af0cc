"""The native decoder and the multi-head policy against transformers on the same saved checkpoints:
logits parity for every family and option, gradients, low-precision dtypes, head mixing and the
validation of head weights and configs."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.heads import load_heads, save_heads
from mahalo_engine.layers.rotary import inverse_frequencies
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# (family, options): every family; tied and untied; GQA ratios 1, 2, 3, 4 and 8; head_dim !=
# hidden/heads; rope default / linear / llama3; sliding windows shorter than the sequence.
CASES = {
    "qwen2": ("qwen2", {}),
    "qwen2-mha-linear": ("qwen2", dict(num_key_value_heads=4,
                                       rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-tied-gqa3": ("llama", dict(tie_word_embeddings=True, hidden_size=48, num_heads=6,
                                      num_key_value_heads=2)),
    "llama-llama3-rope": ("llama", dict(rope_scaling=LLAMA3, rope_theta=500000.0)),
    "qwen3-headdim-gqa4": ("qwen3", dict(head_dim=24, num_key_value_heads=1)),
    "qwen3-tied-sliding": ("qwen3", dict(tie_word_embeddings=True, sliding_window=6, num_layers=3)),
    "mistral-gqa8-sliding": ("mistral", dict(num_heads=8, num_key_value_heads=1, sliding_window=5)),
}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def hf_model(path, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


def batch(seed: int = 0, b: int = 3, t: int = 21):
    """Random ids and a right-padded attention mask, rows of different lengths (t, t-7, 8)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (b, t), generator=g)
    lengths = torch.tensor([t, t - 7, 8][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return ids, mask


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    family, kw = CASES[case]
    path = tiny_checkpoint(family, **kw)
    policy = load_policy(path)
    ids, mask = batch()
    with torch.no_grad():
        ref = hf_model(path)(input_ids=ids, attention_mask=mask).logits
    got = policy.logits(ids, attention_mask=mask)
    valid = mask.bool()
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert rel_err(got[valid], ref[valid]) <= 1e-4
    # Without padding too (no mask given).
    with torch.no_grad():
        ref = hf_model(path)(input_ids=ids).logits
    assert rel_err(policy.logits(ids), ref) <= 1e-4


@pytest.mark.parametrize("case", ["qwen2-mha-linear", "llama-llama3-rope", "mistral-gqa8-sliding",
                                  "qwen3-tied-sliding"])
def test_parity_cases_are_sensitive(case):
    """Dropping the rope scaling or the sliding window breaks parity: the cases above test them."""
    family, kw = CASES[case]
    path = tiny_checkpoint(family, **kw)
    policy = load_policy(path)
    config = policy.config
    if config.rope_scaling is not None:
        changed = dataclasses.replace(config, rope_scaling=None)
    else:
        changed = dataclasses.replace(config, sliding_layers=(False,) * config.num_hidden_layers)
    other = Decoder(changed)
    other.load_state_dict(policy.model.state_dict())
    ids, _ = batch()
    with torch.no_grad():
        base = policy.model.lm_head(policy.model(ids))
        alt = other.lm_head(other(ids))
    assert rel_err(alt, base) > 1e-3


def test_gradients_match_transformers():
    path = tiny_checkpoint("qwen3", head_dim=24, num_key_value_heads=1)
    ours = load_policy(path).model.train()
    ref = hf_model(path).train()
    ids, mask = batch(seed=3)
    targets = torch.roll(ids, -1, dims=1)
    for model, logits in ((ours, lambda: ours.lm_head(ours(ids, mask))),
                          (ref, lambda: ref(input_ids=ids, attention_mask=mask).logits)):
        loss = torch.nn.functional.cross_entropy(logits()[mask.bool()], targets[mask.bool()])
        loss.backward()
    ours_grads = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert rel_err(ours_grads[name].grad, p.grad) <= 1e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_transformers(dtype):
    path = tiny_checkpoint("qwen2")
    policy = load_policy(path, dtype=dtype)
    assert policy.model.model.embed_tokens.weight.dtype == dtype
    assert policy.model.model.rotary.inv_freq.dtype == torch.float32
    ids, mask = batch()
    with torch.no_grad():
        ref32 = hf_model(path)(input_ids=ids, attention_mask=mask).logits
        ref = hf_model(path, dtype)(input_ids=ids, attention_mask=mask).logits
    got = policy.logits(ids, attention_mask=mask)
    valid = mask.bool()
    # Our error in low precision is of the same order as transformers' own.
    ref_err = rel_err(ref[valid], ref32[valid])
    assert 0 < ref_err < 0.05
    assert rel_err(got[valid], ref32[valid]) <= 2 * ref_err
    assert rel_err(got[valid], ref[valid]) <= 2 * ref_err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_norm_and_rope_equal_transformers_bitwise(dtype):
    """RMSNorm and RoPE run in float32 and round once, exactly as transformers does: equal bits
    in bf16/fp16, at positions far enough out (up to 8000) that low-precision angles would show."""
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama as hf_llama

    from mahalo_engine.layers.rmsnorm import RMSNorm
    from mahalo_engine.layers.rotary import Rotary, apply_rotary

    path = tiny_checkpoint("llama", rope_scaling=LLAMA3, rope_theta=500000.0)
    config, hf_config = ModelConfig.from_pretrained(path), AutoConfig.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(2, 5, 64, generator=g)).to(dtype)
    ours, ref = RMSNorm(64, 1e-6).to(dtype), hf_llama.LlamaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(1 + 0.1 * torch.randn(64, generator=g))
        ref.weight.copy_(ours.weight)
        assert torch.equal(ours(x), ref(x))

    positions = torch.tensor([[0, 1, 17, 1000, 4097, 8000]])
    q = torch.randn(1, 6, 4, 16, generator=g).to(dtype)  # [B, T, heads, head_dim]
    cos, sin = Rotary(config)(positions, dtype)
    ref_cos, ref_sin = hf_llama.LlamaRotaryEmbedding(hf_config)(q, positions)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    ref_q, _ = hf_llama.apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), ref_cos, ref_sin)
    assert torch.equal(apply_rotary(q, cos, sin), ref_q.transpose(1, 2))


def test_config_errors_list_what_is_supported():
    base = ModelConfig.from_pretrained(tiny_checkpoint("llama")).raw
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2, qwen3"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})
    bad_rope = {**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}
    with pytest.raises(ValueError, match="unsupported rope type 'yarn'.*default, linear, llama3"):
        ModelConfig.from_dict(bad_rope)
    legacy = {k: v for k, v in base.items() if k != "rope_parameters"}
    with pytest.raises(ValueError, match="unsupported rope type 'dynamic'"):
        ModelConfig.from_dict({**legacy, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        ModelConfig.from_dict({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig.from_dict({**base, "num_key_value_heads": 3})


def test_legacy_rope_layout_parses_like_v5():
    """Classic config.json keys (rope_theta + rope_scaling) give the same config as v5's."""
    raw = ModelConfig.from_pretrained(tiny_checkpoint("llama", rope_scaling=LLAMA3, rope_theta=500000.0)).raw
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"}
    params = dict(raw["rope_parameters"])
    legacy["rope_theta"] = params.pop("rope_theta")
    legacy["rope_scaling"] = params
    a, b = ModelConfig.from_dict(raw), ModelConfig.from_dict(legacy)
    assert (a.rope_theta, a.rope_scaling) == (b.rope_theta, b.rope_scaling) == (500000.0, LLAMA3)


# config.json files of released checkpoints (as published, transformers v4 layout), trimmed of
# keys that no code reads. Variants cover the old "type" key, a window on a subset of layers,
# Mistral v0.1's window on every layer and the linear rope type.
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "vocab_size": 152064,
}
QWEN3_06B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "intermediate_size": 3072, "max_position_embeddings": 40960, "max_window_layers": 28,
    "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_sliding_window": False, "vocab_size": 151936,
}
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 32768,
}
REAL_CONFIGS = {
    "llama-3.1-8b": LLAMA31_8B,
    "llama-3.2-1b-type-key": {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192,
                              "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True,
                              "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "type": "llama3",
                                               "original_max_position_embeddings": 8192}},
    "llama-linear-type-key": {**LLAMA31_8B, "rope_theta": 10000.0,
                              "rope_scaling": {"type": "linear", "factor": 4.0}},
    "qwen2.5-7b": QWEN25_7B,
    "qwen2.5-sliding-upper-layers": {**QWEN25_7B, "use_sliding_window": True,
                                     "sliding_window": 4096, "max_window_layers": 20},
    "qwen3-0.6b": QWEN3_06B,
    "mistral-7b-v0.3": MISTRAL_7B_V03,
    "mistral-7b-v0.1": {**MISTRAL_7B_V03, "rope_theta": 10000.0, "sliding_window": 4096},
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_real_configs_read_as_transformers_reads_them(name):
    """Released configs against transformers' own reading of them, on the meta device (no
    memory): the same tensor names and shapes (biases, head_dim, tie), the same RoPE inverse
    frequencies, the same sliding layers; and transformers v5's re-saved layout
    (``rope_parameters``, ``dtype``) parses to the same config."""
    from transformers import AutoConfig

    raw = REAL_CONFIGS[name]
    ours = ModelConfig.from_dict(raw)
    hf_config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
        mine = Decoder(ours)
    assert ({k: t.shape for k, t in mine.state_dict().items()}
            == {k: t.shape for k, t in hf.state_dict().items()})
    hf_rotary = type(hf.model.rotary_emb)(hf_config)  # off the meta device
    assert hf_rotary.attention_scaling == 1.0
    torch.testing.assert_close(inverse_frequencies(ours), hf_rotary.inv_freq, rtol=0, atol=0)
    window = getattr(hf_config, "sliding_window", None)
    if ours.model_type == "mistral":  # one window for every layer
        hf_sliding = [window is not None] * ours.num_hidden_layers
    else:
        types = getattr(hf_config, "layer_types", None) or ["full_attention"] * ours.num_hidden_layers
        hf_sliding = [t == "sliding_attention" and window is not None for t in types]
    assert list(ours.sliding_layers) == hf_sliding and ours.sliding_window == window
    assert (ours.eos_token_id, ours.bos_token_id) == (raw["eos_token_id"], raw["bos_token_id"])
    v5 = hf_config.to_diff_dict()
    assert "rope_parameters" in v5 and "rope_scaling" not in v5 and "dtype" in v5
    assert dataclasses.replace(ModelConfig.from_dict(v5), raw={}) == dataclasses.replace(ours, raw={})


def _mixed_heads_policy(tmp_path):
    """A copy of the tiny qwen2 checkpoint with a 3-head file (perturbed copies of lm_head)."""
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint("qwen2"), path)
    base = load_policy(path)
    w0 = base.model.lm_head.weight.detach()
    g = torch.Generator().manual_seed(7)
    heads = torch.stack([w0 + 0.05 * torch.randn(w0.shape, generator=g) for _ in range(3)])
    save_heads(path, heads, ["acc", "eng", "help"])
    return path, heads


def test_mixed_heads_equal_weighted_sum_of_transformers_logits(tmp_path):
    path, heads = _mixed_heads_policy(tmp_path)
    policy = load_policy(path)
    assert policy.objectives == ["acc", "eng", "help"]
    assert torch.equal(policy.heads, heads)
    ids, mask = batch(b=2)
    ref = hf_model(path)
    per_head = []
    for i in range(3):  # transformers with its lm_head swapped for head i: the independent reference
        with torch.no_grad():
            ref.lm_head.weight.copy_(heads[i])
            per_head.append(ref(input_ids=ids, attention_mask=mask).logits)
    valid = mask.bool()
    weights = [[2.0, 1.0, 1.0], [0.0, 0.0, 5.0]]  # one list per row, normalised to sum 1
    expect = torch.stack([sum(w / sum(ws) * per_head[i][b] for i, w in enumerate(ws))
                          for b, ws in enumerate(weights)])
    got = policy.logits(ids, weights, attention_mask=mask)
    assert rel_err(got[valid], expect[valid]) <= 1e-4
    # One list for all rows; None = uniform.
    expect = 0.5 * per_head[0] + 0.5 * per_head[2]
    assert rel_err(policy.logits(ids, [1, 0, 1], attention_mask=mask)[valid], expect[valid]) <= 1e-4
    expect = sum(per_head) / 3
    assert rel_err(policy.logits(ids, attention_mask=mask)[valid], expect[valid]) <= 1e-4


def test_mixing_is_one_matmul_per_distinct_weight_row(tmp_path, monkeypatch):
    """Heads are merged before the projection: one [V,d] matmul per distinct weight row, never H
    of them (nor [H,B,T,V] per-head logits); in bf16 too the mix equals the weighted sum of the
    heads' logits up to bf16 rounding."""
    path, heads = _mixed_heads_policy(tmp_path)
    policy = load_policy(path, dtype=torch.bfloat16)
    calls = []
    real_linear = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if weight.shape == heads.shape[1:]:
            calls.append(x.shape[0])
        return real_linear(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    ids = torch.randint(0, 512, (4, 9), generator=torch.Generator().manual_seed(1))
    weights = [[2.0, 1.0, 1.0], [0.0, 3.0, 1.0], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    got = policy.logits(ids, weights)
    assert sorted(calls) == [1, 1, 2]  # rows 0 and 2 share a mix
    calls.clear()
    assert torch.equal(policy.logits(ids, [0, 1, 0]), policy.logits(ids, [[0, 7, 0]] * 4))
    assert calls == [4, 4]
    monkeypatch.undo()
    with torch.no_grad():
        hidden = policy.model(ids).float()
    w = torch.tensor(weights, dtype=torch.float64)
    w = (w / w.sum(dim=1, keepdim=True)).float()  # each row normalised to sum 1, by hand
    expect = torch.einsum("bh,bhtv->btv", w, torch.einsum("btd,hvd->bhtv", hidden,
                                                            policy.heads.float()))
    assert rel_err(got, expect) <= 1e-2  # bf16 rounding of the merged head and of the logits
    with torch.no_grad():
        one = torch.nn.functional.linear(policy.model(ids), policy.heads[1]).float()
    assert torch.equal(policy.logits(ids, [0, 1, 0]), one)  # a one-hot mix is that head, exactly


def test_single_head_default_is_the_checkpoint_lm_head():
    policy = load_policy(tiny_checkpoint("qwen2"))
    assert policy.objectives == ["lm_head"]
    assert policy.heads.shape == (1, 512, 64)
    assert torch.equal(policy.heads[0], policy.model.lm_head.weight)


def test_weight_matrix_validates_and_normalises():
    policy = load_policy(tiny_checkpoint("qwen2"))
    policy = copy.copy(policy)
    policy.heads = torch.cat([policy.heads, policy.heads])
    policy.objectives = ["a", "b"]
    w = policy.weight_matrix([3, 1], 2)
    assert w.dtype == torch.float32 and torch.equal(w, torch.tensor([[0.75, 0.25]] * 2))
    assert torch.equal(policy.weight_matrix(None, 3), torch.full((3, 2), 0.5))
    assert torch.allclose(policy.weight_matrix([[1, 1], [0, 2]], 2), torch.tensor([[0.5, 0.5], [0.0, 1.0]]))
    for bad, msg in [([1.0], "2 weights per row"), ([1, 2, 3], "2 weights per row"),
                     ([1.0, -0.5], r"\[1.0, -0.5\] must be non-negative"),
                     ([float("nan"), 1.0], "must be finite"), ([float("inf"), 1.0], "must be finite"),
                     ([0, 0], r"\[0, 0\]: a row is all zero"),
                     ([[1, 1], [1, 1], [1, 1]], "3 rows"), ([[1, 1], [0, 0]], "all zero"),
                     ([[1, 1], [1]], r"\[\[1, 1\], \[1\]\] must be one list of 2 numbers or one "
                                     r"such list per row"),
                     (["acc", 1.0], r"\['acc', 1.0\] must be one list of 2"),
                     (0.5, "0.5 must hold 2 weights per row")]:
        with pytest.raises(ValueError, match=msg):
            policy.weight_matrix(bad, 2)


def test_heads_file_roundtrip_and_validation(tmp_path):
    heads = torch.randn(2, 512, 64)
    p = save_heads(tmp_path, heads, ["acc", "eng"])
    assert p.name == "mahalo_heads.safetensors"
    got, objectives = load_heads(tmp_path)
    assert torch.equal(got, heads) and objectives == ["acc", "eng"]
    from safetensors import safe_open
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {"format": "mahalo-heads-v1", "objectives": "acc,eng"}

    with pytest.raises(ValueError, match="2 heads but 3 objectives"):
        save_heads(tmp_path / "x.safetensors", heads, ["a", "b", "c"])
    with pytest.raises(ValueError, match="without commas"):
        save_heads(tmp_path / "x.safetensors", heads, ["a,b", "c"])
    with pytest.raises(ValueError, match="distinct"):
        save_heads(tmp_path / "x.safetensors", heads, ["a", "a"])

    from safetensors.torch import save_file
    save_file({"heads": heads}, str(tmp_path / "nometa.safetensors"))
    with pytest.raises(ValueError, match="format is None, expected 'mahalo-heads-v1'"):
        load_heads(tmp_path / "nometa.safetensors")
    save_file({"heads": heads}, str(tmp_path / "short.safetensors"),
              metadata={"format": "mahalo-heads-v1", "objectives": "acc"})
    with pytest.raises(ValueError, match="2 heads but 1 objectives"):
        load_heads(tmp_path / "short.safetensors")

    wrong = tmp_path / "wrong.safetensors"
    save_heads(wrong, torch.randn(2, 500, 64), ["acc", "eng"])
    with pytest.raises(ValueError, match=r"heads in .*wrong.safetensors must have shape "
                                         r"\[H, 512, 64\].*\(2, 500, 64\)"):
        load_policy(tiny_checkpoint("qwen2"), heads=wrong)
    save_heads(wrong, torch.zeros(2, 512, 64, dtype=torch.int32), ["acc", "eng"])
    with pytest.raises(TypeError, match=r"wrong.safetensors must be a floating-point tensor, got "
                                        r"torch.int32"):
        load_policy(tiny_checkpoint("qwen2"), heads=wrong)


def test_forward_rejects_masks_that_are_not_right_padding():
    model = load_policy(tiny_checkpoint("qwen2")).model
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="right padding only"):
        model(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="right padding only"):
        model(ids, torch.tensor([[2, 1, 1, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"attention_mask shape \(2, 3\)"):
        model(ids, torch.ones(2, 3))
