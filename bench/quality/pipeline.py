"""The quality bench's training pipeline, through the project's public API and trainer CLIs only.
Every stage uses the task module ``cfg.task`` names (`bench.quality.settings.task_module`): its
splits, verifier, judge and styles.

1. ``sft``: a tiny Qwen2-shaped model (``mahalo_engine.tiny``) trained from scratch (or, with
   ``cfg.sft_init``, from that preset's SFT policy, trained or loaded in its own cache directory
   beside this one) by ``python -m training.sft`` on a mixture of worked and terse solutions, in
   segments; after each
   segment the exported policy is scored on the *validation* split, and the first checkpoint whose
   accuracy reaches the target (else the best one) is kept.
2. ``pairs``: the SFT policy's own samples on the preference split, scored by the verifier (acc)
   and the noisy style judge, turned into per-objective TRL pairs.
3. ``runs/<name>``: ``python -m training.mah_dpo`` with one objective (single-head DPO, per lr of
   the DPO grid) or both (MAH-DPO, 2 heads, equal α, per point of the recipe grid), same pairs,
   steps and settings; each run's validation front is stored beside it (``val.json``), and the
   rule of ``bench.quality.settings`` picks the runs the test split sees (``recipe.json``; the quick
   form trains only the recorded recipe). ``soups``: DPO Soups of the chosen DPO[acc] and
   DPO[style] (``python -m training.soup``) for every λ of the sweep. Without ``cfg.baselines``
   only the MAH-DPO run is trained (no single-head DPO, no soups).
4. ``rollouts``: the SFT policy's samples on the PRM split, plus M Monte-Carlo continuations from
   every proper prefix (``training.labels.generate_rollouts``: the engine samples them).
5. ``prm``: hindsight Monte-Carlo values per objective (``training.labels.monte_carlo_values``,
   z = correctness for acc, the judge's score for style) -> one multi-objective value PRM
   (``python -m training.prm --loss mse --objectives acc,style``).

Every stage writes its artefact under one cache directory keyed by the training configuration and
finishes by writing ``stage.json`` (its summary); a stage whose ``stage.json`` exists is skipped.
"""
from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from bench.quality import grid
from bench.quality.settings import QualityConfig, preset, task_module
from bench.quality.task import STEP_SEP, Problem
from mahalo_engine import Engine, load_policy
from mahalo_engine.text import split_steps
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.utils.paths import cache_dir
from training import mah_dpo, sft, soup
from training import prm as prm_cli
from training.labels import generate_rollouts, monte_carlo_values

SAMPLING_BOUNDARY = STEP_SEP  # every task separates its steps with "\n\n"
OBJECTIVES = ("acc", "style")


@dataclass
class Artefacts:
    root: Path
    sft: Path
    dpo_acc: Path | None  # the chosen runs (None: trained without baselines)
    dpo_style: Path | None
    mah_dpo: Path
    prm: Path
    soups: dict[float, Path]  # λ -> the DPO Soup λ·DPO[acc] + (1-λ)·DPO[style] (empty: none)
    summaries: dict[str, dict[str, Any]]
    selection: dict[str, Any]  # the recipe, how it was chosen, every run's validation front


def prompt_of(p: Problem) -> str:
    """The prompt string a policy sees for a problem (no chat template: the tiny tokenizer's
    template would only lengthen the prompt)."""
    return p.question + "\n"


def splits(cfg: QualityConfig) -> dict[str, list[Problem]]:
    """The problems of every split ``cfg`` uses, from its task (``prmq``: only with ``n_prmq``)."""
    task = task_module(cfg)
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "pref": cfg.n_pref, "prm": cfg.n_prm,
             "test": cfg.n_test}
    if cfg.n_prmq:
        if "prmq" not in task.SPLITS:
            raise ValueError(f"n_prmq = {cfg.n_prmq} but task {cfg.task!r} has no 'prmq' split")
        sizes["prmq"] = cfg.n_prmq
    return {name: task.make_split(name, n, cfg.data_seed) for name, n in sizes.items()}


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows `_write_jsonl` wrote (one JSON object a line; a blank line is an error)."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run_cli(main: Callable[[list[str]], int], argv: list[str]) -> None:
    """Run a trainer's CLI entry point in this process (the same code path as ``python -m``)."""
    rc = main([str(a) for a in argv])
    if rc:
        raise RuntimeError(f"trainer exited with status {rc}: {' '.join(map(str, argv))}")


