"""PRM-guided step search and batched generation over one slot KV cache (see `engine.py`)."""
from mahalo_engine.engine.boundary import PRESETS, Boundary
from mahalo_engine.engine.config import (Generation, SearchConfig, SearchResult, Step,
                                         boxed_closed)
from mahalo_engine.engine.engine import Engine
from mahalo_engine.engine.scorers import (CallableScorer, Scorer, SharedBackbonePRM,
                                          ValueModelPRM, WeightedScorer)

__all__ = ["Engine", "SearchConfig", "SearchResult", "Step", "Generation", "Boundary", "PRESETS",
           "boxed_closed", "Scorer", "ValueModelPRM", "SharedBackbonePRM", "WeightedScorer",
           "CallableScorer"]
