"""Tiny local checkpoints: seeded, cached by their options, built atomically across processes."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from safetensors.torch import load_file

from mahalo_engine import tiny
from mahalo_engine.tiny import make_tiny_checkpoint, tiny_checkpoint


def test_seed_determines_the_weights(tmp_path):
    a = make_tiny_checkpoint(tmp_path / "a", "llama", seed=3)
    b = make_tiny_checkpoint(tmp_path / "b", "llama", seed=3)
    c = make_tiny_checkpoint(tmp_path / "c", "llama", seed=4)
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not (wa[q] == wc[q]).all()
    assert (a / "tokenizer.json").read_text() == (c / "tokenizer.json").read_text()


def test_cache_is_keyed_by_options(tmp_path, monkeypatch):
    monkeypatch.setenv("MAHALO_CACHE", str(tmp_path))
    p1 = tiny_checkpoint("qwen2", seed=1)
    stamp = (p1 / "model.safetensors").stat().st_mtime_ns
    assert tiny_checkpoint("qwen2", seed=1) == p1
    assert (p1 / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt
    p2 = tiny_checkpoint("qwen2", seed=1, num_key_value_heads=4)
    assert p2 != p1 and p1.parent == p2.parent == tmp_path / "tiny"
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == sorted([p1.name, p2.name])


def test_concurrent_builds_do_not_clash(tmp_path, monkeypatch):
    """Two builders of one key both finish building before either renames (a barrier forces the
    race): both get the same complete directory and no temporary directory is left behind."""
    monkeypatch.setenv("MAHALO_CACHE", str(tmp_path))
    barrier = threading.Barrier(2)
    real = tiny.make_tiny_checkpoint

    def build_then_wait(*args, **kw):
        out = real(*args, **kw)
        barrier.wait(timeout=60)
        return out

    monkeypatch.setattr(tiny, "make_tiny_checkpoint", build_then_wait)
    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(lambda _: tiny_checkpoint("mistral", seed=5), range(2)))
    assert paths[0] == paths[1]
    assert [e.name for e in (tmp_path / "tiny").iterdir()] == [paths[0].name]
    assert len(load_file(str(paths[0] / "model.safetensors"))) == 21


def test_option_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        make_tiny_checkpoint(tmp_path, "gpt2")
    with pytest.raises(ValueError, match="vocab_size must be >= 300"):
        make_tiny_checkpoint(tmp_path, "qwen2", vocab_size=100)
    with pytest.raises(ValueError, match="sliding_window is not available for family 'llama'"):
        make_tiny_checkpoint(tmp_path, "llama", sliding_window=4)
