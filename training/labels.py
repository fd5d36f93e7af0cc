"""PRM label builders: hindsight relabelling, Monte-Carlo values, judge labels (Cases A/B), BT pairs (C).

Every builder turns trajectories (a prompt plus a list of step strings) into training rows for
``training.prm``: step data ``{"prompt", "completions", "labels"}`` or BT pairs
``{"prompt", "chosen": [steps], "rejected": [steps]}``. Judges and verifiers are plain Python callables
``fn(prompt: str, steps: list[str]) -> float | bool`` (a rule, a model, an API), named on the command
line as ``module:function``. Rollouts are sampled by the engine (``Engine.generate``: batched, KV-cached).

The expensive commands (``rollouts``, ``judge-votes``, ``judge-prefix``) append each trajectory's
rows to ``--out`` as soon as they are done; after Ctrl-C (or a crash) ``--resume`` keeps the
finished trajectories and continues with the next one, ``--overwrite`` starts afresh. Under
``torchrun`` they run data-parallel (``mahalo_engine.sharded``): trajectories sharded over ranks, each
rank sampling on its own device, rank 0 writing ``--out`` in input order; trajectory i samples
with seed ``--seed + i``, so any number of processes writes the same file.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from mahalo_engine.text import encode_prompt, encode_step, split_steps
from mahalo_engine.utils.cli import (HelpFormatter, Interrupted, add_boundary_arg, add_debug_flag,
                                     parse_boundaries, run_cli)
from mahalo_engine.distributed import DistInfo, cleanup, exit_process, launched_by_torchrun
from mahalo_engine.sharded import on_main, prepare_output, run_sharded, setup
from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.outputs import OutputLock, check_not_input, options_of
from mahalo_engine.utils.paths import check_model_dir
from training.readers import DataError, read_preferences, read_rollouts, read_trajectories

log = logging.getLogger(__name__)

Judge = Callable[[str, list[str]], "float | bool"]


def hindsight_targets(step_rewards: Sequence[float], final_reward: float, gamma: float) -> list[float]:
    """Hindsight-relabelled per-step targets ``r̃_t = r_t + γ^(n-t) · z`` for t = 1..n.

    ``z`` is the final reward (e.g. 1 if the answer is correct, else 0); the last step gets
    ``r_n + z`` and earlier steps a discounted share of it.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if not math.isfinite(final_reward):
        raise ValueError(f"final_reward must be finite, got {final_reward}")
    rewards = [float(r) for r in step_rewards]
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"step_rewards must be finite, got {bad}")
    n = len(rewards)
    return [r + gamma ** (n - t) * final_reward for t, r in enumerate(rewards, start=1)]


def monte_carlo_values(rollouts: Iterable[dict[str, Any]], gamma: float) -> list[dict[str, Any]]:
    """Step data whose label at step k is the Monte-Carlo value ``V_k`` of the prefix
    ``(prompt, steps[:k])``: the mean relabelled return (``hindsight_targets``) over the rollouts
    that pass through that prefix *as policy samples*.

    A rollout's optional ``prefix_len`` (default 0) says how many of its leading steps were given
    rather than sampled; it counts for prefix k only when ``k >= prefix_len``, so rollouts branched
    later (forced through more of a trajectory) never bias an earlier prefix's value. Each distinct
    trajectory becomes one row; one whose prefixes are not all covered is skipped with a warning.
    """
    sums: dict[tuple, list[float]] = {}  # (prompt, prefix steps) -> [sum of returns, count]
    trajectories: OrderedDict[tuple, None] = OrderedDict()
    for r in rollouts:
        targets = hindsight_targets(r["step_rewards"], r["final_reward"], gamma)
        steps = tuple(r["steps"])
        for k in range(max(1, r.get("prefix_len", 0)), len(steps) + 1):
            acc = sums.setdefault((r["prompt"], steps[:k]), [0.0, 0])
            acc[0] += targets[k - 1]
            acc[1] += 1
        trajectories[(r["prompt"], steps)] = None
    rows, skipped = [], 0
    for prompt, steps in trajectories:
        stats = [sums.get((prompt, steps[:k])) for k in range(1, len(steps) + 1)]
        if any(s is None for s in stats):
            skipped += 1
            continue
        rows.append({"prompt": prompt, "completions": list(steps),
                     "labels": [s[0] / s[1] for s in stats]})
    if skipped:
        log.warning("skipped %d trajectories with a prefix that no sampled rollout passes through",
                    skipped)
    return rows


