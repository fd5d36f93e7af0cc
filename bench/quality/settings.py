"""Sizes and settings of the quality bench (`QualityConfig`), its presets, the cache key, and the
MAH-DPO recipe grid with the rule that picks from it.

``task`` picks the task module (`TASKS`: ``short``, `bench.quality.task`; ``long``,
`bench.quality.chain_task`); the ``long`` preset trains the long task's artefacts (SFT from the
short task's SFT policy, pairs, the MAH-DPO run, rollouts, PRM; no single-head DPO baselines),
``long-micro`` is its test size. Training settings are shared by the quick and full presets, so a full run after a quick one reuses
the trained artefacts and only evaluates more; the ``micro`` preset (tests) shrinks everything. The
cache key hashes the settings of the shared stages (SFT, pairs, rollouts, PRM); each DPO / MAH-DPO
run has its own cache directory named by its hyperparameters, so the grid never retrains the SFT.

The recipe grid (written down before any test-split number was seen; issue 21)
------------------------------------------------------------------------------
MAH-DPO is trained at every point of ``backbone lr × head lr × rpo_alpha`` (``grid_*`` below:
backbone frozen / a small lr / the single-head DPO lr; heads from the DPO lr up to 50× it; without
and with TRL's SFT term), each its own `training.mah_dpo` run with the same pairs, steps, batch and
seed. Single-head DPO is trained per objective at every ``dpo_lrs`` value. Every run is evaluated
on the **validation** problems only (``n_val``, sampling seed ``grid_seed``): the MAH-DPO runs at
head weights w_acc ∈ ``grid_sweep`` (0, 0.5, 1), the DPO runs as they are.

Selection rule (`SELECTION_RULE`): the MAH-DPO recipe with the largest hypervolume of its
validation front {(acc, style) at each w_acc} with reference point (0, 0); ties go to the earlier
grid point (smaller backbone lr, then smaller head lr, then smaller rpo_alpha). DPO[o]'s lr is the
one with the highest validation score on objective o (ties: the smaller lr). The test split is
evaluated only with the chosen runs. The full form runs the grid; the quick form (and the default
``python -m bench``) trains only ``RECORDED_RECIPE``, the full form's last choice, and says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from types import ModuleType

SELECTION_RULE = ("MAH-DPO: the largest hypervolume of the validation (acc, style) front over "
                  "w_acc in {0, 0.5, 1}, reference point (0, 0), ties to the earlier grid point; "
                  "DPO[o]: the lr with the highest validation score on o, ties to the smaller lr")

# Bump when the pipeline's recipe changes in a way the fields below do not capture.
RECIPE_VERSION = 2


# The task modules `QualityConfig.task` names (each exposes the names of `bench.quality.task`).
TASKS = {"short": "bench.quality.task", "long": "bench.quality.chain_task"}


@dataclass(frozen=True)
class QualityConfig:
    # -- task and data --------------------------------------------------------------------------
    task: str = "short"  # a key of TASKS: "short" (1-4 steps) or "long" (5-8 steps)
    data_seed: int = 0
    n_train: int = 12000  # SFT examples (one style each, drawn with p_terse)
    p_terse: float = 0.3  # share of terse answers in the SFT mixture
    n_val: int = 100  # validation problems: picks the SFT checkpoint (never the test split)
    n_pref: int = 300  # problems whose samples become preference pairs
    pref_samples: int = 4  # samples per preference problem
    n_prm: int = 120  # problems whose samples (plus MC rollouts) label the PRM
    n_prmq: int = 0  # held-out problems whose rollouts measure the PRM (`bench.quality.prm_quality`)
    judge_noise: float = 0.05  # std of the style judge's noise in training signals
    # Add the reference solutions (both styles) to each preference problem's candidates: only for
    # the micro preset, whose untrained policy produces no correct or boxed sample to pair.
    pairs_with_reference: bool = False
    # -- policy -----------------------------------------------------------------------------------
    hidden_size: int = 128
    num_layers: int = 2
    sft_init: str = ""  # "": SFT from a fresh tiny model; a preset name: from that preset's SFT policy
    sft_lr: float = 1e-3
    sft_batch: int = 32
    sft_segment: int = 150  # steps between validation checks
    sft_min_steps: int = 300
    sft_max_steps: int = 1200
    sft_target_acc: float = 0.45  # first checkpoint whose validation acc reaches this is kept
    max_length: int = 128  # longest training sequence (prompt + answer, tokens): SFT and DPO
    # -- DPO / MAH-DPO (every run: AdamW, 10 warmup steps, constant lr, β, batch per objective) ----
    dpo_beta: float = 0.1
    dpo_batch: int = 16
    dpo_steps: int = 80
    dpo_lrs: tuple[float, ...] = (2e-5, 1e-4)  # single-head DPO lr grid (2e-5: the old choice)
    grid_backbone_lrs: tuple[float, ...] = (0.0, 2e-6, 2e-5)  # frozen, small, the DPO lr
    grid_head_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    grid_rpo_alphas: tuple[float, ...] = (0.0, 1.0)
    grid_sweep: tuple[float, ...] = (0.0, 0.5, 1.0)  # w_acc values of a grid point's front
    grid_seed: int = 100  # sampling seed of the validation evaluation
    search_grid: bool = True  # False: train RECORDED_RECIPE only (the quick form)
    # False: train the MAH-DPO run only, no single-head DPO runs nor soups (the long task, whose
    # curves compare search methods on one policy; the quality tables need the baselines)
    baselines: bool = True
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
    max_seq_len: int = 160  # the engines' context (prompt + answer) and the PRM's --max-length
    # -- evaluation (not part of the cache key) ---------------------------------------------------
    n_test: int = 100
    seeds: tuple[int, ...] = (0, 1, 2)
    candidates: int = 4  # K for step search and best-of-K
    sweep: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))
    n_cost: int = 40  # problems for the search-vs-re-encode timing

    EVAL_FIELDS = ("n_test", "seeds", "candidates", "sweep", "n_cost")
    # DPO runs are cached per run (named by their hyperparameters), not under the key
    RUN_FIELDS = ("dpo_lrs", "grid_backbone_lrs", "grid_head_lrs", "grid_rpo_alphas", "grid_sweep",
                  "grid_seed", "search_grid", "baselines")

    # Fields added after the short task's artefacts were cached: in the key only when they differ
    # from these values, so the short task's cache directory keeps its name.
    LATER_FIELDS = {"task": "short", "n_prmq": 0, "max_length": 128, "max_seq_len": 160,
                    "sft_init": ""}

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        if self.sft_init and self.sft_init not in PRESETS:
            raise ValueError(f"sft_init must be '' or a preset name {PRESETS}, got {self.sft_init!r}")
        if self.search_grid and not self.baselines:
            raise ValueError("search_grid needs baselines: the grid chooses the single-head DPO lr too")

    def train_key(self) -> str:
        """sha256 (hex, 16 chars) of the shared stages' settings: the cache directory name."""
        skip = self.EVAL_FIELDS + self.RUN_FIELDS
        src = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip
               and not (k in self.LATER_FIELDS and v == self.LATER_FIELDS[k])}
        src["recipe"] = RECIPE_VERSION
        if self.sft_init:  # the initial weights are that preset's trained SFT policy
            src["sft_init_key"] = preset(self.sft_init).train_key()
        return hashlib.sha256(json.dumps(src, sort_keys=True).encode()).hexdigest()[:16]


