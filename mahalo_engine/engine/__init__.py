"""PRM-guided step search and batched generation over one slot KV cache (see `engine.py`)."""
from mahalo_engine.boundary import PRESETS, Boundary
from mahalo_engine.engine.records import Beam, Generation, SearchConfig, SearchResult, Step
from mahalo_engine.stop_conditions import boxed_closed
from mahalo_engine.engine.engine import Engine
from mahalo_engine.engine.scorers import (CallableScorer, Scorer, SharedBackbonePRM,
                                          ValueModelPRM, WeightedScorer)

__all__ = ["Engine", "SearchConfig", "SearchResult", "Step", "Beam", "Generation", "Boundary",
           "PRESETS", "boxed_closed", "Scorer", "ValueModelPRM", "SharedBackbonePRM",
           "WeightedScorer", "CallableScorer"]