def _judge_value(judge: Judge, prompt: str, steps: list[str]) -> float:
    v = judge(prompt, list(steps))
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"judge returned a non-finite value {v} for prompt {prompt[:60]!r}")
    return v


def judge_vote_labels(prompt: str, steps: Sequence[str], continuations: Sequence[Sequence[list[str]]],
                      judge: Judge) -> list[float]:
    """Case A: label_k = mean over the rollouts from prefix k of ``judge(prompt, steps[:k] + rollout)``.

    ``continuations[k-1]`` holds the M rollouts (each a list of steps) sampled after ``steps[:k]``.
    With a 0/1 judge this is the fraction of votes for "good": a soft label for BCE.
    """
    if len(continuations) != len(steps):
        raise ValueError(f"need one list of rollouts per step ({len(steps)}), got {len(continuations)}")
    labels = []
    for k, conts in enumerate(continuations, start=1):
        if not conts:
            raise ValueError(f"no rollouts for prefix {k} of prompt {prompt[:60]!r}")
        labels.append(sum(_judge_value(judge, prompt, list(steps[:k]) + list(c)) for c in conts)
                      / len(conts))
    return labels


def judge_prefix_labels(prompt: str, steps: Sequence[str], judge: Judge) -> list[float]:
    """Case B: label_k = ``judge(prompt, steps[:k])``: the judge scores each prefix itself."""
    return [_judge_value(judge, prompt, list(steps[:k])) for k in range(1, len(steps) + 1)]


def bt_prefix_pairs(prompt: str, chosen: str, rejected: str,
                    boundary: Any) -> list[dict[str, Any]]:
    """Case C: Bradley–Terry pairs of partial sequences from one preference pair.

    Both responses are split into steps at ``boundary`` (`mahalo_engine.text.split_steps`: a
    literal string, a list of them, or a preset counting no tokens such as ``math``); pair k
    (k = 1..max(n_c, n_r)) compares the first k steps of the chosen response with the first k of
    the rejected one (the shorter side stays whole once exhausted), so a PRM learns to rank
    partial responses as it will see them during search. Identical pairs are dropped.
    """
    c, r = split_steps(chosen, boundary), split_steps(rejected, boundary)
    if not c or not r:
        raise ValueError(f"chosen and rejected must be non-empty for prompt {prompt[:60]!r}")
    pairs, seen = [], set()
    for k in range(1, max(len(c), len(r)) + 1):
        key = (tuple(c[:k]), tuple(r[:k]))
        if key[0] == key[1] or key in seen:
            continue
        seen.add(key)
        pairs.append({"prompt": prompt, "chosen": c[:k], "rejected": r[:k]})
    return pairs


ROLLOUT_BATCH = 32  # continuations sampled at once (one engine call's batch)


def rollout_engine(policy, max_seq_len: int) -> Any:
    """The `Engine` rollouts sample with: ``ROLLOUT_BATCH`` rows of up to ``max_seq_len`` tokens.
    A labelling run builds one per process and passes it to every `sample_continuations` call."""
    # Imported here: the engine and Triton take seconds to import, and the labelling commands
    # without a policy (hindsight, mc, bt-pairs, the judges) never use them.
    from mahalo_engine.engine import Engine

    return Engine(policy, max_batch=ROLLOUT_BATCH, max_seq_len=max_seq_len, cuda_graphs=False)


def rollout_context_len(policy, trajectories: Sequence[dict[str, Any]], *, max_new_tokens: int,
                        chat_template: bool) -> int:
    """The longest context (prompt + every step but the last + ``max_new_tokens`` + 1) the
    rollouts of ``trajectories`` sample from: the ``max_seq_len`` of their one engine."""
    tok = policy.tokenizer
    longest = 0
    for t in trajectories:
        steps = list(t["steps"])[:-1]
        longest = max(longest, len(encode_prompt(tok, t["prompt"], chat_template))
                      + sum(len(encode_step(tok, s)) for s in steps))
    return longest + max_new_tokens + 1


