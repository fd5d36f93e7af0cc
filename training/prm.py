"""``python -m training.prm``: train a value head (PRM) on a decoder backbone.

A sequence is the prompt's tokens followed by each step's tokens, each step tokenised on its own
(``training.encode.tokenize_steps``, by `mahalo_engine.text`'s rule), exactly as the engine feeds a
PRM; the head is read at each step's last token, so no marker token (with an untrained embedding)
is involved. Losses:

- ``mse``: regression on value targets (hindsight / Monte-Carlo values) -> ``kind=value``; by
  default the paper's reduction (each example's mean over its steps, then the mean over
  examples); ``--mse-reduction steps`` weighs every step alike. With ``--objectives acc,style``
  a multi-objective PRM: one output per objective on one backbone, each step labelled
  ``[v_acc, v_style]``, the loss also averaged over objectives;
- ``bce``: 0/1 or soft judge labels on the head's logit -> ``kind=binary`` (score = sigmoid);
- ``bt``: Bradley–Terry on pairs of partial sequences ``{"prompt","chosen":[steps],"rejected":[steps]}``,
  read at each side's last token -> ``kind=bt``.

The backbone is frozen by default (the paper's value model); ``--train-backbone`` trains it too.
Output: the backbone directory plus ``value_head.safetensors``, loadable by ``load_prm``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

import torch
from torch import nn

from mahalo_engine.distributed import DistInfo, barrier, exit_process
from mahalo_engine.models.loader import load_decoder
from mahalo_engine.utils.atomic_files import publish_files, staging_dir
from mahalo_engine.value_model import ValueHead, save_prm
from training.batching import shuffled_batch
from training.collate import collate_step_pairs, collate_steps, pad_id_of
from training.encode import tokenize_step_pairs, tokenize_steps
from training.readers import read_step_pairs, read_steps
from training.losses import bradley_terry_loss, soft_bce_loss, value_mse_loss
from training.model_io import build_decoder, freeze, strip_prefix
from training.trainer import Micro, Trainer, add_common_args, cli_main, describe, total_steps

log = logging.getLogger(__name__)

KIND_OF_LOSS = {"mse": "value", "bce": "binary", "bt": "bt"}


class ValueTraining(nn.Module):
    """Backbone + value head -> the head's raw output at chosen ``(row, col)`` positions."""

    def __init__(self, decoder: nn.Module, value_head: ValueHead, train_backbone: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.value_head = value_head
        self.train_backbone = train_backbone
        if not train_backbone:
            freeze(decoder)
        elif decoder.lm_head.weight is not decoder.model.embed_tokens.weight:
            decoder.lm_head.weight.requires_grad_(False)  # unused by a PRM

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                cols: torch.Tensor) -> torch.Tensor:
        with contextlib.nullcontext() if self.train_backbone else torch.no_grad():
            hidden = self.decoder(input_ids, attention_mask)
        weight = self.value_head[0].weight  # float32, or bf16 under FSDP2 mixed precision
        with torch.autocast(input_ids.device.type, enabled=False):  # no autocast of the head
            return self.value_head(hidden[rows, cols].to(weight.dtype))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.prm",
        description="Train a PRM value head on a backbone: --loss mse (value targets), bce (0/1 or "
        'soft labels) on step data {"prompt","completions","labels"}; bt on pairs '
        '{"prompt","chosen":[steps],"rejected":[steps]}. Run under torchrun for DDP.')
    p.add_argument("--model", type=Path, required=True, help="backbone directory (Hugging Face)")
    p.add_argument("--data", type=Path, required=True, help="step data or BT pair jsonl")
    p.add_argument("--loss", choices=tuple(KIND_OF_LOSS), default="mse",
                   help="mse -> kind=value, bce -> kind=binary, bt -> kind=bt (default mse)")
    p.add_argument("--mse-reduction", choices=("examples", "steps"), default="examples",
                   help="--loss mse: 'examples' = each example's mean over its steps, then the "
                   "mean over examples (the paper's); 'steps' = one mean over all steps "
                   "(default examples)")
    p.add_argument("--head", choices=("mlp", "linear"), default="mlp",
                   help="value head: 2-layer MLP (Linear-ReLU-Linear, default) or linear")
    p.add_argument("--mlp-hidden", type=int, default=None, help="MLP width (default: hidden size)")
    p.add_argument("--objectives", default=None,
                   help="comma-separated objective names for a multi-objective PRM (--loss mse "
                   "only): one output per objective; step labels are lists of that many floats")
    p.add_argument("--train-backbone", action="store_true",
                   help="train the backbone too (default: frozen, only the head trains)")
    p.add_argument("--step-separator", default="\n\n",
                   help="appended to each step before tokenising unless the step already ends "
                   "with it (match the engine's boundary; default \\n\\n)")
    add_common_args(p, lr=5e-5, batch_size=16, optimizer="adamw", max_length=2048)
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), train, argv)