def sample(policy_dir: Path, prompts: list[str], cfg: QualityConfig, *, seed: int,
           head_weights: Any = None) -> list[Any]:
    """``Engine.generate`` with the bench's sampling settings (all prompts in one batch)."""
    policy = load_policy(policy_dir)
    engine = Engine(policy, max_batch=min(256, max(1, len(prompts))), max_seq_len=cfg.max_seq_len,
                    cuda_graphs=False)
    return engine.generate(prompts, head_weights=head_weights, max_new_tokens=cfg.max_new_tokens,
                           temperature=cfg.temperature, top_k=cfg.top_k, seed=seed,
                           progress=True)


def _accuracy(policy_dir: Path, problems: list[Problem], cfg: QualityConfig, seed: int) -> float:
    verify = task_module(cfg).verify
    gens = sample(policy_dir, [prompt_of(p) for p in problems], cfg, seed=seed)
    return sum(verify(g.text, p.answer) for g, p in zip(gens, problems)) / max(1, len(problems))


class Pipeline:
    """Runs (or loads from the cache) every training stage for one `QualityConfig`."""

    def __init__(self, cfg: QualityConfig, root: Path, *, log: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.task = task_module(cfg)
        self.root = root
        self.log = log
        self.data = splits(cfg)
        self.summaries: dict[str, dict[str, Any]] = {}

    def run(self) -> Artefacts:
        self.root.mkdir(parents=True, exist_ok=True)
        self.stage("sft", self._sft)
        self.stage("pairs", self._pairs)
        selection = grid.choose(self)
        recipe = selection["recipe"]
        dpo_acc = dpo_style = None
        if self.cfg.baselines:
            dpo_acc = self.dpo_run(["acc"], lr=recipe["dpo_lr"]["acc"])
            dpo_style = self.dpo_run(["style"], lr=recipe["dpo_lr"]["style"])
        mah = self.mah_run(grid.mah_recipe(recipe))
        soups = self._soups(dpo_acc, dpo_style) if self.cfg.baselines else {}
        self.stage("rollouts", self._rollouts)
        self.stage("prm", self._prm)
        r = self.root
        return Artefacts(r, r / "sft" / "policy", dpo_acc, dpo_style, mah, r / "prm" / "prm", soups,
                         self.summaries, selection)

    # -- DPO / MAH-DPO runs (cached one by one under runs/) ---------------------------------------

    def dpo_run(self, objectives: list[str], *, lr: float) -> Path:
        """Single-head DPO on ``objectives`` (one) at ``lr``: the policy directory."""
        name = f"runs/dpo-{'+'.join(objectives)}-lr{lr:g}"
        self.stage(name, lambda d: self._dpo(d, objectives, ["--lr", lr]))
        return self.root / name / "policy"

    def mah_run(self, recipe) -> Path:
        """MAH-DPO (both objectives) at a grid point: the policy directory."""
        name = f"runs/mah-{recipe.name}"
        self.stage(name, lambda d: self._dpo(d, list(OBJECTIVES), [
            "--lr", recipe.head_lr, "--head-lr", recipe.head_lr, "--backbone-lr", recipe.backbone_lr,
            "--rpo-alpha", recipe.rpo_alpha]))
        return self.root / name / "policy"

    def validation_front(self, policy_dir: Path, weights: list[Any]) -> list[dict[str, float]]:
        """(acc, style) on the validation problems at each head weight vector, cached beside the
        run (``val.json``, keyed by the weights and the seed)."""
        cfg = self.cfg
        path = policy_dir.parent / "val.json"
        key = json.dumps({"weights": weights, "seed": cfg.grid_seed, "n": len(self.data["val"])})
        if path.is_file() and json.loads(path.read_text()).get("key") == key:
            return json.loads(path.read_text())["front"]
        problems = self.data["val"]
        verify, style_score = self.task.verify, self.task.style_score
        engine = Engine(load_policy(policy_dir), max_batch=max(1, len(problems)),
                        max_seq_len=cfg.max_seq_len, cuda_graphs=False)
        front = []
        for w in weights:
            gens = engine.generate([prompt_of(p) for p in problems], head_weights=w,
                                   max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k, seed=cfg.grid_seed)
            n = max(1, len(problems))
            front.append({"w": w, "acc": sum(verify(g.text, p.answer) for g, p in zip(gens, problems)) / n,
                          "style": sum(style_score(g.text) for g in gens) / n})
        path.write_text(json.dumps({"key": key, "front": front}, indent=1))
        return front

    def _soups(self, dpo_acc: Path, dpo_style: Path) -> dict[float, Path]:
        name = f"soups/{dpo_acc.parent.name}+{dpo_style.parent.name}"

        def make(d: Path) -> dict[str, Any]:
            for lam in self.cfg.sweep:
                _run_cli(soup.main, ["--models", dpo_acc, dpo_style, "--weights", lam,
                                     round(1.0 - lam, 12), "--out", d / f"lambda{lam:g}"])
            return {"lambdas": list(self.cfg.sweep), "artefact": str(d)}

        self.stage(name, make)
        return {lam: self.root / name / f"lambda{lam:g}" for lam in self.cfg.sweep}

    def stage(self, name: str, fn: Callable[[Path], dict[str, Any]]) -> None:
        """Run ``fn(directory)`` once: its summary is written to ``<root>/<name>/stage.json``, and
        a later call with that file present only loads the summary (``self.summaries[name]``)."""
        d = self.root / name
        marker = d / "stage.json"
        if marker.is_file():
            self.summaries[name] = json.loads(marker.read_text())
            self.log(f"[quality] {name}: cached ({_describe(self.summaries[name])})")
            return
        if d.exists():
            shutil.rmtree(d)  # a stage that did not finish: start it afresh
        d.mkdir(parents=True)
        t0 = time.perf_counter()
        summary = fn(d)
        summary["seconds"] = round(time.perf_counter() - t0, 1)
        marker.write_text(json.dumps(summary, indent=1))
        self.summaries[name] = summary
        self.log(f"[quality] {name}: {_describe(summary)}")

    # -- stages -----------------------------------------------------------------------------------

    def _base_model(self) -> Path:
        """The SFT's initial model: ``cfg.sft_init``'s SFT policy (trained or loaded from its own
        cache directory), else a fresh seeded tiny model."""
        if self.cfg.sft_init:
            init = preset(self.cfg.sft_init)
            note = f" (the SFT's initial policy: preset {self.cfg.sft_init!r})"
            pl = Pipeline(init, self.root.parent / init.train_key(),
                          log=lambda line: self.log(line + note))
            pl.root.mkdir(parents=True, exist_ok=True)
            pl.stage("sft", pl._sft)
            return pl.root / "sft" / "policy"
        h = self.cfg.hidden_size
        return tiny_checkpoint("qwen2", seed=self.cfg.data_seed, vocab_size=512, hidden_size=h,
                               intermediate_size=2 * h, num_layers=self.cfg.num_layers, num_heads=4,
                               num_key_value_heads=2)

    def _sft(self, d: Path) -> dict[str, Any]:
        cfg = self.cfg
        rng = random.Random(f"{cfg.data_seed}:styles")
        rows = [{"prompt": prompt_of(p),
                 "completion": p.solution("terse" if rng.random() < cfg.p_terse else "worked")}
                for p in self.data["train"]]
        _write_jsonl(d / "sft.jsonl", rows)
        work, keep = d / "run", d / "policy"
        base = self._base_model()
        history, best = [], None
        steps = cfg.sft_min_steps
        while True:
            argv = ["--model", base, "--data", d / "sft.jsonl", "--out", work,
                    "--optimizer", "adamw", "--lr", cfg.sft_lr, "--warmup-steps", 50,
                    "--batch-size", cfg.sft_batch, "--max-steps", steps, "--max-length", cfg.max_length,
                    "--seed", cfg.data_seed, "--log-every", 25]
            _run_cli(sft.main, argv + (["--resume"] if history else []))
            acc = _accuracy(work, self.data["val"], cfg, seed=0)
            history.append({"step": steps, "val_acc": acc})
            self.log(f"[quality] sft: step {steps}, validation acc {acc:.3f}")
            if best is None or acc > best["val_acc"]:
                best = history[-1]
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(work, keep, ignore=shutil.ignore_patterns("checkpoints", "log.jsonl"))
            if acc >= cfg.sft_target_acc:
                best = history[-1]
                break
            if steps >= cfg.sft_max_steps:
                break
            steps = min(cfg.sft_max_steps, steps + cfg.sft_segment)
        shutil.copy(work / "log.jsonl", d / "train_log.jsonl")
        shutil.rmtree(work)
        return {"kept_step": best["step"], "val_acc": best["val_acc"], "history": history,
                "examples": len(rows), "artefact": str(keep)}

    def _pairs(self, d: Path) -> dict[str, Any]:
        cfg = self.cfg
        verify, style_score = self.task.verify, self.task.style_score
        problems = self.data["pref"]
        n = cfg.pref_samples
        prompts = [prompt_of(p) for p in problems for _ in range(n)]
        gens = sample(self.root / "sft" / "policy", prompts, cfg, seed=1000)
        acc_rows, style_rows = [], []
        stats = {"samples": len(gens), "correct": 0}
        for i, p in enumerate(problems):
            texts = [g.text for g in gens[i * n:(i + 1) * n]]
            if cfg.pairs_with_reference:
                texts += [p.solution(s) for s in self.task.STYLES]
            correct = [t for t in texts if verify(t, p.answer)]
            wrong = [t for t in texts if not verify(t, p.answer)]
            stats["correct"] += sum(verify(g.text, p.answer) for g in gens[i * n:(i + 1) * n])
            for c, r in list(zip(correct, wrong))[:2]:
                acc_rows.append({"prompt": prompt_of(p), "chosen": c, "rejected": r})
            scored = sorted({t: style_score(t, noise=cfg.judge_noise, noise_seed=cfg.data_seed)
                             for t in texts}.items(), key=lambda kv: -kv[1])
            for (c, sc), (r, sr) in list(zip(scored, reversed(scored)))[:min(2, len(scored) // 2)]:
                if sc - sr >= 0.1:
                    style_rows.append({"prompt": prompt_of(p), "chosen": c, "rejected": r})
        if not acc_rows or not style_rows:
            raise RuntimeError(f"the SFT policy's samples gave {len(acc_rows)} acc and "
                               f"{len(style_rows)} style pairs: nothing to train DPO on")
        _write_jsonl(d / "acc.jsonl", acc_rows)
        _write_jsonl(d / "style.jsonl", style_rows)
        return {"acc_pairs": len(acc_rows), "style_pairs": len(style_rows),
                "sample_acc": round(stats["correct"] / max(1, stats["samples"]), 3),
                "artefact": str(d)}

    def _dpo(self, d: Path, objectives: list[str], lrs: list[Any]) -> dict[str, Any]:
        cfg = self.cfg
        pairs = self.root / "pairs"
        argv = ["--model", self.root / "sft" / "policy", "--out", d / "policy",
                "--objectives", ",".join(objectives), "--beta", cfg.dpo_beta,
                "--optimizer", "adamw", *lrs, "--warmup-steps", 10,
                "--batch-size", cfg.dpo_batch * len(objectives), "--max-steps", cfg.dpo_steps,
                "--max-length", cfg.max_length, "--seed", cfg.data_seed, "--log-every", 10,
                "--ref-cache", self.root / "ref_logps", "--balance", "replacement"]
        for o in objectives:
            argv += ["--data", f"{o}={pairs / (o + '.jsonl')}"]
            argv += ["--alpha", f"{o}={1.0 / len(objectives)}"]
        _run_cli(mah_dpo.main, argv)
        last = _last_log(d / "policy" / "log.jsonl")
        return {"objectives": objectives, "steps": cfg.dpo_steps, "args": [str(a) for a in lrs],
                **{k: round(v, 3) for k, v in last.items()
                   if k.endswith(("/acc", "/margin", "_drift", "/reward_acc")) or k == "first_token_kl"},
                "artefact": str(d / "policy")}

    def _rollouts(self, d: Path) -> dict[str, Any]:
        cfg = self.cfg
        n, rows = policy_rollouts(self.root / "sft" / "policy", self.data["prm"], cfg, seed=2000)
        _write_jsonl(d / "rollouts.jsonl", rows)
        return {"trajectories": n, "rollouts": len(rows),
                "rollout_acc": round(sum(r["final_reward"] for r in rows) / max(1, len(rows)), 3),
                "artefact": str(d / "rollouts.jsonl")}

    def _eos_text(self) -> str:
        return _eos_text_of(self.root / "sft" / "policy")

    def _prm(self, d: Path) -> dict[str, Any]:
        cfg = self.cfg
        rollouts = _read_jsonl(self.root / "rollouts" / "rollouts.jsonl")
        eos = self._eos_text()
        for r in rollouts:
            # A finished answer's last step reaches the PRM during search as the engine fed it:
            # "\boxed{N}" plus the EOS token (the policy stops there), so it is labelled there too;
            # with the trainer's default separator it would be read at an appended "\n\n" instead.
            if r["steps"] and self.task.extract_answer(r["steps"][-1]) is not None:
                r["steps"] = r["steps"][:-1] + [r["steps"][-1] + eos]
        acc = monte_carlo_values(rollouts, cfg.gamma)
        style = monte_carlo_values([{**r, "final_reward": r["style_reward"]} for r in rollouts],
                                   cfg.gamma)
        rows = [{"prompt": a["prompt"], "completions": a["completions"],
                 "labels": [[va, vs] for va, vs in zip(a["labels"], s["labels"])]}
                for a, s in zip(acc, style)]
        if any(a["completions"] != s["completions"] for a, s in zip(acc, style)):
            raise RuntimeError("acc and style Monte-Carlo values came out in different orders")
        _write_jsonl(d / "steps.jsonl", rows)
        argv = ["--model", self.root / "sft" / "policy", "--data", d / "steps.jsonl",
                "--out", d / "prm", "--loss", "mse", "--objectives", ",".join(OBJECTIVES),
                "--step-separator", "",  # steps keep their own "\n\n" (split_steps) or EOS
                "--optimizer", "adamw", "--lr", cfg.prm_lr, "--warmup-steps", 10,
                "--batch-size", cfg.prm_batch, "--max-steps", cfg.prm_steps,
                "--max-length", cfg.max_seq_len,
                "--seed", cfg.data_seed, "--log-every", 10]
        if cfg.prm_train_backbone:
            argv.append("--train-backbone")
        _run_cli(prm_cli.main, argv)
        last = _last_log(d / "prm" / "log.jsonl")
        n_steps = sum(len(r["completions"]) for r in rows)
        return {"trajectories": len(rows), "labelled_steps": n_steps,
                "final_mse": round(last.get("mse", float("nan")), 4), "artefact": str(d / "prm")}


def policy_rollouts(policy_dir: Path, problems: list[Problem], cfg: QualityConfig, *,
                    seed: int) -> tuple[int, list[dict[str, Any]]]:
    """(trajectories, rows): the policy's sample on each problem (seed ``seed``) plus ``cfg.mc_rollouts`` Monte-Carlo
    continuations from every proper prefix (``training.labels.generate_rollouts``, seeds from
    ``seed + 1000``), each with ``final_reward`` (the task's verifier) and ``style_reward`` (its
    noisy judge)."""
    task = task_module(cfg)
    gold = {prompt_of(p): p.answer for p in problems}
    gens = sample(policy_dir, [prompt_of(p) for p in problems], cfg, seed=seed)
    trajectories = [{"prompt": prompt_of(p), "steps": split_steps(g.text, SAMPLING_BOUNDARY)}
                    for p, g in zip(problems, gens) if g.text]

    def verifier(prompt: str, steps: list[str]) -> float:
        return float(task.verify("".join(steps), gold[prompt]))

    rows = generate_rollouts(load_policy(policy_dir), trajectories, verifier, cfg.mc_rollouts,
                             boundary=SAMPLING_BOUNDARY, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_k=cfg.top_k, seed=seed + 1000,
                             chat_template=False)
    for r in rows:  # the style objective's final reward, on the same rollouts
        r["style_reward"] = task.style_score("".join(r["steps"]), noise=cfg.judge_noise,
                                             noise_seed=cfg.data_seed)
    return len(trajectories), rows


def _eos_text_of(policy_dir: Path) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    if tok.eos_token is None:
        raise ValueError(f"{policy_dir}: the tokenizer has no EOS token")
    return tok.eos_token


def _last_log(path: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {k: v for k, v in lines[-1].items() if isinstance(v, (int, float))} if lines else {}


def _describe(summary: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("history", "calibration"))


def train_or_load(cfg: QualityConfig, *, no_cache: bool = False, root: Path | None = None,
                  log: Callable[[str], None] = print) -> Artefacts:
    """Every trained artefact of ``cfg``, from the cache when present (``no_cache`` retrains)."""
    root = root if root is not None else cache_dir("quality", cfg.train_key())
    if no_cache and root.exists():
        shutil.rmtree(root)
    torch.manual_seed(cfg.data_seed)
    return Pipeline(cfg, root, log=log).run()