def sample_continuations(policy, prompt: str, prefixes: Sequence[Sequence[str]], m: int, *,
                         boundary: Any, max_new_tokens: int, temperature: float,
                         top_k: int, seed: int, chat_template: bool,
                         top_p: float = 1.0, min_p: float = 0.0,
                         engine: Any = None) -> list[list[list[str]]]:
    """M continuations sampled by the engine (batched, KV-cached) after each prefix, each split
    into steps at ``boundary`` (`mahalo_engine.text.split_steps` with the policy's tokenizer: a
    preset, literal strings, …). Returns ``out[j][i]``: the steps of continuation i after
    ``prefixes[j]``. The prefix steps are tokenised one by one, as the engine and PRM see them.
    ``engine``: an `Engine` of this policy to sample with (its caches reused from call to call,
    `rollout_engine`); None, or one too short for these contexts: a new one for this call."""
    if not prefixes:
        return []
    tok = policy.tokenizer
    prompt_ids = encode_prompt(tok, prompt, chat_template)
    contexts = [prompt_ids + [t for s in pre for t in encode_step(tok, s)] for pre in prefixes]
    flat = [ctx for ctx in contexts for _ in range(m)]
    need = max(len(c) for c in flat) + max_new_tokens + 1
    if engine is None or engine.max_seq_len < need:
        engine = rollout_engine(policy, need)
    gens = engine.generate(flat, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_k=top_k, top_p=top_p, min_p=min_p, seed=seed)
    steps = [split_steps(g.text, boundary, tok) if g.text else [] for g in gens]
    return [steps[j * m:(j + 1) * m] for j in range(len(prefixes))]


def load_callable(spec: str) -> Callable:
    """``"package.module:function"`` -> the function (a judge or a verifier)."""
    mod, sep, name = spec.partition(":")
    if not sep or not mod or not name:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    sys.path.insert(0, str(Path.cwd()))
    try:
        fn = getattr(importlib.import_module(mod), name)
    except AttributeError as e:
        raise ValueError(f"module {mod!r} has no attribute {name!r}") from e
    finally:
        sys.path.pop(0)
    if not callable(fn):
        raise TypeError(f"{spec} is not callable")
    return fn


def trajectory_rollouts(policy, traj: dict[str, Any], verifier: Judge, m: int, *,
                        step_reward: Judge | None = None, **sampling: Any) -> list[dict[str, Any]]:
    """One trajectory's rows for ``monte_carlo_values``: the trajectory itself
    (``prefix_len = n``, first) plus M continuations sampled after each proper prefix
    ``steps[:k]`` (``prefix_len = k``, k < n): ``1 + (n - 1) * m`` rows. Every completed rollout
    gets ``final_reward = verifier(prompt, steps)`` and per-step rewards
    ``step_reward(prompt, steps[:t])`` (0 without one)."""
    prompt, steps = traj["prompt"], list(traj["steps"])
    n = len(steps)
    conts = sample_continuations(policy, prompt, [steps[:k] for k in range(1, n)], m, **sampling)
    completed = [(steps, n)] + [(steps[:k] + c, k) for k, cs in enumerate(conts, start=1)
                                for c in cs]
    out = []
    for full, prefix_len in completed:
        rewards = ([_judge_value(step_reward, prompt, full[:t]) for t in range(1, len(full) + 1)]
                   if step_reward else [0.0] * len(full))
        out.append({"prompt": prompt, "steps": full, "step_rewards": rewards,
                    "final_reward": _judge_value(verifier, prompt, full),
                    "prefix_len": prefix_len})
    return out