def train(args: argparse.Namespace, info: DistInfo, tokenizer) -> None:
    objectives = _objectives(args)
    tok_kw = dict(max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                  chat_template=args.chat_template, step_separator=args.step_separator,
                  keep_prompt=args.truncate)
    if args.loss == "bt":
        examples = read_step_pairs(args.data)
        items, stats = tokenize_step_pairs(tokenizer, examples, **tok_kw)
    else:
        examples = read_steps(args.data, num_objectives=len(objectives) if objectives else None)
        items, stats = tokenize_steps(tokenizer, examples, **tok_kw)
        if args.loss == "bce":
            bad = [(e.source, v) for e, it in zip(examples, items) for v in it.labels if not 0 <= v <= 1]
            if bad:
                raise ValueError(f"--loss bce needs labels in [0, 1]; {bad[0][0]} has {bad[0][1]}")
    if info.is_main:
        log.info("%d examples; %s", len(items), stats)

    decoder = load_decoder(args.model, dtype=torch.float32, device=info.device)
    config = decoder.config
    pad = pad_id_of(tokenizer, config.pad_token_id)
    torch.manual_seed(args.seed)  # the head's init
    head = ValueHead(config.hidden_size, args.head, args.mlp_hidden, objectives).to(info.device)
    module = ValueTraining(decoder, head, args.train_backbone)

    def write_prm(state: dict[str, torch.Tensor], d: Path) -> None:
        final_head = ValueHead(config.hidden_size, args.head, args.mlp_hidden, objectives)
        final_head.load_state_dict(strip_prefix(state, "value_head."))
        save_prm(d, build_decoder(config, strip_prefix(state, "decoder.")), final_head,
                 KIND_OF_LOSS[args.loss], tokenizer)

    trainer = Trainer("prm", module, info, args, export=write_prm,
                      config={"data": str(args.data), "loss": args.loss, "batch_size": args.batch_size,
                              "seed": args.seed, "max_length": args.max_length,
                              "max_prompt_length": args.max_prompt_length,
                              "chat_template": args.chat_template, "step_separator": args.step_separator,
                              "truncate": args.truncate, "mse_reduction": args.mse_reduction,
                              "model": str(args.model), "head": args.head,
                              "objectives": objectives},
                      result_args=("mlp_hidden", "train_backbone"))
    steps = total_steps(args, len(items) // args.batch_size)

    def make_step(step: int) -> list[Micro]:
        rows = shuffled_batch(len(items), args.batch_size, args.seed, step)
        per_example = args.loss == "bt" or (args.loss == "mse" and args.mse_reduction == "examples")
        count = len(rows) if per_example else sum(len(items[g].labels) for g in rows)
        count *= len(objectives) if objectives else 1  # a mean over objectives too
        loss_kind = "mse-examples" if args.loss == "mse" and per_example else args.loss
        return [_micro(trainer, items, chunk, count, loss_kind, pad, info,
                       describe([examples[g].source for g in chunk]))
                for chunk in trainer.micro_rows(rows)]

    def summarize(m: dict[str, torch.Tensor]) -> dict[str, float]:
        n = max(float(m["count"]), 1.0)
        out = {args.loss: float(m["loss_sum"]) / n}
        if "correct" in m:  # agreement with the label's side of 0.5 (bce) / the preferred side (bt)
            out["acc"] = float(m["correct"]) / n
        return out

    trainer.run(steps, make_step, summarize)
    state = trainer.final_state()
    if state is not None:
        tmp = staging_dir(args.out)
        write_prm(state, tmp)
        publish_files(tmp, args.out)
        log.info("saved PRM (%s) to %s", KIND_OF_LOSS[args.loss], args.out)
    barrier(info)


def _objectives(args: argparse.Namespace) -> list[str] | None:
    if args.objectives is None:
        return None
    names = [o.strip() for o in args.objectives.split(",")]
    if args.loss != "mse":
        raise ValueError(f"--objectives (a multi-objective PRM) needs --loss mse, got --loss {args.loss}")
    if not all(names) or len(set(names)) != len(names):
        raise ValueError(f"--objectives must be distinct comma-separated names, got {args.objectives!r}")
    return names


def _micro(trainer: Trainer, items, rows: list[int], global_count: int, loss_kind: str, pad: int,
           info: DistInfo, desc: str) -> Micro:
    dev = info.device

    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if loss_kind == "bt":
            b = collate_step_pairs([items[g] for g in rows], pad)
            raw = trainer.module(b.input_ids.to(dev), b.attention_mask.to(dev), b.rows.to(dev),
                                 b.cols.to(dev))
            n = len(rows)
            per = bradley_terry_loss(raw[:n], raw[n:], reduction="none")
            extra = {"correct": (raw[:n] > raw[n:]).float().sum()}
        else:
            b = collate_steps([items[g] for g in rows], pad)
            target = torch.tensor([v for g in rows for v in items[g].labels], device=dev)
            raw = trainer.module(b.input_ids.to(dev), b.attention_mask.to(dev), b.rows.to(dev),
                                 b.cols.to(dev))
            if loss_kind == "mse":
                per = value_mse_loss(raw, target, reduction="none")
                extra = {}
            elif loss_kind == "mse-examples":  # one term per example: its mean over its steps
                steps = [len(items[g].labels) for g in rows]
                if raw.dim() == 1:
                    per = value_mse_loss(raw, target, reduction="none", example_steps=steps)
                else:  # a multi-objective PRM: the same per objective, [examples, objectives]
                    per = torch.stack([value_mse_loss(raw[:, k], target[:, k], reduction="none",
                                                      example_steps=steps)
                                       for k in range(raw.shape[1])], dim=1)
                extra = {}
            else:
                per = soft_bce_loss(raw, target, reduction="none")
                extra = {"correct": ((raw > 0) == (target > 0.5)).float().sum()}
        loss = per.sum() / global_count * info.world_size
        return loss, {"loss_sum": per.detach().sum(), "count": torch.tensor(float(per.numel()), device=dev),
                      **{k: v.detach() for k, v in extra.items()}}

    return Micro(run, desc)


if __name__ == "__main__":
    exit_process(main())
