"""``python -m training.mah_dpo``: Multi-Action-Head DPO on a shared backbone.

Steps (docs/design.md, with the reference implementation's costs removed):

1. Reference log-probs of every pair under the SFT model (backbone + its unperturbed head) are
   computed once, streaming over the data, and cached on disk under a key hashing the weights,
   config, dtype and the exact token ids (so data, tokenizer and truncation settings are all
   covered; ``training.ref_logps``). No second model is resident while training.
2. Heads start as the SFT head plus ``σ·N(0,1)`` (one generator seed per head). They are separate
   tensors, so a tied checkpoint is untied by construction: the input embedding never moves with
   a head. The backbone's own ``lm_head`` is dropped during training.
3. Each step runs one forward over chosen and rejected rows together; every row is projected
   through its own objective's head only, in chunks (``training.logps``).
4. Loss ``Σ_i α_i · mean_i(L_i)`` (α_i = 1/H by default: the paper's mean over objectives) over
   balanced global batches (``training.batching.BalancedBatches``), normalised by global counts so
   that any world size or micro-batching gives the same step.

Optimisation knobs for heads that specialise (the paper's claim is that separation lives in the
light heads, sharing in the backbone): ``--head-lr`` and ``--backbone-lr`` (two parameter groups;
``--backbone-lr 0`` freezes the backbone), ``--lr-schedule``, and ``--rpo-alpha`` (an SFT term on
each chosen answer under its own head, TRL's ``rpo_alpha``, against likelihood collapse). Every
``--log-every`` steps the log also holds, per head, the reward accuracy and margin on every
objective's pairs in the batch (``<head>_head_on_<objective>/...``: the cross terms show whether
heads diverge), the chosen and rejected log-prob drift from the reference on its own pairs
(collapse shows as both falling), and ``first_token_kl``: the mean KL between the heads'
next-token distributions at the response's first position, all from the same forward.

Output: the backbone as a Hugging Face directory (its ``lm_head`` is the heads' mean) plus
``mahalo_heads.safetensors`` with the objective names; ``load_policy(out)`` loads it, and so does
``load_policy(out/checkpoints/step-N)`` for a checkpoint written mid-run.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mahalo_engine.distributed import DistInfo, barrier, exit_process
from mahalo_engine.models.loader import load_decoder
from mahalo_engine.utils import paths
from training.batching import BalancedBatches
from training.collate import collate_pairs, pad_id_of
from training.encode import TokenizedPair, tokenize_pairs
from training.logps import PolicyLogps
from training.losses import dpo_margins, mah_dpo_loss
from training.model_io import (build_decoder, save_policy_dir, strip_prefix, untied_config,
                               write_policy_files)
from training.readers import PreferenceData, parse_data_spec, read_preferences
from training.ref_logps import reference_logps
from training.trainer import (Micro, ParamGroup, Trainer, add_common_args, check_lr, cli_main,
                              describe, total_steps)

log = logging.getLogger(__name__)

def init_heads(sft_head: torch.Tensor, num_heads: int, sigma: float, seeds: Sequence[int]) -> torch.Tensor:
    """``[H,V,d]`` float32 heads: ``sft_head + sigma * N(0,1)``, head i drawn from its own CPU
    generator seeded ``seeds[i]`` (device-independent, and the global RNG is left alone)."""
    if len(seeds) != num_heads:
        raise ValueError(f"{num_heads} heads need {num_heads} seeds, got {list(seeds)}")
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    base = sft_head.detach().float().cpu()
    heads = torch.stack([base + sigma * torch.randn(base.shape, generator=torch.Generator().manual_seed(s))
                         for s in seeds])
    return heads.to(sft_head.device)


def _parse_alphas(specs: Sequence[str], objectives: Sequence[str]) -> list[float]:
    """α per objective: ``1/H`` each (the paper's mean over objectives) unless ``--alpha`` names
    it."""
    alphas = {o: 1.0 / len(objectives) for o in objectives}
    for s in specs:
        name, sep, value = s.partition("=")
        if not sep or name not in alphas:
            raise ValueError(f"--alpha expects OBJECTIVE=WEIGHT with OBJECTIVE in {list(objectives)}, "
                             f"got {s!r}")
        try:
            alphas[name] = float(value)
        except ValueError:
            raise ValueError(f"--alpha {s!r}: {value!r} is not a number") from None
        if not alphas[name] >= 0:
            raise ValueError(f"--alpha {s!r}: weights must be >= 0")
    return [alphas[o] for o in objectives]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.mah_dpo",
        description="Multi-Action-Head DPO: one LM head per objective on a shared backbone, "
        "trained from an SFT model on per-objective preference pairs (TRL format "
        '{"prompt","chosen","rejected"}). Run under torchrun for DDP/FSDP2.')
    p.add_argument("--model", type=Path, required=True, help="SFT model directory (Hugging Face)")
    p.add_argument("--data", action="append", required=True,
                   help="OBJECTIVE=FILE.jsonl (repeat per objective), or FILE.jsonl whose rows "
                   "carry an 'objective' field")
    p.add_argument("--objectives", default=None,
                   help="comma-separated head order (default: order of first appearance)")
    p.add_argument("--alpha", action="append", default=[],
                   help="OBJECTIVE=WEIGHT loss weight α_i, repeatable (default 1/H each: the "
                   "paper's mean over objectives)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO β (default 0.1)")
    p.add_argument("--sigma", type=float, default=1e-3, help="head init noise std σ (default 1e-3)")
    p.add_argument("--init-seed", type=int, default=42,
                   help="head i's noise uses seed INIT_SEED + 100*i (default 42: the paper's seeds)")
    p.add_argument("--balance", choices=("truncate", "replacement"), default="truncate",
                   help="truncate every objective to the smallest one per epoch (the paper), or "
                   "re-draw smaller objectives up to the largest one's size (default truncate)")
    p.add_argument("--ref-cache", type=Path, default=None,
                   help="reference log-prob cache directory (default $MAHALO_CACHE/ref_logps or "
                   "~/.cache/mahalo_engine/ref_logps)")
    p.add_argument("--ref-batch-size", type=int, default=8, help="pairs per reference forward (default 8)")
    p.add_argument("--chunk-tokens", type=int, default=1024,
                   help="positions per log-prob chunk (bounds the float32 logits to CHUNK x V; "
                   "default 1024)")
    p.add_argument("--rpo-alpha", type=float, default=0.0,
                   help="add A x the chosen answer's token-mean NLL under its own head to each "
                   "objective's loss (TRL's rpo_alpha; default 0: the paper's loss)")
    add_common_args(p, lr=5e-6, batch_size=8)
    g = next(a for a in p._action_groups if a.title == "optimisation")
    g.add_argument("--head-lr", type=float, default=None,
                   help="learning rate of the heads (default --lr)")
    g.add_argument("--backbone-lr", type=float, default=None,
                   help="learning rate of the shared backbone (default --lr; 0 freezes it: no "
                   "gradients, no optimizer state, the saved backbone is the input's)")
    return p


def param_groups(args: argparse.Namespace) -> list[ParamGroup]:
    """The heads and the backbone, each at its own learning rate (default ``--lr``); an explicit
    0 freezes its group."""
    out = []
    for name, prefix, value in (("heads", "heads", args.head_lr), ("backbone", "decoder.", args.backbone_lr)):
        if value is not None:
            check_lr(f"--{name.rstrip('s')}-lr", value)
        out.append(ParamGroup(name, (prefix,), args.lr if value is None else value,
                              freeze=value == 0.0))
    return out


def main(argv: list[str] | None = None) -> int:
    return cli_main(build_parser(), train, argv)


def train(args: argparse.Namespace, info: DistInfo, tokenizer) -> None:
    if not (args.rpo_alpha >= 0 and args.rpo_alpha < float("inf")):
        raise ValueError(f"--rpo-alpha must be a finite number >= 0, got {args.rpo_alpha}")
    groups_lr = param_groups(args)
    data: PreferenceData = read_preferences(
        [parse_data_spec(s) for s in args.data],
        objectives=args.objectives.split(",") if args.objectives is not None else None)
    names = data.objectives
    alphas = _parse_alphas(args.alpha, names)
    items, stats = tokenize_pairs(tokenizer, data, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length,
                                  chat_template=args.chat_template, keep_prompt=args.truncate)
    groups: list[list[int]] = [[] for _ in names]
    for g, it in enumerate(items):
        groups[it.objective].append(g)
    if info.is_main:
        log.info("objectives %s with %s pairs; %s", names, [len(g) for g in groups], stats)

    decoder = load_decoder(args.model, dtype=torch.float32, device=info.device)
    config = decoder.config
    pad = pad_id_of(tokenizer, config.pad_token_id)
    bf16 = info.device.type == "cuda" and args.bf16
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
    ref_cache = paths.cache_dir("ref_logps") if args.ref_cache is None else args.ref_cache
    ref = reference_logps(decoder, items, model_dir=args.model, cache_dir=ref_cache,
                          pad_id=pad, batch_size=args.ref_batch_size, chunk_tokens=args.chunk_tokens,
                          info=info, bf16=bf16, autocast=autocast).to(info.device)
    bad = (~torch.isfinite(ref)).any(1).nonzero(as_tuple=True)[0].tolist()
    if bad:
        raise ValueError(f"non-finite reference log-probs for {len(bad)} pairs under {args.model}: "
                         f"{describe([data.pairs[g].source for g in bad])}")

    heads = init_heads(decoder.lm_head.weight, len(names), args.sigma,
                       [args.init_seed + 100 * i for i in range(len(names))])
    decoder.lm_head = None  # the heads replace it; dropping it also unties a tied checkpoint
    module = PolicyLogps(decoder, heads, chunk_tokens=args.chunk_tokens)
    run_config = {"data": sorted(args.data), "objectives": names, "batch_size": args.batch_size,
                  "seed": args.seed, "balance": args.balance, "max_length": args.max_length,
                  "max_prompt_length": args.max_prompt_length, "chat_template": args.chat_template,
                  "truncate": args.truncate, "beta": args.beta, "alphas": alphas, "model": str(args.model),
                  "rpo_alpha": args.rpo_alpha}
    out_config = untied_config(config)

    def policy_of(state: dict[str, torch.Tensor]):
        decoder = build_decoder(out_config, strip_prefix(state, "decoder.")
                                | {"lm_head.weight": state["heads"].mean(0)})
        return decoder, tokenizer, state["heads"], names

    trainer = Trainer("mah_dpo", module, info, args, config=run_config, groups=groups_lr,
                      export=lambda state, d: write_policy_files(d, *policy_of(state)),
                      result_args=("sigma", "init_seed"))
    sampler = BalancedBatches([len(g) for g in groups], args.batch_size, mode=args.balance,
                              seed=args.seed)
    steps = total_steps(args, sampler.steps_per_epoch)
    h = len(names)

    def make_step(step: int) -> list[Micro]:
        rows = [groups[o][i] for o, i in sampler.batch(step)]
        obj = torch.tensor([items[g].objective for g in rows])
        counts = torch.bincount(obj, minlength=h)
        # the rpo term's global normaliser: chosen tokens per objective over the global batch
        tokens = torch.zeros(h).index_add(0, obj, torch.tensor([float(len(items[g].chosen)) for g in rows]))
        loss = LossSpec(args.beta, alphas, counts.to(info.device), args.rpo_alpha, tokens.to(info.device))
        return [_micro(trainer, items, ref, chunk, loss, pad, info, trainer.logs_at(step),
                       describe([data.pairs[g].source for g in chunk]))
                for chunk in trainer.micro_rows(rows)]

    trainer.run(steps, make_step, lambda m: summarize(m, names))
    state = trainer.final_state()
    if state is not None:
        save_policy_dir(args.out, *policy_of(state))
    barrier(info)


@dataclass(frozen=True)
class LossSpec:
    """The loss settings of one global batch, and its global counts."""

    beta: float
    alphas: list[float]
    counts: torch.Tensor  # [H] pairs per objective
    rpo_alpha: float
    chosen_tokens: torch.Tensor  # [H] chosen-answer tokens per objective


def summarize(m: dict[str, torch.Tensor], names: Sequence[str]) -> dict[str, float]:
    """Globally summed metrics -> the logged means (diagnostics only on steps that have them)."""
    out = {}
    for i, name in enumerate(names):
        n = float(m["count"][i])
        if not n:
            continue
        out[f"{name}/loss"] = float(m["loss_sum"][i]) / n
        out[f"{name}/margin"] = float(m["margin_sum"][i]) / n
        out[f"{name}/acc"] = float(m["correct"][i]) / n
        out[f"{name}/chosen_nll"] = float(m["chosen_nll_sum"][i]) / max(1.0, float(m["chosen_tokens"][i]))
        if "cross_margin_sum" in m:
            out[f"{name}/chosen_drift"] = float(m["chosen_drift_sum"][i]) / n
            out[f"{name}/rejected_drift"] = float(m["rejected_drift_sum"][i]) / n
    if "cross_margin_sum" in m:
        for k, head in enumerate(names):
            for j, pairs in enumerate(names):
                n = float(m["count"][j])
                if n:
                    out[f"{head}_head_on_{pairs}/reward_acc"] = float(m["cross_correct"][k, j]) / n
                    out[f"{head}_head_on_{pairs}/margin"] = float(m["cross_margin_sum"][k, j]) / n
        out["first_token_kl"] = float(m["first_kl_sum"]) / max(1.0, float(m["count"].sum()))
    return out


def _micro(trainer: Trainer, items: Sequence[TokenizedPair], ref: torch.Tensor, rows: list[int],
           spec: LossSpec, pad: int, info: DistInfo, diagnostics: bool, desc: str) -> Micro:
    def run() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        batch = collate_pairs([items[g] for g in rows], pad).to(info.device)
        n = len(rows)
        out = trainer.module(batch.input_ids, batch.attention_mask, batch.labels, batch.head_ids,
                             diagnostics=diagnostics)
        logps = out[0] if diagnostics else out
        idx = torch.tensor(rows, device=info.device)
        obj = batch.head_ids[:n]
        ref_c, ref_r = ref[idx, 0], ref[idx, 1]
        tokens = torch.tensor([float(len(items[g].chosen)) for g in rows], device=info.device)
        loss, _ = mah_dpo_loss(logps[:n], logps[n:], ref_c, ref_r, obj, beta=spec.beta,
                               alphas=spec.alphas, objective_counts=spec.counts,
                               rpo_alpha=spec.rpo_alpha, chosen_tokens=tokens,
                               objective_chosen_tokens=spec.chosen_tokens)
        with torch.no_grad():
            metrics = pair_metrics(logps[:n], logps[n:], ref_c, ref_r, obj, tokens, spec.beta,
                                   len(spec.alphas))
            if diagnostics:
                metrics |= cross_head_metrics(out[1], out[2], ref_c, ref_r, obj, spec.beta)
        return loss * info.world_size, metrics

    return Micro(run, desc)


def pair_metrics(chosen: torch.Tensor, rejected: torch.Tensor, ref_c: torch.Tensor,
                 ref_r: torch.Tensor, obj: torch.Tensor, tokens: torch.Tensor, beta: float,
                 h: int) -> dict[str, torch.Tensor]:
    """Per-objective sums over a micro-batch's pairs, each on its own head."""
    margins = dpo_margins(chosen, rejected, ref_c, ref_r)
    z = torch.zeros(h, device=chosen.device)
    return {"loss_sum": z.index_add(0, obj, -F.logsigmoid(beta * margins)),
            "margin_sum": z.index_add(0, obj, beta * margins),
            "correct": z.index_add(0, obj, (margins > 0).float()),
            "count": torch.bincount(obj, minlength=h).float(),
            "chosen_nll_sum": z.index_add(0, obj, -chosen.float()),
            "chosen_tokens": z.index_add(0, obj, tokens.float())}


def cross_head_metrics(all_logps: torch.Tensor, first_kl: torch.Tensor, ref_c: torch.Tensor,
                       ref_r: torch.Tensor, obj: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Sums for the specialisation diagnostics: ``cross_*[k, j]`` is head k on objective j's pairs
    (reward accuracy count, β-margin sum); drifts are each head's ``π - ref`` on its own pairs;
    ``first_kl_sum`` sums `head_diagnostics`' first-position KL over the pairs (a pair's two rows
    share the prompt, so its chosen row stands for it)."""
    h, n = all_logps.shape[0], obj.shape[0]
    chosen, rejected = all_logps[:, :n], all_logps[:, n:]
    margins = (chosen - ref_c) - (rejected - ref_r)  # [H, n]
    z = torch.zeros(h, h, device=all_logps.device)
    own = chosen.gather(0, obj[None])[0], rejected.gather(0, obj[None])[0]
    zh = torch.zeros(h, device=all_logps.device)
    return {"cross_correct": z.index_add(1, obj, (margins > 0).float()),
            "cross_margin_sum": z.index_add(1, obj, beta * margins),
            "chosen_drift_sum": zh.index_add(0, obj, own[0] - ref_c),
            "rejected_drift_sum": zh.index_add(0, obj, own[1] - ref_r),
            "first_kl_sum": first_kl[:n].sum()}


if __name__ == "__main__":
    exit_process(main())
