"""PRM-guided step search: ours vs re-encoding vs the paper's loop, same policy, PRM, K, boundary
and token caps (the paper's sampling: T = 1, top-k 50).

- ours: `Engine.search` (default ``cache_layout="fork"``; "ours shared_prefix" is the same
  search in the shared-prefix layout: one prefix per request, cascade attention, for the policy
  and the PRM alike — the PRM scores the K steps by cascade extend attention over its own
  prefix slot and commits the winner by appending it) — K candidate
  slots per request forked once from the running cache,
  decoded in lockstep (fused multi-head sampling, CUDA graphs on GPU), scored by one ragged
  extend over the PRM's persistent cache, winners promoted by copying only the step's tokens.
- re-encode: per step, transformers ``generate`` from the full token sequence with
  ``num_return_sequences=K`` (all requests batched, left-padded) stopping each row at the
  boundary, then the PRM re-encodes prompt + steps + candidate for every candidate (one batch).
- paper loop: the reference implementation's structure — batch 1, candidates one after another,
  token by token from a ``copy.deepcopy`` of the transformers cache, the boundary checked by
  decoding the candidate's text after every token, EOS never fed, the PRM re-encoding each
  candidate alone. Requests run one after another, so its tokens/s does not depend on B: it is
  measured once, on one request. The reference also calls ``torch.cuda.empty_cache()`` and
  ``gc.collect()`` after every step and PRM call; that is left out here, so this loop is an upper
  bound on the reference's speed (ratios against it are conservative).

Reported: committed tokens/s, milliseconds per step (every request advancing one step), peak
device memory, and the speed-up ratios ours/re-encode, ours/paper, paper/re-encode (the paper
claims 4.2x for its loop over re-encoding). Models: ``ctx.model_dir`` on CPU; on GPU a
random-init policy and PRM of Qwen2.5-0.5B's shape (unless ``--model`` names a checkpoint).
"""
from __future__ import annotations

import copy
import time
from typing import Iterator

import torch

from bench.common import (BenchContext, hf_cache_kwarg, model_label, peak_memory_bytes,
                          reset_peak_memory, synchronize)
from bench.decode import QWEN25_05B
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.engine import Engine, SearchConfig
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.policy import Policy
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.value_model import ValueHead, ValueModel

BOUNDARY = "\n\n"
TOP_K = 50
_TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
         "in May. How many clips did Natalia sell altogether in April and May? ")


