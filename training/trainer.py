"""The optimisation loop shared by the SFT, MAH-DPO and PRM trainers.

A trainer supplies, for each global step, one ``Micro`` per micro-batch of this rank: a closure
returning ``(loss, metric sums)`` where ``loss`` is already normalised by *global* counts and
multiplied by the world size (DDP/FSDP2 average gradients over ranks). This module owns the rest:
optimizer (RMSprop, the paper's choice, or AdamW) with named parameter groups (a group at lr 0 is
frozen: no gradients, no optimizer state), linear warmup then a constant, linear or cosine
schedule, gradient accumulation
(``no_sync`` until the last micro-batch), bf16 autocast on CUDA, gradient clipping, the
non-finite-loss stop, metric reduction and logging (a tqdm bar on rank 0 plus ``log.jsonl``),
periodic atomic checkpoints (each also holding the trainer's exported artefact, e.g. a policy
directory ``load_policy`` reads, when the trainer gives an ``export``), ``--resume`` /
``--overwrite``, and the graceful stop: on SIGINT or SIGTERM, or once ``--max-minutes`` have
passed, the current optimizer step finishes, a checkpoint is written and the run ends with
``interrupted at step N; resume with --resume`` (exit code 130; a second signal stops at once).
``cli_main`` is the trainers' common entry point (process group, ``--out`` check, seeding,
tokenizer), run under the project's CLI error policy (``mahalo_engine.utils.cli``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from mahalo_engine.distributed import DistInfo, barrier, cleanup, init_distributed
from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.cli import HelpFormatter, Interrupted, add_debug_flag, run_cli
from training import checkpoint as ckpt
from training import distributed as D
from training.batching import micro_batches, shard
from training.logps import enable_gradient_checkpointing

log = logging.getLogger(__name__)

# Arguments that must not change between a run and its --resume (they define the batches).
RESUME_KEYS = ("data", "batch_size", "seed", "balance", "max_length", "max_prompt_length",
               "chat_template", "objectives", "loss", "step_separator", "truncate")
# Arguments that fix the learning-rate path: the optimizer and scheduler states restored on
# --resume hold the old values, so a change would be silently ignored; it is refused instead.
LR_KEYS = ("lr_groups", "lr_schedule", "min_lr_ratio", "warmup_steps")
SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, *, warmup: int, total: int, schedule: str, min_ratio: float) -> float:
    """The multiple of the peak learning rate used by optimizer step ``step`` (0-based): linear
    warmup over ``warmup`` steps, then ``schedule`` from 1 down to ``min_ratio`` at step ``total``
    (``constant`` stays at 1: the paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"lr schedule must be one of {SCHEDULES}, got {schedule!r}")


@dataclass(frozen=True)
class ParamGroup:
    """Parameters whose (unwrapped) names start with one of ``prefixes`` train at ``lr``.
    ``freeze`` (a user's explicit lr 0) turns ``requires_grad`` off before wrapping: no gradients,
    no optimizer state. (``--lr 0`` alone runs steps that change nothing: the loss at the start.)"""

    name: str
    prefixes: tuple[str, ...]
    lr: float
    freeze: bool = False


