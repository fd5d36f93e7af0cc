"""A `Decoder` over the parameters of an in-memory transformers ``*ForCausalLM``, shared, not copied.

An engine embedded in a training loop must sample from the weights the trainer is updating. The
native `Decoder` names its parameters as transformers does (``model.layers.{i}.self_attn.q_proj
.weight``, ...), so `as_decoder` builds one on the meta device and puts the transformers model's
own ``nn.Parameter`` objects into it: the same storage, version counters and ``requires_grad``.
An optimizer step on the transformers model is visible to the decoder with no copy, and the
transformers model is left as it was (its modules, train/eval mode and buffers are not touched).
Only the rotary frequencies, a non-persistent buffer, are the decoder's own (computed from the
config, as when loading a checkpoint).

Strict like checkpoint loading: every parameter the decoder expects must be there with its shape,
nothing else may be, and all share one dtype and device; each violation is a ValueError naming it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder


def config_of(model: Any) -> ModelConfig:
    """The `ModelConfig` of a transformers model (its ``config`` plus the generation config's EOS
    ids, as `ModelConfig.from_pretrained` reads them from a directory)."""
    hf_config = getattr(model, "config", None)
    if hf_config is None or not hasattr(hf_config, "to_dict"):
        raise TypeError(f"expected a mahalo Decoder or a transformers *ForCausalLM, got "
                        f"{type(model).__name__} (no .config)")
    config = ModelConfig.from_dict(hf_config.to_dict())
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is not None:
        if not (isinstance(eos, int) or (isinstance(eos, list)
                                         and all(isinstance(t, int) for t in eos))):
            raise ValueError(f"generation_config.eos_token_id must be an int or a list of ints, "
                             f"got {eos!r}")
        config.generation_eos_token_id = eos
    return config


def as_decoder(model: nn.Module) -> Decoder:
    """``model`` itself if it is a `Decoder`; for a transformers ``*ForCausalLM`` of a supported
    family (llama, mistral, qwen2, qwen3), a `Decoder` holding its very parameters."""
    if isinstance(model, Decoder):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a mahalo Decoder or a transformers *ForCausalLM, got "
                        f"{type(model).__name__}")
    config = config_of(model)
    given = dict(model.named_parameters(remove_duplicate=False))
    with torch.device("meta"):
        decoder = Decoder(config)
    expected = dict(decoder.named_parameters(remove_duplicate=False))
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{type(model).__name__} does not match the {config.model_type} decoder: "
                         f"missing parameters {missing}, unexpected {unexpected}")
    wrong = [f"{n}: {tuple(p.shape)}, expected {tuple(expected[n].shape)}"
             for n, p in sorted(given.items()) if p.shape != expected[n].shape]
    if wrong:
        raise ValueError(f"{type(model).__name__} has mis-shaped parameters: {wrong}")
    kinds = {(p.dtype, p.device) for p in given.values()}
    if len(kinds) != 1:
        raise ValueError(f"{type(model).__name__}'s parameters must share one dtype and device "
                         f"to be shared with the decoder, got {sorted(map(str, kinds))}")
    if config.tie_word_embeddings and given["lm_head.weight"] is not given[
            "model.embed_tokens.weight"]:
        raise ValueError(f"{type(model).__name__}: tie_word_embeddings is true but lm_head.weight "
                         "is not the embedding's parameter")
    for name, param in given.items():
        owner, _, leaf = name.rpartition(".")
        setattr(decoder.get_submodule(owner), leaf, param)
    (_dtype, device), = kinds
    decoder.model.rotary.to_empty(device=device)  # recomputes the frequencies on the device
    return decoder.eval()  # eval() of the decoder's own modules: the given model's mode stays