def task_module(cfg: QualityConfig) -> ModuleType:
    """The task module ``cfg.task`` names (`TASKS`)."""
    import importlib  # why local: the task is chosen at run time by name

    return importlib.import_module(TASKS[cfg.task])


@dataclass(frozen=True)
class MahRecipe:
    """One MAH-DPO grid point."""

    backbone_lr: float
    head_lr: float
    rpo_alpha: float

    @property
    def name(self) -> str:
        return f"bb{self.backbone_lr:g}-head{self.head_lr:g}-rpo{self.rpo_alpha:g}"


@dataclass(frozen=True)
class Recipe:
    """The runs the test split is evaluated with: MAH-DPO's grid point and DPO[o]'s lr."""

    mah: MahRecipe
    dpo_lr: dict[str, float]


def mah_grid(cfg: QualityConfig) -> list[MahRecipe]:
    """Every MAH-DPO grid point in the tie-break order of the selection rule."""
    return [MahRecipe(b, h, a) for b in cfg.grid_backbone_lrs for h in cfg.grid_head_lrs
            for a in cfg.grid_rpo_alphas]


# The full form's last choice (bench/results/quality-20261207-cpu-2cores-nogpu-quality.md, its
# ablation), trained alone by the quick form.
RECORDED_RECIPE = Recipe(MahRecipe(backbone_lr=2e-6, head_lr=3e-4, rpo_alpha=0.0),
                         {"acc": 2e-5, "style": 2e-5})


