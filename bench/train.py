"""MAH-DPO training step: ours vs the reference implementation's structure, same model and batch.

One step = forward, loss, backward and an RMSprop update of a B-pair global batch with H heads.

- **ours** (``training.mah_dpo``): one forward over chosen + rejected rows together; each row
  projected through its own objective's head only, at response positions only, in checkpointed
  chunks (``training.logps``); reference log-probs precomputed (read from a tensor here).
- **reference structure** (pearls-lab/multiobj-align ``mahdpo_trainers.py``): separate chosen and
  rejected forwards, each producing ``[H,B,T,V]`` logits for every head and every position,
  full-vocabulary log-softmax, then each head's own rows sliced out; a resident frozen reference
  model (backbone + H identical heads) run on chosen and rejected every step.

Models: ``ctx.model_dir`` (the tiny default) and, on a GPU, a random-init model of Qwen2.5-0.5B's
shape (bf16 autocast, fp32 master weights). Peak memory is measured on CUDA only.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import BenchContext, peak_memory_bytes, reset_peak_memory, timeit
from bench.decode import QWEN25_05B
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.models.loader import load_decoder
from training.collate import IGNORE
from training.logps import PolicyLogps
from training.losses import mah_dpo_loss


class _ReferenceMultiHead(nn.Module):
    """The reference's ``MultiHeadCausalLM.forward``: logits of every head at every position."""

    def __init__(self, decoder: Decoder, heads: torch.Tensor) -> None:
        super().__init__()
        self.decoder = decoder
        self.heads = nn.ParameterList(nn.Parameter(h.clone()) for h in heads)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder(input_ids, attention_mask)
        return torch.stack([F.linear(hidden, w) for w in self.heads])  # [H,B,T,V]


def _batch_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The reference's ``_get_batch_logps``: full-vocabulary log_softmax, gather, sum."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1]
    mask = labels != IGNORE
    labels[~mask] = 0
    per_token = logits.log_softmax(-1).gather(2, labels.unsqueeze(2)).squeeze(2)
    return (per_token * mask).sum(-1)