def add_common_args(p: argparse.ArgumentParser, *, lr: float, batch_size: int,
                    optimizer: str = "rmsprop", max_length: int = 1024) -> None:
    p.formatter_class = HelpFormatter
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--optimizer", choices=("rmsprop", "adamw"), default=optimizer,
                   help=f"default {optimizer}")
    g.add_argument("--weight-decay", type=float, default=0.0, help="default 0")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="linear warmup steps, then --lr-schedule (the paper: 150, then constant)")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                   help="after the warmup: constant (default, the paper's), or linear / cosine "
                   "decay to --min-lr-ratio x the peak at the last step")
    g.add_argument("--min-lr-ratio", type=float, default=0.0,
                   help="final lr / peak lr of the linear and cosine schedules (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=10.0,
                   help="gradient clipping norm (default 10, the paper's); 0 disables")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"global batch per optimizer step, over all ranks (default {batch_size})")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward on each rank (default: the whole local batch)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="train exactly N optimizer steps (default: --epochs worth; overrides "
                   "--epochs; the data is cycled through fresh shuffles)")
    g.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute decoder layer activations in the backward")
    g.add_argument("--no-bf16", dest="bf16", action="store_false",
                   help="disable bf16 autocast (on by default on CUDA; never used on CPU)")
    d = p.add_argument_group("data")
    d.add_argument("--max-length", type=int, default=max_length,
                   help=f"max tokens per sequence (default {max_length})")
    d.add_argument("--max-prompt-length", type=int, default=None,
                   help="an over-long sequence's prompt is cut (see --truncate) down to no "
                   "fewer tokens than this (default: max-length // 2)")
    d.add_argument("--truncate", choices=("start", "end"), default="start",
                   help="which part of an over-long prompt is kept: 'start' (the paper's "
                   "keep_start: BOS, system prompt and chat header stay, the tokens nearest the "
                   "response go) or 'end' (the last turns stay, the header goes) (default start)")
    d.add_argument("--chat-template", action="store_true",
                   help="wrap string prompts in the tokenizer's chat template as a user turn")
    r = p.add_argument_group("run")
    r.add_argument("--out", type=Path, required=True, help="output directory")
    r.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available")
    r.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp",
                   help="under torchrun: DDP (default) or FSDP2 (fully_shard per decoder layer); "
                   "gloo on CPU, NCCL on CUDA")
    r.add_argument("--save-every", type=int, default=0,
                   help="write a resumable checkpoint every N steps (0: only at the end)")
    r.add_argument("--keep-checkpoints", type=int, default=1,
                   help="resumable checkpoints kept under OUT/checkpoints (default 1)")
    r.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint under --out (a run folder with a log "
                   "but no checkpoint starts again from step 0)")
    r.add_argument("--overwrite", action="store_true",
                   help="delete the log and checkpoints a previous run left under --out, then "
                   "start afresh")
    r.add_argument("--log-every", type=int, default=1,
                   help="log every N-th step's metrics to log.jsonl and the progress bar")
    r.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock limit: after the step that passes it, write a checkpoint and "
                   "stop as on Ctrl-C (exit 130; continue with --resume)")
    add_debug_flag(p)


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run under "
                         "--out, or start it afresh")
    if args.max_prompt_length is None:
        args.max_prompt_length = args.max_length // 2
    if args.micro_batch_size is not None and args.micro_batch_size <= 0:
        raise ValueError(f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    for name, low in (("keep_checkpoints", 1), ("log_every", 1), ("save_every", 0),
                      ("warmup_steps", 0), ("batch_size", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    check_lr("--lr", args.lr)
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must lie in [0, 1], got {args.min_lr_ratio}")
    if args.max_minutes is not None and not (math.isfinite(args.max_minutes) and args.max_minutes > 0):
        raise ValueError(f"--max-minutes must be a positive number, got {args.max_minutes}")
    return args


def check_lr(flag: str, value: float) -> float:
    """A learning rate must be finite and >= 0 (0 freezes its parameters)."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    return value


RUN_FILES = ("log.jsonl", "checkpoints")  # what marks --out as holding a run


def check_out_dir(out: Path, resume: bool, info: DistInfo, overwrite: bool = False) -> None:
    """A fresh run refuses an ``--out`` that holds another run's log or checkpoints: it would
    append to that log, and pruning by step number could delete its own newest checkpoint in
    favour of the old run's. ``overwrite`` deletes them first (rank 0). Every rank raises
    together."""
    stale = []
    if info.is_main and not resume:
        stale = [out / name for name in RUN_FILES if (out / name).exists()]
        if overwrite:
            for p in stale:
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
                log.info("--overwrite: removed %s", p)
            stale = []
    flag = torch.tensor([float(bool(stale))], device=info.device)
    if D.all_reduce_sum(flag, info).item() > 0:
        where = ", ".join(map(str, stale)) if stale else f"{out} (seen by rank 0)"
        raise ValueError(f"--out {out} already holds a training run ({where}); pass --resume to "
                         f"continue it, --overwrite to start it afresh, or choose another --out")


def cli_main(parser: argparse.ArgumentParser,
             train: Callable[[argparse.Namespace, DistInfo, Any], None],
             argv: list[str] | None) -> int:
    """The trainers' shared entry point: parse the arguments, join the torchrun process group (if
    launched by torchrun), check ``--out``, seed, load ``--model``'s tokenizer, then
    ``train(args, info, tokenizer)``; the group is left even when training fails. User errors
    are one line and an interrupted run exits 130 (``mahalo_engine.utils.cli.run_cli``)."""
    return run_cli(lambda a: _cli_main(parser, train, a), argv)


def _cli_main(parser: argparse.ArgumentParser,
              train: Callable[[argparse.Namespace, DistInfo, Any], None],
              argv: list[str] | None) -> int:
    from transformers import AutoTokenizer

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = finish_args(parser.parse_args(argv))
    info = init_distributed(args.device)
    try:
        check_out_dir(Path(args.out), args.resume, info, args.overwrite)
        torch.manual_seed(args.seed)
        train(args, info, AutoTokenizer.from_pretrained(args.model))
        # Every rank reaches this point before any leaves the group: a rank tearing gloo down
        # while its peer is still in a collective can abort the peer.
        barrier(info)
    finally:
        cleanup(info)
    return 0


def total_steps(args: argparse.Namespace, steps_per_epoch: int) -> int:
    if steps_per_epoch <= 0:
        raise ValueError("no full global batch fits in the data; lower --batch-size")
    if args.max_steps is not None:
        if args.max_steps <= 0:
            raise ValueError(f"--max-steps must be positive, got {args.max_steps}")
        return args.max_steps
    return max(1, int(args.epochs * steps_per_epoch))


@dataclass
class Micro:
    """One micro-batch: ``run()`` -> ``(loss, {metric: summed tensor})``; ``desc`` names it in
    errors (e.g. the examples it holds)."""

    run: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    desc: str


class Trainer:
    """``groups``: named parameter groups with their own learning rates (default: every parameter
    at ``--lr``); a parameter no group names trains at ``--lr``. ``export(state, dir)`` writes the
    trained artefact (e.g. a policy directory) from the module's full state dict into ``dir``:
    each checkpoint holds one, so mid-run checkpoints load like the final output."""

    def __init__(self, name: str, module: nn.Module, info: DistInfo, args: argparse.Namespace,
                 *, config: dict[str, Any], groups: Sequence[ParamGroup] = (),
                 export: Callable[[dict[str, torch.Tensor], Path], None] | None = None) -> None:
        self.name, self.info, self.args = name, info, args
        self.out = Path(args.out)
        self.export = export
        self.num_steps: int | None = None
        self.bf16 = info.device.type == "cuda" and args.bf16
        for g in groups:
            check_lr(f"the {g.name} group's lr", g.lr)
        self.config = {**config, "lr_groups": {g.name: g.lr for g in groups} or {"all": args.lr},
                       **{k: getattr(args, k) for k in LR_KEYS if k != "lr_groups"}}
        frozen = tuple(pre for g in groups if g.freeze for pre in g.prefixes)
        for n, p in module.named_parameters():  # frozen before wrapping: DDP/FSDP2 then skip them
            if frozen and n.startswith(frozen):
                p.requires_grad_(False)
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(module.decoder)
        self.module = D.wrap_model(module, info, args.strategy, mixed_precision=self.bf16)
        by_group: dict[str, tuple[float, list[nn.Parameter]]] = {}
        for n, p in self.module.named_parameters():
            if p.requires_grad:
                gname, lr = _group_of(D.unwrapped_name(n), groups, args.lr)
                by_group.setdefault(gname, (lr, []))[1].append(p)
        if not by_group:
            raise ValueError("nothing to train: every parameter is frozen")
        param_groups = [{"params": ps, "lr": lr, "name": g} for g, (lr, ps) in by_group.items()]
        if args.optimizer == "rmsprop":
            self.optimizer = torch.optim.RMSprop(param_groups, lr=args.lr, weight_decay=args.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(param_groups, lr=args.lr, weight_decay=args.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, warmup=args.warmup_steps, total=self.num_steps or 1,
                                                schedule=args.lr_schedule, min_ratio=args.min_lr_ratio))
        self.start_step = 0
        if args.resume:
            self._resume()

    def autocast(self):
        """bf16 autocast on CUDA (off with --no-bf16), a no-op on CPU."""
        if self.bf16 and self.args.strategy != "fsdp2":  # FSDP2 casts through its MP policy
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- checkpoints ------------------------------------------------------------------------------

    def _resume(self) -> None:
        path = ckpt.latest_checkpoint(self.out)
        if path is None:
            log_path = self.out / "log.jsonl"
            if not log_path.is_file():
                raise FileNotFoundError(f"--resume: nothing to resume under {self.out} (no "
                                        f"checkpoints/ and no log.jsonl); drop --resume to start")
            if self.info.is_main:  # a run stopped before its first checkpoint: start it again
                log.warning("--resume: no checkpoint under %s; starting from step 0 (log.jsonl "
                            "truncated)", self.out)
                atomic_write_text(log_path, "")
            barrier(self.info)
            return
        model_state, state = ckpt.load_checkpoint(path)
        if state.get("trainer") != self.name:
            raise ValueError(f"{path} was written by {state.get('trainer')!r}, not {self.name!r}")
        saved = state.get("config", {})
        changed = [k for k in RESUME_KEYS if saved.get(k) != self.config.get(k)]
        # (a checkpoint from before the learning-rate keys were stored has none to compare)
        changed += [k for k in LR_KEYS if k in saved and saved[k] != self.config.get(k)]
        if changed:
            diffs = ", ".join(_describe_change(k, saved.get(k), self.config.get(k)) for k in changed)
            raise ValueError(f"--resume from {path}: {diffs}")
        D.load_full_state_dict(self.module, model_state)
        D.load_optimizer_state(self.module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        if self.info.is_main:
            log_path = self.out / "log.jsonl"
            if log_path.is_file():  # drop records of steps past the checkpoint (a crashed run's)
                kept = [line for line in log_path.read_text().splitlines()
                        if line and json.loads(line)["step"] <= self.start_step]
                atomic_write_text(log_path, "".join(line + "\n" for line in kept))
            log.info("resumed from %s at step %d", path, self.start_step)

    def save(self, step: int) -> None:
        model_state = D.full_state_dict(self.module)
        optim_state = D.full_optimizer_state(self.module, self.optimizer)
        if self.info.is_main:
            extra = None if self.export is None else (lambda d: self.export(model_state, d))
            ckpt.save_checkpoint(self.out, step, model_state,
                                 {"trainer": self.name, "config": self.config,
                                  "optimizer": optim_state, "scheduler": self.scheduler.state_dict()},
                                 keep=self.args.keep_checkpoints, extra=extra)
        barrier(self.info)

    # -- the loop ---------------------------------------------------------------------------------

    def micro_rows(self, rows: Sequence) -> list[list]:
        """This rank's share of a global batch, cut into ``--micro-batch-size`` pieces (the last
        may be smaller: losses are normalised by global counts, so that is exact)."""
        local = shard(rows, self.info.rank, self.info.world_size)
        return micro_batches(local, len(local) if self.args.micro_batch_size is None else self.args.micro_batch_size)

    def final_state(self) -> dict[str, torch.Tensor] | None:
        """The trained module's full state dict on rank 0, None on the others (collective)."""
        state = D.full_state_dict(self.module)
        return state if self.info.is_main else None

    def _no_sync(self, last: bool):
        # FSDP2 reduce-scatters every micro-batch on purpose: skipping the sync would keep every
        # layer's unsharded gradient alive, which is the memory FSDP exists to save.
        if last or not isinstance(self.module, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def _check_finite(self, loss: torch.Tensor, step: int, m: int, micro: Micro) -> None:
        local_bad = not bool(torch.isfinite(loss.detach()))
        flag = torch.tensor([float(local_bad)], device=loss.device)
        D.all_reduce_sum(flag, self.info)  # every rank stops together, none hangs in a collective
        if flag.item() > 0:
            where = (f"micro-batch {m} ({micro.desc})" if local_bad
                     else "a micro-batch on another rank")
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}, {where}; "
                                     f"lower --lr or check the data")

    def run(self, num_steps: int, make_step: Callable[[int], Sequence[Micro]],
            summarize: Callable[[dict[str, torch.Tensor]], dict[str, float]]) -> None:
        """Steps ``start_step .. num_steps-1``; ``summarize`` turns globally summed metrics into
        the logged numbers."""
        self.num_steps = num_steps
        with GracefulStop(self.info, self.args.max_minutes) as stop:
            self._run(num_steps, make_step, summarize, stop)

    def logs_at(self, step: int) -> bool:
        """Whether step ``step`` (0-based) is logged: every ``--log-every``-th and the last one
        (micro-batches compute their diagnostics only then)."""
        return (step + 1) % self.args.log_every == 0 or step + 1 == self.num_steps

    def _run(self, num_steps: int, make_step: Callable[[int], Sequence[Micro]],
             summarize: Callable[[dict[str, torch.Tensor]], dict[str, float]],
             stop: "GracefulStop") -> None:
        self.module.train()
        bar = tqdm(total=num_steps, initial=self.start_step, desc=self.name, unit="step",
                   disable=not self.info.is_main, dynamic_ncols=True)
        log_path = self.out / "log.jsonl"
        for step in range(self.start_step, num_steps):
            t0 = time.perf_counter()
            micros = make_step(step)
            sums: dict[str, torch.Tensor] = {}
            total = torch.zeros((), device=self.info.device)
            for m, micro in enumerate(micros):
                with self._no_sync(m == len(micros) - 1):
                    with self.autocast():
                        loss, metrics = micro.run()
                    self._check_finite(loss, step, m, micro)
                    loss.backward()
                total += loss.detach().float() / self.info.world_size
                for k, v in metrics.items():
                    sums[k] = sums[k] + v.detach() if k in sums else v.detach().clone()
            grad_norm = None
            if self.args.max_grad_norm > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.module.parameters() if p.requires_grad], self.args.max_grad_norm)
            lrs = self.scheduler.get_last_lr()  # the rates this step used
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

            if self.logs_at(step):
                packed = torch.cat([total.reshape(1)] + [sums[k].float().reshape(-1) for k in sorted(sums)])
                D.all_reduce_sum(packed, self.info)
                out, i = {}, 1
                for k in sorted(sums):
                    n = sums[k].numel()
                    out[k] = packed[i:i + n].reshape(sums[k].shape)
                    i += n
                record = {"step": step + 1, "loss": float(packed[0]), "lr": lrs[0],
                          **({f"lr/{g['name']}": r for g, r in zip(self.optimizer.param_groups, lrs)}
                             if len(lrs) > 1 else {}),
                          **summarize(out), "step_time_s": time.perf_counter() - t0}
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor")
                                                else grad_norm)
                if self.info.is_main:
                    self.out.mkdir(parents=True, exist_ok=True)
                    with log_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items()
                                     if isinstance(v, float) and k != "step_time_s"}, refresh=False)
            bar.update(1)
            if stop.requested() and step + 1 < num_steps:
                bar.close()
                self.save(step + 1)
                raise Interrupted(f"{stop.reason()} at step {step + 1}; resume with --resume")
            if self.args.save_every and (step + 1) % self.args.save_every == 0 and step + 1 < num_steps:
                self.save(step + 1)
        bar.close()
        if num_steps > self.start_step or not (self.out / "checkpoints" / "latest").exists():
            self.save(num_steps)


