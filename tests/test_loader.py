"""Strict checkpoint loading and saving: single and sharded safetensors, tied embeddings, dtype and
device, and an error naming the tensor for every kind of mismatch."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mahalo_engine.policy import load_policy
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder, save_checkpoint


def copy_ckpt(tmp_path, family="qwen2", **kw):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint(family, **kw), dst)
    return dst


def rewrite_weights(path, edit):
    """Apply ``edit(dict of tensors)`` to the checkpoint's single safetensors file."""
    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def test_sharded_save_loads_in_both_engines(tmp_path):
    src = load_policy(tiny_checkpoint("llama", num_heads=6, num_key_value_heads=2, hidden_size=48))
    out = save_checkpoint(tmp_path / "sharded", src.model, src.tokenizer, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(src.model.state_dict())

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_policy(out)
    for name, t in src.model.state_dict().items():
        assert torch.equal(ours.model.state_dict()[name], t), name
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    got = ours.logits(ids)
    assert ((got - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    assert ours.tokenizer("1 + 1 = 2")["input_ids"] == src.tokenizer("1 + 1 = 2")["input_ids"]


def test_tied_checkpoint_without_lm_head_on_disk(tmp_path):
    path = tiny_checkpoint("qwen3", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model = load_decoder(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    # Saving a tied model drops lm_head.weight again, as transformers does.
    out = save_checkpoint(tmp_path / "resaved", model)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    assert load_decoder(out).lm_head.weight is not None


def test_tied_checkpoint_with_lm_head_on_disk(tmp_path):
    path = copy_ckpt(tmp_path, "qwen3", tie_word_embeddings=True)
    rewrite_weights(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    model = load_decoder(path)  # equal to the embedding: accepted
    assert model.lm_head.weight is model.model.embed_tokens.weight
    rewrite_weights(path, lambda t: t["lm_head.weight"].mul_(2))
    with pytest.raises(ValueError, match="lm_head.weight on disk differs from model.embed_tokens.weight"):
        load_decoder(path)


def test_missing_tensor_is_named(tmp_path):
    path = copy_ckpt(tmp_path)
    rewrite_weights(path, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.self_attn.k_proj.bias'\]"):
        load_policy(path)
    path2 = copy_ckpt(tmp_path / "b")  # untied: lm_head.weight is required
    rewrite_weights(path2, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match=r"missing tensors: \['lm_head.weight'\]"):
        load_decoder(path2)


def test_unexpected_tensor_is_named(tmp_path):
    path = copy_ckpt(tmp_path)
    rewrite_weights(path, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.mlp.extra.weight'\]"):
        load_decoder(path)


def test_rotary_inv_freq_from_old_conversions_is_skipped(tmp_path):
    path = copy_ckpt(tmp_path, "llama")
    name = "model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_weights(path, lambda t: t.__setitem__(name, torch.ones(8)))
    ref = load_file(str(tiny_checkpoint("llama") / "model.safetensors"))  # the file before the edit
    got = load_decoder(path).state_dict()
    assert set(got) == set(ref)
    for key, t in got.items():
        assert torch.equal(t, ref[key]), key


def test_misshaped_tensor_is_named(tmp_path):
    path = copy_ckpt(tmp_path)
    rewrite_weights(path, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ValueError, match=r"mis-shaped tensors: \[.model.norm.weight: \(63,\), expected \(64,\)"):
        load_decoder(path)


def test_sharded_errors_are_named(tmp_path):
    src = load_decoder(tiny_checkpoint("qwen2"))
    out = save_checkpoint(tmp_path / "s", src, max_shard_bytes=40_000)
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    # The index names a tensor that its shard does not hold.
    index["weight_map"]["model.layers.0.mlp.ghost.weight"] = index["weight_map"]["model.norm.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="'model.layers.0.mlp.ghost.weight' is listed for .* not stored"):
        load_decoder(out)
    del index["weight_map"]["model.layers.0.mlp.ghost.weight"]
    # A tensor absent from the index but stored in a shard: unexpected, not silently skipped.
    shard = index["weight_map"].pop("model.layers.1.input_layernorm.weight")
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{shard} stores tensors that model.safetensors.index.json "
                                         r"does not list for it: \['model.layers.1.input_layernorm"):
        load_decoder(out)
    # Absent from both.
    tensors = load_file(str(out / shard))
    del tensors["model.layers.1.input_layernorm.weight"]
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: \['model.layers.1.input_layernorm.weight'\]"):
        load_decoder(out)
    # A shard file that is gone.
    (out / index["weight_map"]["model.norm.weight"]).unlink()
    with pytest.raises(FileNotFoundError, match="shard files that do not exist"):
        load_decoder(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(out / "config.json", empty)
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_decoder(empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_allocates_the_model_once_without_random_init(monkeypatch, dtype):
    """The model is built on the meta device and materialised once, in the target dtype, by the
    checkpoint's tensors: no parameter is ever randomly initialised in real memory (for a 7B
    model that would be a second copy and minutes of wasted init), none is made in another
    dtype first, and every parameter ends up holding the checkpoint's values."""
    from torch import nn

    real = []
    for cls in (nn.Linear, nn.Embedding):
        original = cls.reset_parameters

        def reset(self, _original=original):
            real.extend(p.device.type for p in self.parameters(recurse=False) if not p.is_meta)
            _original(self)

        monkeypatch.setattr(cls, "reset_parameters", reset)
    created = []
    original_empty = nn.Module.to_empty

    def to_empty(self, *, device, recurse=True):
        created.append({p.dtype for p in self.parameters()})
        return original_empty(self, device=device, recurse=recurse)

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)
    path = tiny_checkpoint("qwen3", tie_word_embeddings=True)
    model = load_decoder(path, dtype=dtype)
    assert real == [] and created == [{dtype}]
    ref = load_file(str(path / "model.safetensors"))
    for name, t in model.state_dict().items():
        assert torch.equal(t, ref.get(name, ref["model.embed_tokens.weight"]).to(dtype)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtype_option(dtype):
    path = tiny_checkpoint("qwen2")
    model = load_decoder(path, dtype=dtype)
    ref = load_file(str(path / "model.safetensors"))
    for name, t in model.state_dict().items():
        assert t.dtype == dtype and t.device.type == "cpu"
        assert torch.equal(t, ref[name].to(dtype)), name
    assert model.model.rotary.inv_freq.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype must be one of"):
        load_decoder(path, dtype=torch.float64)


def test_default_dtype_is_transformers_auto(tmp_path):
    """dtype=None reads config.json's ``dtype`` (v5) or ``torch_dtype`` (v4) as transformers'
    default ``"auto"`` does (fp32 tensors on disk here), else keeps the stored dtype."""
    path = copy_ckpt(tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in ("dtype", "torch_dtype")}
    stored = load_file(str(path / "model.safetensors"))["model.norm.weight"]
    for key, name in (("dtype", "bfloat16"), ("torch_dtype", "float16"), (None, None),
                      ("dtype", "float64")):
        (path / "config.json").write_text(json.dumps({**raw, key: name} if key else raw))
        if name == "float64":
            with pytest.raises(TypeError, match="config.json names dtype 'float64'"):
                load_decoder(path)
            assert load_decoder(path, dtype=torch.float32).lm_head.weight.dtype == torch.float32
            continue
        hf = AutoModelForCausalLM.from_pretrained(path)
        model = load_decoder(path)
        assert model.lm_head.weight.dtype == hf.dtype == getattr(torch, name or "float32")
        assert torch.equal(model.model.norm.weight, stored.to(hf.dtype))
    # Saving records the model's dtype under every dtype key config.json has.
    (path / "config.json").write_text(json.dumps({**raw, "dtype": "float32", "torch_dtype": "float32"}))
    out = save_checkpoint(tmp_path / "resaved", load_decoder(path, dtype=torch.float16))
    saved = json.loads((out / "config.json").read_text())
    assert (saved["dtype"], saved["torch_dtype"]) == ("float16", "float16")
    assert load_decoder(out).lm_head.weight.dtype == torch.float16


@pytest.mark.gpu
def test_device_option():
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.bfloat16, device="cuda")
    assert policy.heads.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in policy.model.parameters())
    ids = torch.randint(0, 512, (2, 9))
    cpu = load_policy(tiny_checkpoint("qwen2"), dtype=torch.bfloat16)
    torch.testing.assert_close(policy.logits(ids).cpu(), cpu.logits(ids), rtol=0.05, atol=0.05)


def test_tokenizer_is_loaded_with_autotokenizer():
    policy = load_policy(tiny_checkpoint("mistral"))
    tok = policy.tokenizer
    text = "Step 1: 48 / 2 = 24.\n\nThe answer is 24."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.convert_tokens_to_ids("<|im_end|>") == policy.config.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
