"""MAHALO engine: multi-action-head policies, PRMs and PRM-guided step search.

The public names of docs/design.md live here; each comes from the module that owns it.
"""
from mahalo_engine.cache import KVCache
from mahalo_engine.config import ModelConfig
from mahalo_engine.engine import (Boundary, CallableScorer, Engine, Generation, Scorer,
                                  SearchConfig, SearchResult, SharedBackbonePRM, Step,
                                  ValueModelPRM, WeightedScorer, boxed_closed)
from mahalo_engine.heads import load_heads, save_heads
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.policy import Policy, load_policy
from mahalo_engine.prm import ValueHead, ValueModel, load_prm, save_prm
from mahalo_engine.tiny import make_tiny_checkpoint, tiny_checkpoint
from mahalo_engine.utils.loader import load_decoder, save_checkpoint

__all__ = [
    "Boundary", "CallableScorer", "Decoder", "Engine", "Generation", "KVCache", "ModelConfig",
    "Policy", "Scorer", "SearchConfig", "SearchResult", "SharedBackbonePRM", "Step", "ValueHead",
    "ValueModel", "ValueModelPRM", "WeightedScorer", "boxed_closed", "load_decoder", "load_heads",
    "load_policy", "load_prm", "make_tiny_checkpoint", "save_checkpoint", "save_heads", "save_prm",
    "tiny_checkpoint",
]
