"""``python -m training.sft``: supervised fine-tuning on ``{"prompt", "completion"}`` jsonl.

The loss is the mean negative log-likelihood of the completion tokens (EOS included) over the
global batch; prompt tokens carry no loss. Log-probs come from ``training.logps`` (chunked, so
``[N,T,V]`` logits are never built). A tied checkpoint stays tied. The output directory is a
Hugging Face model directory that ``load_policy`` and transformers load.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from mahalo_engine.distributed import DistInfo, barrier, exit_process
from mahalo_engine.models.loader import load_decoder
from training.batching import shuffled_batch
from training.collate import collate, pad_id_of
from training.encode import tokenize_sft
from training.readers import read_sft
from training.logps import PolicyLogps
from training.model_io import build_decoder, save_policy_dir, strip_prefix, write_policy_files
from training.trainer import Micro, Trainer, add_common_args, cli_main, describe, total_steps

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.sft",
        description='Supervised fine-tuning on {"prompt","completion"} jsonl (loss on completion '
        "tokens only). Run under torchrun for DDP/FSDP2.")
    p.add_argument("--model", type=Path, required=True, help="base model directory (Hugging Face)")
    p.add_argument("--data", type=Path, required=True, help="jsonl of {prompt, completion}")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="positions per log-prob chunk (bounds the float32 logits to CHUNK x V; "
                   "default 1024)")
    add_common_args(p, lr=1e-5, batch_size=8, optimizer="adamw")
    return p


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), train, argv)


def train(args: argparse.Namespace, info: DistInfo, tokenizer) -> None:
    examples = read_sft(args.data)
    items, stats = tokenize_sft(tokenizer, examples, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length,
                                chat_template=args.chat_template, keep_prompt=args.truncate)
    if info.is_main:
        log.info("%d examples; %s", len(items), stats)
    decoder = load_decoder(args.model, dtype=torch.float32, device=info.device)
    config = decoder.config
    pad = pad_id_of(tokenizer, config.pad_token_id)
    def policy_of(state: dict[str, torch.Tensor]):
        return build_decoder(config, strip_prefix(state, "decoder."))

    trainer = Trainer("sft", PolicyLogps(decoder, chunk_tokens=args.chunk_tokens), info, args,
                      config={"data": str(args.data), "batch_size": args.batch_size, "seed": args.seed,
                              "max_length": args.max_length, "chat_template": args.chat_template,
                              "max_prompt_length": args.max_prompt_length, "truncate": args.truncate,
                              "model": str(args.model)},
                      export=lambda state, d: write_policy_files(d, policy_of(state), tokenizer))
    steps_per_epoch = len(items) // args.batch_size
    steps = total_steps(args, steps_per_epoch)

    def make_step(step: int) -> list[Micro]:
        rows = shuffled_batch(len(items), args.batch_size, args.seed, step)
        tokens = sum(len(items[g].completion) for g in rows)  # the global normaliser
        return [_micro(trainer, items, chunk, tokens, pad, info,
                       describe([examples[g].source for g in chunk]))
                for chunk in trainer.micro_rows(rows)]

    def summarize(m: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"nll_per_token": float(m["nll"]) / max(float(m["tokens"]), 1.0)}

    trainer.run(steps, make_step, summarize)
    state = trainer.final_state()
    if state is not None:
        save_policy_dir(args.out, policy_of(state), tokenizer)
    barrier(info)


def _micro(trainer: Trainer, items, rows: list[int], global_tokens: int, pad: int,
           info: DistInfo, desc: str) -> Micro:
    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = collate([(items[g].prompt, items[g].completion) for g in rows], [0] * len(rows),
                        pad).to(info.device)
        logps = trainer.module(batch.input_ids, batch.attention_mask, batch.labels, batch.head_ids)
        nll = -logps.sum()
        n_tok = torch.tensor(float(sum(len(items[g].completion) for g in rows)), device=info.device)
        return nll / global_tokens * info.world_size, {"nll": nll.detach(), "tokens": n_tok}

    return Micro(run, desc)


if __name__ == "__main__":
    exit_process(main())