def generate_rollouts(policy, trajectories: Iterable[dict[str, Any]], verifier: Judge, m: int, *,
                      step_reward: Judge | None = None, seed: int = 0,
                      **sampling: Any) -> list[dict[str, Any]]:
    """``trajectory_rollouts`` of every trajectory, in order, from one engine: trajectory i
    samples with ``seed + i``, as ``python -m training.labels rollouts`` does (so two
    trajectories that share a prefix get independent rollouts)."""
    trajectories = list(trajectories)
    if sampling.get("engine") is None:
        sampling["engine"] = rollout_engine(policy, rollout_context_len(
            policy, trajectories, max_new_tokens=sampling["max_new_tokens"],
            chat_template=sampling["chat_template"]))
    return [row for i, traj in enumerate(tqdm(trajectories, desc="rollouts", unit="traj"))
            for row in trajectory_rollouts(policy, traj, verifier, m, step_reward=step_reward,
                                           seed=seed + i, **sampling)]


# Options that shape the rows of the trajectory commands (rollouts, judge-votes, judge-prefix):
# stored beside --out (<out>.meta.json) and compared on --resume.
RESULT_OPTIONS = ("cmd", "policy", "m", "boundary", "max_new_tokens", "temperature", "top_k",
                  "top_p", "min_p", "seed", "chat_template", "verifier", "step_reward", "judge")

# Trajectories per rank in one round of a torchrun run: a round waits for its slowest
# trajectory, so several per rank even out their lengths; one process writes each as it finishes.
ROUND_PER_RANK = 4


