"""MAHALO engine: multi-action-head policies, PRMs and PRM-guided step search.

The public names of docs/design.md live here; each comes from the module that owns it and is
imported on first use, so ``import mahalo_engine`` (and every CLI that needs only part of it)
imports no submodule, loads no C++ extension and compiles nothing.
"""
from __future__ import annotations

import importlib

# public name -> the module that owns it
_OWNERS = {
    "KVCache": "mahalo_engine.cache",
    "ModelConfig": "mahalo_engine.model_config",
    "Boundary": "mahalo_engine.boundary",
    "boxed_closed": "mahalo_engine.stop_conditions",
    **dict.fromkeys(("CallableScorer", "Engine", "Generation", "Scorer", "SearchConfig",
                     "SearchResult", "SharedBackbonePRM", "Step", "ValueModelPRM",
                     "WeightedScorer"), "mahalo_engine.engine"),
    "load_heads": "mahalo_engine.heads",
    "save_heads": "mahalo_engine.heads",
    "Decoder": "mahalo_engine.models.decoder",
    "Policy": "mahalo_engine.policy",
    "load_policy": "mahalo_engine.policy",
    **dict.fromkeys(("ValueHead", "ValueModel", "load_prm", "save_prm"),
                    "mahalo_engine.value_model"),
    "make_tiny_checkpoint": "mahalo_engine.tiny",
    "tiny_checkpoint": "mahalo_engine.tiny",
    "load_decoder": "mahalo_engine.models.loader",
    "save_checkpoint": "mahalo_engine.models.loader",
}

__all__ = sorted(_OWNERS)


def __getattr__(name: str):
    owner = _OWNERS.get(name)
    if owner is None:
        raise AttributeError(f"module 'mahalo_engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(owner), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
