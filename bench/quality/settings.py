"""Sizes and settings of the quality bench (`QualityConfig`), its presets, and the cache key.

Training settings (``TRAIN_FIELDS``) are shared by the quick and full presets, so a full run after a
quick one reuses the trained artefacts and only evaluates more problems with more seeds; the
``micro`` preset (tests) shrinks everything. The cache key hashes the training fields only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

# Bump when the pipeline's recipe changes in a way the fields below do not capture.
RECIPE_VERSION = 2


@dataclass(frozen=True)
class QualityConfig:
    # -- task and data --------------------------------------------------------------------------
    data_seed: int = 0
    n_train: int = 12000  # SFT examples (one style each, drawn with p_terse)
    p_terse: float = 0.3  # share of terse answers in the SFT mixture
    n_val: int = 100  # validation problems: picks the SFT checkpoint (never the test split)
    n_pref: int = 300  # problems whose samples become preference pairs
    pref_samples: int = 4  # samples per preference problem
    n_prm: int = 120  # problems whose samples (plus MC rollouts) label the PRM
    judge_noise: float = 0.05  # std of the style judge's noise in training signals
    # Add the reference solutions (both styles) to each preference problem's candidates: only for
    # the micro preset, whose untrained policy produces no correct or boxed sample to pair.
    pairs_with_reference: bool = False
    # -- policy -----------------------------------------------------------------------------------
    hidden_size: int = 128
    num_layers: int = 2
    sft_lr: float = 1e-3
    sft_batch: int = 32
    sft_segment: int = 150  # steps between validation checks
    sft_min_steps: int = 300
    sft_max_steps: int = 1200
    sft_target_acc: float = 0.45  # first checkpoint whose validation acc reaches this is kept
    # -- DPO / MAH-DPO ----------------------------------------------------------------------------
    dpo_lr: float = 2e-5  # chosen on the validation split (1e-4 lowered validation acc)
    dpo_beta: float = 0.1
    dpo_batch: int = 16
    dpo_steps: int = 80
    # -- PRM ----------------------------------------------------------------------------------
    mc_rollouts: int = 4  # M continuations per prefix
    gamma: float = 0.9
    prm_lr: float = 3e-4
    prm_batch: int = 16
    prm_steps: int = 150
    prm_train_backbone: bool = True
    # -- sampling (the same everywhere: training samples and evaluation) ---------------------------
    temperature: float = 0.7
    top_k: int = 50
    max_new_tokens: int = 48
    # -- evaluation (not part of the cache key) ---------------------------------------------------
    n_test: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    candidates: int = 4  # K for step search and best-of-K
    sweep: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    n_cost: int = 40  # problems for the search-vs-re-encode timing

    EVAL_FIELDS = ("n_test", "seeds", "candidates", "sweep", "n_cost")

    def train_key(self) -> str:
        """sha256 (hex, 16 chars) of the training fields: the artefact cache directory name."""
        src = {k: v for k, v in dataclasses.asdict(self).items() if k not in self.EVAL_FIELDS}
        src["recipe"] = RECIPE_VERSION
        return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def preset(name: str) -> QualityConfig:
    """``full`` (3 seeds), ``quick`` (1 seed, fewer problems, same training) or ``micro`` (tests)."""
    if name == "full":
        return QualityConfig()
    if name == "quick":
        return dataclasses.replace(QualityConfig(), n_test=40, seeds=(0,), n_cost=16)
    if name == "micro":
        return QualityConfig(
            n_train=64, n_val=4, n_pref=6, pref_samples=2, n_prm=3, hidden_size=32, num_layers=1,
            sft_batch=16, sft_segment=2, sft_min_steps=2, sft_max_steps=2, sft_target_acc=1.1,
            dpo_batch=4, dpo_steps=2, mc_rollouts=2, pairs_with_reference=True, prm_batch=4,
            prm_steps=2, max_new_tokens=16,
            n_test=3, seeds=(0,), candidates=2, sweep=(0.5,), n_cost=2)
    raise ValueError(f"preset must be full, quick or micro, got {name!r}")