def _label_incrementally(args: argparse.Namespace, trajectories: list[dict[str, Any]],
                         label: Callable[[int, dict[str, Any]], list[dict[str, Any]]],
                         rows_per_traj: Callable[[dict[str, Any]], int], info: DistInfo) -> int:
    """``label(i, trajectory i)`` for every trajectory not yet in ``--out``, appended in input
    order as each finishes (under torchrun: trajectories sharded over ranks, rank 0 writing after
    each round, `mahalo_engine.sharded`); an interrupt leaves the finished ones and says how to
    resume."""
    def first_row(i: int, row: dict[str, Any]) -> bool:
        t = trajectories[i]
        return row.get("prompt") == t["prompt"] and \
            row.get("steps", row.get("completions")) == list(t["steps"])

    output = on_main(lambda: prepare_output(
        args.out, [rows_per_traj(t) for t in trajectories], first_row, resume=args.resume,
        overwrite=args.overwrite, item="trajectory", items="trajectories",
        options=options_of(args, RESULT_OPTIONS) | {
            "policy": str(args.policy.resolve()) if getattr(args, "policy", None) else None}),
        info)
    done = written = output.done
    bar = tqdm(desc=args.cmd, unit="traj", initial=done, total=len(trajectories),
               disable=not info.is_main)

    def write(i: int, rows: list[dict[str, Any]]) -> None:
        nonlocal written
        output.append(rows)
        written += 1
        bar.update(1)

    try:
        run_sharded(len(trajectories), lambda i: label(i, trajectories[i]), write, info,
                    start=done, per_rank=ROUND_PER_RANK if info.distributed else 1)
    except KeyboardInterrupt:
        if not info.is_main:
            raise Interrupted(f"rank {info.rank} interrupted") from None
        raise Interrupted(f"interrupted after {written} of {len(trajectories)} trajectories "
                          f"(kept in {args.out}); resume with --resume") from None
    finally:
        bar.close()
    return written


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.labels", formatter_class=HelpFormatter,
        description="Build PRM training labels. Judges/verifiers are 'module:function' callables "
        "fn(prompt: str, steps: list[str]) -> float. Output: step data "
        '{"prompt","completions","labels"} or BT pairs {"prompt","chosen":[..],"rejected":[..]}.')
    sub = p.add_subparsers(dest="cmd", required=True)

    def subcommand(name: str, **kw: Any) -> argparse.ArgumentParser:
        q = sub.add_parser(name, formatter_class=HelpFormatter, **kw)
        add_debug_flag(q)
        return q

    def resumable(q: argparse.ArgumentParser) -> None:
        q.add_argument("--resume", action="store_true",
                       help="keep the trajectories --out already holds and label the rest")
        q.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    h = subcommand("hindsight", help="one rollout -> per-step targets r_t + gamma^(n-t) z (M=1)")
    m = subcommand("mc", help="Monte-Carlo values: mean relabelled return over rollouts sharing "
                       "each prefix")
    for q in (h, m):
        q.add_argument("--rollouts", type=Path, required=True,
                       help='jsonl of {"prompt","steps","step_rewards","final_reward"}')
        q.add_argument("--gamma", type=float, default=0.9, help="discount (default 0.9, the paper's)")
        q.add_argument("--out", type=Path, required=True, help="output jsonl")

    def sampling_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--policy", type=Path, required=True, help="policy directory (load_policy)")
        # --rollouts-per-prefix: torchrun's own parser rejects "--m" as an ambiguous prefix of
        # its options (--master-port, ...), even after the module name.
        q.add_argument("--m", "--rollouts-per-prefix", type=int, default=4,
                       help="rollouts per prefix (default 4); spell it --rollouts-per-prefix "
                            "under torchrun")
        add_boundary_arg(q)
        q.add_argument("--max-new-tokens", type=int, default=256,
                       help="tokens per sampled continuation")
        q.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
        q.add_argument("--top-k", type=int, default=0, help="0 = no truncation")
        q.add_argument("--top-p", type=float, default=1.0,
                       help="nucleus sampling (after --top-k), in (0, 1]; 1 = off")
        q.add_argument("--min-p", type=float, default=0.0,
                       help="keep tokens with probability >= P times the top token's; 0 = off")
        q.add_argument("--seed", type=int, default=0,
                       help="sampling seed: trajectory i (from 0) samples with seed + i")
        q.add_argument("--chat-template", action="store_true",
                       help="wrap string prompts in the tokenizer's chat template")
        q.add_argument("--device", default="cpu",
                       help="cpu or cuda (under torchrun each rank uses cuda:LOCAL_RANK)")
        resumable(q)

    r = subcommand("rollouts", help="sample M rollouts from every prefix of each trajectory and "
                       "score them with a verifier (input for 'mc')")
    r.add_argument("--data", type=Path, required=True, help='jsonl of {"prompt","steps"}')
    r.add_argument("--verifier", required=True, help="module:function giving the final reward z")
    r.add_argument("--step-reward", default=None, help="module:function giving r_t (default 0)")
    r.add_argument("--out", type=Path, required=True, help="output jsonl (rollouts)")
    sampling_args(r)

    a = subcommand("judge-votes", help="Case A: a judge votes over M rollouts from each prefix "
                       "(soft labels for --loss bce)")
    a.add_argument("--data", type=Path, required=True, help='jsonl of {"prompt","steps"}')
    a.add_argument("--judge", required=True, help="module:function returning 0/1 or [0,1]")
    a.add_argument("--out", type=Path, required=True, help="output jsonl (step data)")
    sampling_args(a)

    b = subcommand("judge-prefix", help="Case B: the judge scores each prefix itself")
    b.add_argument("--data", type=Path, required=True, help='jsonl of {"prompt","steps"}')
    b.add_argument("--judge", required=True, help="module:function returning a float label")
    b.add_argument("--out", type=Path, required=True, help="output jsonl (step data)")
    resumable(b)

    c = subcommand("bt-pairs", help="Case C: Bradley-Terry pairs of chosen/rejected prefixes")
    c.add_argument("--data", type=Path, required=True,
                   help='preference jsonl {"prompt","chosen","rejected"} (string fields)')
    add_boundary_arg(c)
    c.add_argument("--out", type=Path, required=True, help="output jsonl (BT pairs)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    check_not_input(args.out, {f"--{k}": getattr(args, k, None) for k in ("data", "rollouts")})
    if getattr(args, "policy", None) is not None:
        check_model_dir(args.policy, "--policy")
    if args.cmd in ("judge-prefix", "rollouts", "judge-votes"):
        info = setup(getattr(args, "device", "cpu"))
        lock = OutputLock(args.out)  # taken by rank 0, the writer
        try:
            on_main(lock.acquire, info)
            return _label_trajectories(args, info)
        finally:
            lock.release()
            cleanup(info)
    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return 0  # a cheap single-pass command: rank 0 does it alone
    with OutputLock(args.out):
        return _label_all(args)


def _label_all(args: argparse.Namespace) -> int:
    """hindsight, mc, bt-pairs: every row computed, then --out written at once."""
    if args.cmd in ("hindsight", "mc"):
        rollouts = read_rollouts(args.rollouts)
        if args.cmd == "hindsight":
            rows = [{"prompt": r["prompt"], "completions": r["steps"],
                     "labels": hindsight_targets(r["step_rewards"], r["final_reward"], args.gamma)}
                    for r in rollouts]
        else:
            rows = monte_carlo_values(rollouts, args.gamma)
    else:
        rows, boundary = [], parse_boundaries(args.boundary)
        for pair in read_preferences([(None, args.data)], default_objective="bt").pairs:
            if not all(isinstance(x, str) for x in (pair.prompt, pair.chosen, pair.rejected)):
                raise DataError(f"{pair.source}: bt-pairs needs string prompt/chosen/rejected")
            rows.extend(bt_prefix_pairs(pair.prompt, pair.chosen, pair.rejected, boundary))
    n = _write_jsonl(rows, args.out)
    log.info("wrote %d rows to %s", n, args.out)
    return 0


def _label_trajectories(args: argparse.Namespace, info: DistInfo) -> int:
    """judge-prefix, rollouts, judge-votes: one trajectory at a time, appended to --out (sharded
    over ranks under torchrun). Trajectory i samples with seed ``--seed + i``, whichever rank
    runs it, so the output does not depend on the number of processes."""
    trajectories = read_trajectories(args.data)
    one_row = lambda t: 1  # noqa: E731
    if args.cmd == "judge-prefix":
        judge = load_callable(args.judge)
        n = _label_incrementally(args, trajectories, lambda i, t: [
            {"prompt": t["prompt"], "completions": t["steps"],
             "labels": judge_prefix_labels(t["prompt"], t["steps"], judge)}], one_row, info)
        log.info("wrote %d trajectories to %s", n, args.out)
        return 0
    # Imported here, like the engine in `rollout_engine`: only the rollouts command loads a policy.
    from mahalo_engine.policy import load_policy

    if args.m < 1:
        raise ValueError(f"--m must be >= 1, got {args.m}")
    # Imported here with the policy: triton_kernels imports Triton (seconds), which the labelling
    # commands without a policy need not wait for. Checked before the policy loads.
    from triton_kernels.checks import check_sampling

    check_sampling(args.temperature, args.top_k, args.seed, top_p=args.top_p, min_p=args.min_p)
    policy = load_policy(args.policy, device=info.device)
    # One engine per process, sized for every trajectory here: its caches are allocated once.
    engine = rollout_engine(policy, rollout_context_len(
        policy, trajectories, max_new_tokens=args.max_new_tokens,
        chat_template=args.chat_template))
    sampling = dict(boundary=parse_boundaries(args.boundary), max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p,
                    chat_template=args.chat_template, engine=engine)
    if args.cmd == "rollouts":
        step_reward = load_callable(args.step_reward) if args.step_reward is not None else None
        verifier = load_callable(args.verifier)
        n = _label_incrementally(
            args, trajectories,
            lambda i, t: trajectory_rollouts(policy, t, verifier, args.m, step_reward=step_reward,
                                             seed=args.seed + i, **sampling),
            lambda t: 1 + (len(t["steps"]) - 1) * args.m, info)
    else:
        judge = load_callable(args.judge)

        def votes(i: int, t: dict[str, Any]) -> list[dict[str, Any]]:
            steps = t["steps"]
            # The full trajectory is terminal: its own vote is the judge on itself.
            conts = sample_continuations(policy, t["prompt"],
                                         [steps[:k] for k in range(1, len(steps))],
                                         args.m, seed=args.seed + i, **sampling) + [[[]]]
            return [{"prompt": t["prompt"], "completions": steps,
                     "labels": judge_vote_labels(t["prompt"], steps, conts, judge)}]

        n = _label_incrementally(args, trajectories, votes, one_row, info)
    log.info("wrote %d trajectories to %s", n, args.out)
    return 0


if __name__ == "__main__":
    exit_process(main())