def _batch(b: int, prompt: int, resp: int, vocab: int, h: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    t = prompt + resp
    chosen = torch.randint(0, vocab, (b, t), generator=g)
    rejected = torch.randint(0, vocab, (b, t), generator=g)
    labels_c, labels_r = chosen.clone(), rejected.clone()
    labels_c[:, :prompt] = IGNORE
    labels_r[:, :prompt] = IGNORE
    mask = torch.ones(b, t, dtype=torch.long)
    obj = torch.arange(b) % h
    to = lambda *xs: [x.to(device) for x in xs]  # noqa: E731
    return to(chosen, rejected, labels_c, labels_r, mask, obj)


def _heads(decoder: Decoder, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = decoder.lm_head.weight.detach().float()
    g = torch.Generator().manual_seed(1)
    return base, torch.stack([base + 1e-3 * torch.randn(base.shape, generator=g) for _ in range(h)])


def _ours_step(decoder: Decoder, h: int, batch, beta: float, autocast, device: torch.device):
    """One model, heads only, one forward over chosen + rejected."""
    chosen, rejected, labels_c, labels_r, mask, obj = batch
    b = chosen.shape[0]
    _, heads = _heads(decoder, h)
    dec = copy.deepcopy(decoder)
    dec.lm_head = None
    model = PolicyLogps(dec, heads).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-7)
    ids, labels = torch.cat([chosen, rejected]), torch.cat([labels_c, labels_r])
    masks, head_ids = torch.cat([mask, mask]), torch.cat([obj, obj])
    ref_c = torch.zeros(b, device=device)  # precomputed once in training: a cache read
    ref_r = torch.zeros(b, device=device)

    def step() -> None:
        with autocast():
            lp = model(ids, masks, labels, head_ids)
            loss, _ = mah_dpo_loss(lp[:b], lp[b:], ref_c, ref_r, obj, beta=beta, num_objectives=h)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _reference_step(decoder: Decoder, h: int, batch, beta: float, autocast, device: torch.device):
    """Policy with H heads on every row + a resident frozen reference (H identical heads)."""
    chosen, rejected, labels_c, labels_r, mask, obj = batch
    base, heads = _heads(decoder, h)
    pol = copy.deepcopy(decoder)
    pol.lm_head = None
    policy = _ReferenceMultiHead(pol, heads).to(device)
    ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the paper: fp16
    ref = copy.deepcopy(decoder)
    ref.lm_head = None
    reference = _ReferenceMultiHead(ref, base.expand(h, -1, -1)).to(device, ref_dtype)
    reference.requires_grad_(False)
    opt = torch.optim.RMSprop(policy.parameters(), lr=1e-7)

    def step() -> None:
        with autocast():
            pc_all, pr_all = policy(chosen, mask), policy(rejected, mask)
            with torch.no_grad():
                rc_all, rr_all = reference(chosen, mask), reference(rejected, mask)
            losses = []
            for k in range(h):
                rows = (obj == k).nonzero(as_tuple=True)[0]
                if rows.numel() == 0:
                    continue
                pc = _batch_logps(pc_all[k, rows], labels_c[rows])
                pr = _batch_logps(pr_all[k, rows], labels_r[rows])
                rc = _batch_logps(rc_all[k, rows], labels_c[rows])
                rr = _batch_logps(rr_all[k, rows], labels_r[rows])
                losses.append(-F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean())
            loss = torch.stack(losses).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _measure(ctx: BenchContext, make, iters: int) -> tuple[float, int | None]:
    """Build one implementation on the device, time its step, report its peak, free it."""
    reset_peak_memory(ctx.device)
    fn = make()
    fn()  # optimizer state allocated
    t = timeit(fn, ctx.device, warmup=1, iters=iters)
    peak = peak_memory_bytes(ctx.device)
    del fn
    reset_peak_memory(ctx.device)
    return t, peak


def _model_rows(ctx: BenchContext, label: str, decoder: Decoder, shape: tuple[int, int, int],
                autocast, iters: int) -> Iterator[dict]:
    b, prompt, resp = shape
    v = decoder.config.vocab_size
    t = prompt + resp
    for h in (2, 3):
        batch = _batch(b, prompt, resp, v, h, ctx.device)
        t_ours, m_ours = _measure(
            ctx, lambda: _ours_step(decoder, h, batch, 0.1, autocast, ctx.device), iters)
        t_ref, m_ref = _measure(
            ctx, lambda: _reference_step(decoder, h, batch, 0.1, autocast, ctx.device), iters)
        yield {
            "model": label, "H": h, "pairs": b, "tokens/seq": t,
            "ours_ms": t_ours * 1e3, "reference_ms": t_ref * 1e3, "speedup": t_ref / t_ours,
            "ours_peak_MiB": _mib(m_ours), "reference_peak_MiB": _mib(m_ref),
            "memory_ratio": (m_ref / m_ours) if m_ours else "n/a",
            # float32 logits alive at once: ours one chunk (<= 1024 positions) x V; the
            # reference's [H,B,T,V] for policy and reference, chosen and rejected, each with
            # its log_softmax copy
            "logits_MiB_ours": min(2 * b * resp, 1024) * v * 4 / 2**20,
            "logits_MiB_reference": 4 * h * b * t * v * 4 * 2 / 2**20,
        }


def _mib(x: int | None) -> str | float:
    return "n/a" if x is None else x / 2**20


def run(ctx: BenchContext) -> Iterator[dict]:
    """Yields each model's rows as they are measured."""
    ctx.note("ours = one chosen+rejected forward, per-row head, chunked checkpointed log-probs, "
             "precomputed reference log-probs; reference = the paper's trainer structure (two "
             "policy forwards with all H heads everywhere + a resident reference model run twice).")
    if not ctx.is_cuda:
        ctx.note("CPU: absolute times mean little and torch does not track CPU peak memory (n/a); "
                 "the logits_MiB columns estimate the float32 logits each step keeps alive. The "
                 "tiny model's vocabulary (512) makes the head a small share of the step; the gap "
                 "grows with V (`--device cuda` adds a Qwen2.5-0.5B-shaped model, V = 151936).")
    # Base weights stay on the CPU; each implementation copies them to the device, so a peak
    # counts only that implementation's models, optimizer state and activations.
    models = [("tiny", lambda: load_decoder(ctx.model_dir, dtype=torch.float32),
               (4, 32, 32) if ctx.quick else (8, 64, 64))]
    if ctx.is_cuda:
        def qwen05() -> Decoder:
            with torch.device("meta"):
                dec = Decoder(ModelConfig.from_dict(QWEN25_05B))
            dec = dec.to_empty(device="cpu")
            dec.tie_weights()
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for p in dec.parameters():
                    p.normal_(0.0, 0.02, generator=g)
            return dec

        models.append(("qwen2.5-0.5B-shaped", qwen05, (2, 256, 256) if ctx.quick else (4, 512, 512)))
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx.is_cuda
                else contextlib.nullcontext)
    iters = 3 if ctx.quick else 10
    for label, make, shape in models:
        yield from _model_rows(ctx, label, make(), shape, autocast, iters)