class GracefulStop:
    """While active, SIGINT/SIGTERM only set a flag that ``requested()`` reports (summed over
    ranks, so every rank stops after the same step); the first signal restores the previous
    handlers, so a second one stops the process at once. ``max_minutes`` sets the flag too once
    that much wall time has passed since ``__enter__``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, info: DistInfo, max_minutes: float | None = None) -> None:
        self.info = info
        self.flag = False
        self.previous: dict[int, Any] = {}
        self.max_minutes = max_minutes
        self.deadline: float | None = None
        self.timed_out = False

    def _handle(self, signum: int, frame: Any) -> None:
        self.flag = True
        self._restore()
        if self.info.is_main:
            tqdm.write(f"{signal.Signals(signum).name}: finishing this step, then saving a "
                       f"checkpoint (send it again to stop at once)")

    def _restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def __enter__(self) -> "GracefulStop":
        if self.max_minutes is not None:
            self.deadline = time.monotonic() + 60.0 * self.max_minutes
        try:
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals cannot be caught here
            self._restore()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def requested(self) -> bool:
        if self.deadline is not None and not self.flag and time.monotonic() >= self.deadline:
            self.flag = self.timed_out = True
        if not self.info.distributed:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.info.device)
        return D.all_reduce_sum(flag, self.info).item() > 0

    def reason(self) -> str:
        return f"stopped by --max-minutes {self.max_minutes:g}" if self.timed_out else "interrupted"


def _group_of(name: str, groups: Sequence[ParamGroup], default_lr: float) -> tuple[str, float]:
    for g in groups:
        if name.startswith(g.prefixes):
            return g.name, g.lr
    return "default", default_lr


def _describe_change(key: str, was: Any, now: Any) -> str:
    if key == "lr_groups" and isinstance(was, dict) and isinstance(now, dict):
        return ", ".join(f"{g} lr was {was.get(g)!r}, now {now.get(g)!r}"
                         for g in sorted(set(was) | set(now)) if was.get(g) != now.get(g))
    return f"{key} was {was!r}, now {now!r}"


def describe(sources: Sequence[str], limit: int = 6) -> str:
    """``"a.jsonl:3, b.jsonl:17, ..."``: where a micro-batch's examples come from."""
    shown = ", ".join(sources[:limit])
    return shown + (f", ... ({len(sources)} examples)" if len(sources) > limit else "")