def _setup(ctx: BenchContext, dtype: torch.dtype):
    """(label, tokenizer, transformers policy, our Policy, PRM) sharing the policy's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ctx.model_dir)
    shaped = ctx.is_cuda and ctx.model_dir == tiny_checkpoint("qwen2")
    if shaped:
        cfg = AutoConfig.for_model(**QWEN25_05B)
        label = "qwen2.5-0.5B-shaped (random init)"
    else:
        cfg = AutoConfig.from_pretrained(ctx.model_dir)
        label = model_label(ctx.model_dir)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    if not shaped:
        hf = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype, config=cfg)
        hf = hf.to(ctx.device)
    with torch.device(ctx.device):
        if shaped:
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        mcfg = ModelConfig.from_dict(cfg.to_dict())
        ours = Decoder(mcfg).to(dtype)
        ours.load_state_dict(hf.state_dict())
        prm_backbone = Decoder(mcfg).to(dtype)  # another random backbone
        prm = ValueModel(prm_backbone.eval(), ValueHead(mcfg.hidden_size), "value", tok).eval()
    policy = Policy(ours.eval(), tok, ours.lm_head.weight.detach()[None], ["lm_head"])
    return label, tok, hf.eval(), policy, prm


def _prompts(tok, batch: int, length: int) -> list[list[int]]:
    ids = tok.encode(_TEXT * (1 + length // 16), add_special_tokens=False)
    return [ids[b: b + length] for b in range(batch)]


def _eos(tok, hf) -> int:
    eos = hf.generation_config.eos_token_id
    return int(eos[0] if isinstance(eos, (list, tuple)) else eos if eos is not None
               else tok.eos_token_id)


def _cut(tok, ids: list[int], eos: int) -> list[int]:
    """A candidate up to and including its boundary or EOS token (the step that would be kept)."""
    for i, t in enumerate(ids):
        if t == eos or BOUNDARY in tok.decode(ids[: i + 1]):
            return ids[: i + 1]
    return ids


def _reencode(tok, hf, prm, prompts, k: int, steps: int, step_tokens: int) -> tuple[int, int]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos, pad = _eos(tok, hf), tok.pad_token_id if tok.pad_token_id is not None else 0
    dev = hf.device

    class AtBoundary(StoppingCriteria):  # per row: stop once its new text holds the boundary
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids, scores, **kw):
            texts = tok.batch_decode(input_ids[:, self.start:])
            return torch.tensor([BOUNDARY in t for t in texts], device=input_ids.device)

    seqs = [list(p) for p in prompts]
    tokens = 0
    for _ in range(steps):
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=dev)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=dev)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0,
                              top_k=TOP_K, max_new_tokens=step_tokens, num_return_sequences=k,
                              stopping_criteria=StoppingCriteriaList([AtBoundary(width)]),
                              pad_token_id=pad, eos_token_id=eos)
        cands = [_cut(tok, row, eos) for row in out[:, width:].tolist()]
        scores = prm.score_full([seqs[i // k] + c for i, c in enumerate(cands)]).view(-1, k)
        for b, w in enumerate(scores.argmax(dim=1).tolist()):
            seqs[b] += cands[b * k + w]
            tokens += len(cands[b * k + w])
    return tokens, steps * len(prompts)


def _paper_loop(tok, hf, prm, prompts, k: int, steps: int, step_tokens: int) -> tuple[int, int]:
    key, eos, dev = hf_cache_kwarg(hf), _eos(tok, hf), hf.device
    tokens = 0
    with torch.no_grad():
        for prompt in prompts:
            out = hf(input_ids=torch.tensor([prompt], device=dev), use_cache=True)
            past, logits, seq = getattr(out, key), out.logits[:, -1], list(prompt)
            for step in range(steps):
                cands = []
                for j in range(k):
                    local_past, local_logits = copy.deepcopy(past), logits.clone()
                    gen = torch.Generator(device=dev).manual_seed(step * 10007 + j)
                    picked = []
                    for _ in range(step_tokens):
                        probs = torch.softmax(local_logits.float(), dim=-1)
                        top = torch.topk(probs, TOP_K, dim=-1)
                        nid = int(top.indices[0, torch.multinomial(top.values / top.values.sum(),
                                                                   1, generator=gen)].item())
                        if nid == eos:
                            break
                        picked.append(nid)
                        o = hf(input_ids=torch.tensor([[nid]], device=dev), use_cache=True,
                               **{key: local_past})
                        local_past, local_logits = getattr(o, key), o.logits[:, -1]
                        if BOUNDARY in tok.decode(picked):
                            break
                    cands.append((picked, local_past, local_logits))
                scores = [float(prm.score_full([seq + c[0]])) if c[0] else -1e9 for c in cands]
                best = cands[max(range(k), key=scores.__getitem__)]
                seq += best[0]
                tokens += len(best[0])
                past, logits = best[1], best[2]
    return tokens, steps * len(prompts)


def _measure(ctx: BenchContext, fn, *, warmup: bool = True,
             repeats: int = 1) -> tuple[float, int, int, int | None]:
    """(wall seconds, committed tokens, request-steps, peak bytes) of the timed call with the
    median tokens/s among ``repeats``."""
    if warmup:
        fn()  # allocation, Triton compilation, CUDA graph capture
    runs = []
    for _ in range(repeats):
        reset_peak_memory(ctx.device)
        synchronize(ctx.device)
        t0 = time.perf_counter()
        tokens, steps = fn()
        synchronize(ctx.device)
        runs.append((time.perf_counter() - t0, tokens, steps, peak_memory_bytes(ctx.device)))
    runs.sort(key=lambda r: r[1] / r[0])
    return runs[len(runs) // 2]


def _workloads(ctx: BenchContext) -> list[tuple[int, tuple[int, ...]]]:
    """(prompt tokens, batch sizes) per case: first the case the engine exists for, long contexts
    (a dialogue or a worked math problem: >= 512 tokens, where re-encoding costs most), then a
    short-prompt case, where there is little to re-encode."""
    if ctx.is_cuda:
        return [(1024, (1, 8)), (64, (1, 8))]
    return [(512, (1,)), (32, (1,))] if ctx.quick else [(1024, (1, 4)), (32, (1,))]


def run(ctx: BenchContext) -> Iterator[dict]:
    """Yields one row per (prompt length, batch) as it is measured."""
    dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
    label, tok, hf, policy, prm = _setup(ctx, dtype)
    k = 4 if ctx.quick else 5
    steps, step_tokens = (4, 32) if ctx.is_cuda else ((3, 8) if ctx.quick else (4, 16))
    lengths = " and ".join(str(n) for n, _ in _workloads(ctx))
    ctx.note(f"K={k} candidates, {steps} steps of <= {step_tokens} tokens, boundary {BOUNDARY!r}, "
             f"prompts of {lengths} tokens (the long case is what the engine is for: every step "
             "re-encodes the whole context in the re-encode baseline, never in ours), T=1, "
             f"top-k {TOP_K}; tok/s counts committed tokens; ms/step is the time for every "
             "request to advance one step. The paper loop ran on one request per prompt length "
             "(its rate does not depend on B) and without the reference's per-step "
             "empty_cache()/gc.collect(), so ours/paper is conservative. Ratios are tok/s "
             "speed-ups.")
    if ctx.is_cuda:
        ctx.note("Peak memory includes the resident models: the policy twice (ours and "
                 "transformers' copy of the same weights) and the PRM.")
    else:
        ctx.note("CPU: a tiny model, so times are dominated by Python and launch overheads; "
                 "absolute numbers mean little, the ratio between the long- and short-prompt rows "
                 "is what carries over. Peak memory is tracked on CUDA only.")
    for prompt_len, batches in _workloads(ctx):
        # The paper's loop serves one request at a time: its rate does not depend on B, so it
        # runs once per prompt length, on one request (after the other two have warmed the same
        # transformers model up).
        paper = None
        for batch in batches:
            prompts = _prompts(tok, batch, prompt_len)
            engine = Engine(policy, prm=prm, max_batch=batch,
                            max_seq_len=prompt_len + steps * step_tokens + 8)
            cfg = SearchConfig(candidates=k, boundary=BOUNDARY, max_steps=steps,
                               max_step_tokens=step_tokens, temperature=1.0, top_k=TOP_K)

            shared = Engine(policy, prm=prm, max_batch=batch, cache_layout="shared_prefix",
                            max_seq_len=prompt_len + steps * step_tokens + 8)

            def ours(engine=engine):
                res = engine.search(prompts, config=cfg)
                return sum(len(r.token_ids) for r in res), sum(len(r.steps) for r in res)

            repeats = 2 if ctx.is_cuda else 3
            results = {
                "ours": _measure(ctx, ours, repeats=repeats),
                "ours shared_prefix": _measure(ctx, lambda: ours(shared), repeats=repeats),
                "re-encode": _measure(ctx, lambda: _reencode(tok, hf, prm, prompts, k, steps,
                                                              step_tokens), repeats=repeats),
            }
            if paper is None:
                paper = _measure(ctx, lambda: _paper_loop(tok, hf, prm, prompts[:1], k, steps,
                                                           step_tokens), warmup=False)
            results["paper"] = paper
            row: dict = {"model": label, "prompt": prompt_len, "B": batch, "K": k}
            speed = {}
            for name, (wall, tokens, n_steps, peak) in results.items():
                speed[name] = tokens / wall
                row[f"{name} tok/s"] = speed[name]
                # Time for all B requests to advance one step (n_steps counts request-steps; the
                # paper loop would serve the B requests one after another).
                row[f"{name} ms/step"] = 1e3 * wall * batch / n_steps
                if peak is not None:
                    row[f"{name} peak MiB"] = peak / 2**20
            row["shared_prefix/fork"] = speed["ours shared_prefix"] / speed["ours"]
            row["ours/re-encode"] = speed["ours"] / speed["re-encode"]
            row["ours/paper"] = speed["ours"] / speed["paper"]
            row["paper/re-encode"] = speed["paper"] / speed["re-encode"]
            yield row