# The long task's SFT checkpoint rule (written down before any test number was seen): starting
# from the short task's SFT policy (`sft_init`: it already writes worked +/- steps and boxes, which
# a from-scratch run on 2 shared cores cannot learn in minutes), segments of 150 steps from 300
# to at most 1500, each checkpoint scored on the 100 validation problems; the first whose
# accuracy reaches 0.40 is kept (else the best), a policy in the 30-60 % band that still
# makes per-step errors. gamma = 1: the PRM's acc value then estimates
# P(correct | prefix), the quantity its calibration plot checks. The MAH-DPO recipe is the
# short task's recorded choice (`RECORDED_RECIPE`; no grid is trained on the long task).
# PRM data: 300 problems (the first trained PRM, on 150, had a held-out step AUC of 0.565; more
# labelled steps is the one change made, decided before its result was seen, and kept whatever
# it gives).
_LONG = dict(task="long", n_train=24000, p_terse=0.2, n_val=100, n_pref=300, pref_samples=4,
             n_prm=300, n_prmq=60, sft_init="full", sft_segment=150, sft_min_steps=300,
             sft_max_steps=1500,
             sft_target_acc=0.40, max_length=208, max_new_tokens=96, max_seq_len=224, gamma=1.0,
             prm_steps=300, search_grid=False, baselines=False, n_test=100, seeds=(0,), n_cost=16)


PRESETS = ("full", "quick", "micro", "long", "long-micro")


def preset(name: str) -> QualityConfig:
    """``full`` (3 seeds), ``quick`` (1 seed, fewer problems, same training) or ``micro`` (tests)
    on the short task; ``long`` and ``long-micro`` (tests) on the long one."""
    if name == "long":
        return QualityConfig(**_LONG)
    if name == "long-micro":
        return dataclasses.replace(preset("micro"), task="long", n_prmq=3, sft_init="micro",
                                   search_grid=False, baselines=False,
                                   max_new_tokens=24,
                                   max_length=160, max_seq_len=192, gamma=1.0)
    if name == "full":
        return QualityConfig()
    if name == "quick":
        return dataclasses.replace(QualityConfig(), n_test=40, seeds=(0,), n_cost=16,
                                   search_grid=False)
    if name == "micro":
        return QualityConfig(
            n_train=64, n_val=4, n_pref=6, pref_samples=2, n_prm=3, hidden_size=32, num_layers=1,
            sft_batch=16, sft_segment=2, sft_min_steps=2, sft_max_steps=2, sft_target_acc=1.1,
            dpo_batch=4, dpo_steps=2, dpo_lrs=(2e-5, 1e-4), grid_backbone_lrs=(0.0,),
            grid_head_lrs=(1e-3,), grid_rpo_alphas=(0.0, 1.0), mc_rollouts=2,
            pairs_with_reference=True, prm_batch=4,
            prm_steps=2, max_new_tokens=16,
            n_test=3, seeds=(0,), candidates=2, sweep=(0.5,), n_cost=2)
    raise ValueError(f"preset must be full, quick, micro, long or long-micro, got {name!r}")
