"""Decode-step latency: our slot-cache decoder vs transformers on the same weights, batch and prompt.

One "step" = a forward of one new token per sequence + LM head + greedy argmax, the core of a
generate loop. Each timed call runs ``steps`` consecutive steps from the same prefilled state and
reports the time per step. Implementations:

- transformers with its DynamicCache, and with its StaticCache (both on their sdpa attention);
- ours, eager (``Decoder.decode`` over a ``KVCache``);
- ours replayed from a CUDA graph (GPU only): possible because decode has no host sync.

A third group compares whole engine steps (``ENGINE_B`` rows, ``ENGINE_PROMPT``-token prompts):
transformers' step with its greedy argmax, or with ``generate``'s sampling (temperature, its
default top-k 50, softmax, multinomial), against our decode + the engine's `Sampler` over an
``ENGINE_H``-head policy, greedy and sampling at the same settings: with one weight vector for
every row (the merged-heads path: one head read, like transformers' one LM head) and with a
distinct vector per row (the general path: H heads read).

A second group of rows isolates how our decode reads the cache, on a cache of ``READ_MAX_LEN``
positions holding ``READ_LIVE`` live ones (the engine's usual case: max_seq_len 4096, short
sequences): gathering every slot's whole max_len and attending over it with a mask, against
viewing the contiguous slot range in place over the prefix ``[0, kv_len)`` the engine's runner
would choose (`kv_bucket`). Same model, same tokens; the ratio is the point.

Models: ``ctx.model_dir`` (the tiny default, or --model) and a random-init model of Qwen2.5-0.5B's
shape built from its config (nothing downloaded): on a GPU always, on CPU with ``--large``
(there only the engine-step rows run on it, at B = ``ENGINE_B``).
"""
from __future__ import annotations

import copy
from typing import Callable, Iterator

import torch

from bench.common import BenchContext, hf_cache_kwarg, model_label, timeit
from mahalo_engine.cache import KVCache
from mahalo_engine.model_config import ModelConfig
from mahalo_engine.engine.decode_runner import kv_bucket
from mahalo_engine.engine.sampler import Sampler
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.models.loader import load_decoder

BATCHES = (1, 8)
ENGINE_B, ENGINE_PROMPT, ENGINE_H = 8, 64, 3  # the engine-step rows
ENGINE_T, ENGINE_TOP_K = 0.8, 50  # sampling rows: transformers' default top-k
SHAPED = "qwen2.5-0.5B-shaped (random init)"
READ_MAX_LEN, READ_LIVE = 4096, 256  # cache positions vs live ones, for the cache-read rows
QWEN25_05B = dict(  # Qwen2.5-0.5B's published shape
    model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
)


def _models(ctx: BenchContext, dtype: torch.dtype):
    """(label, transformers model, our Decoder) pairs sharing weights: ``ctx.model_dir``, then the
    Qwen2.5-0.5B shape (CUDA, or ``--large``). ``--quick`` on CUDA runs the full-size model first:
    it is what a budgeted device run is for (the tiny model is launch-bound there)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def given():
        hf = AutoModelForCausalLM.from_pretrained(ctx.model_dir, dtype=dtype,
                                                  attn_implementation="sdpa")
        ours = load_decoder(ctx.model_dir, dtype=dtype, device=ctx.device)
        return model_label(ctx.model_dir), hf.to(ctx.device).eval(), ours

    def shaped():
        cfg = AutoConfig.for_model(**QWEN25_05B)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(ctx.device):
            hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
            ours = Decoder(ModelConfig.from_dict(cfg.to_dict())).to(dtype)
        ours.load_state_dict(hf.state_dict())
        return SHAPED, hf, ours.eval()

    makers = [given] + ([shaped] if ctx.is_cuda or ctx.large else [])
    if ctx.is_cuda and ctx.quick:
        makers.reverse()
    for make in makers:
        yield make()


def _hf_runner(model, kind: str, prompt: torch.Tensor, first_ids: torch.Tensor, steps: int,
               pool: int) -> tuple[Callable[[], None], torch.Tensor]:
    """A closure running ``steps`` greedy steps, fed ``first_ids`` first, from a prefilled cache
    (a fresh copy per call, made outside the timing), and the first step's logits."""
    from transformers import DynamicCache, StaticCache

    key = hf_cache_kwarg(model)
    b, p = prompt.shape
    if kind == "dynamic":
        cache = DynamicCache(config=model.config)
    else:
        cache = StaticCache(config=model.config, max_cache_len=p + steps + 1)
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **{key: cache})
    copies = [copy.deepcopy(cache) for _ in range(pool)]

    @torch.no_grad()
    def step_logits(c, ids):
        return model(input_ids=ids[:, None], use_cache=True, **{key: c}).logits[:, -1]

    first_logits = step_logits(copy.deepcopy(cache), first_ids).float()

    @torch.no_grad()
    def run():
        c = copies.pop() if copies else copy.deepcopy(cache)
        ids = first_ids
        for _ in range(steps):
            ids = step_logits(c, ids).argmax(-1)

    return run, first_logits


def _our_runner(model: Decoder, prompt: torch.Tensor, first_ids: torch.Tensor, steps: int,
                graph: bool, *, max_len: int | None = None, bounded: bool = False
                ) -> tuple[Callable[[], None], torch.Tensor]:
    """Like ``_hf_runner`` for our decoder; with ``graph`` each step is a CUDA graph replay. The
    cache holds ``max_len`` positions (default: just enough); ``bounded`` reads slots ``[0, B)``
    in place over the runner's prefix bucket, else every slot's whole max_len is gathered."""
    b, p = prompt.shape
    dtype = model.dtype
    max_len = p + steps + 1 if max_len is None else max_len
    cache = KVCache.allocate(model.config, b, max_len, dtype=dtype, device=prompt.device)
    slots = torch.arange(b, device=prompt.device)
    model.prefill(cache, prompt.tolist(), slots)
    saved = cache.lens.clone()
    ids = first_ids.clone()
    read, kv_len = (slice(0, b), kv_bucket(p + steps, max_len)) if bounded else (slots, None)

    @torch.no_grad()
    def step() -> torch.Tensor:
        logits = model.lm_head(model.decode(cache, ids, read, kv_len=kv_len))
        ids.copy_(logits.argmax(-1))
        return logits

    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture, as CUDA graphs require
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            static_logits = step()

        def do_step() -> torch.Tensor:
            captured.replay()
            return static_logits
    else:
        do_step = step

    def reset() -> None:
        cache.lens.copy_(saved)
        ids.copy_(first_ids)

    def run() -> None:
        reset()
        for _ in range(steps):
            do_step()

    reset()
    first_logits = do_step().float().clone()
    return run, first_logits


def run(ctx: BenchContext) -> Iterator[dict]:
    """Yields rows as they are measured (the runner writes each to the JSON at once)."""
    dtype = torch.bfloat16 if ctx.is_cuda else torch.float32
    prompt_len = (128 if ctx.quick else 512) if ctx.is_cuda else (32 if ctx.quick else 128)
    steps = 8 if ctx.quick else 32
    iters = 3 if ctx.quick else 10
    ctx.note(f"{steps} greedy steps per timed call after a {prompt_len}-token prompt; {dtype}. "
             "'rel Δlogits' = max |logit difference| / max |logit| at the first decode step, "
             "against transformers' DynamicCache run on the same weights.")
    ctx.note(f"Cache-read rows: a cache of {READ_MAX_LEN} positions per slot with "
             f"{READ_LIVE - steps}-token prompts; the bounded read attends over "
             f"[0, {kv_bucket(READ_LIVE, READ_MAX_LEN)}). 'speedup' and 'rel Δlogits' there are "
             "against the full gathered read (eager vs eager, graph vs graph).")
    ctx.note(f"Engine-step rows: B = {ENGINE_B}, {ENGINE_PROMPT}-token prompts, {steps} steps "
             "(8 for the 0.5B shape on CPU); "
             f"ours samples from an H = {ENGINE_H} policy (head 0 = the model's LM head); "
             f"sampling at T = {ENGINE_T}, top-k {ENGINE_TOP_K} on both sides. 'vs HF' = "
             "transformers' time / ours for the same mode (> 1: ours faster).")
    if ctx.is_cuda and ctx.quick:
        ctx.note(f"--quick on CUDA: the {SHAPED} model runs first, its engine-step rows and B = "
                 f"{BATCHES[-1]} against transformers' DynamicCache only (no StaticCache, no "
                 f"{READ_MAX_LEN}-position cache-read rows).")
    if not ctx.is_cuda:
        ctx.note("CPU: absolute times mean little (tiny model, 2 cores, Python dispatch dominates); "
                 "read the ratios. GPU numbers come from `--device cuda` (recorded runs: "
                 "bench/results/).")
    for label, hf, ours in _models(ctx, dtype):
        vocab = ours.config.vocab_size
        big_on_cpu = label == SHAPED and not ctx.is_cuda  # ~0.3 s a step: few steps, few calls
        yield from _engine_rows(ctx, label, hf, ours, 8 if big_on_cpu else steps,
                                3 if big_on_cpu else iters)
        if big_on_cpu:
            continue  # CPU: the 0.5B shape runs the engine-step rows only
        # --quick on CUDA keeps the full-size model's minutes for what the device check needs:
        # our graph against transformers at B = 8 (the StaticCache and 4096-position rows take
        # most of this section's time there).
        short = ctx.quick and label == SHAPED
        for b in BATCHES[-1:] if short else BATCHES:
            g = torch.Generator().manual_seed(b)
            prompt = torch.randint(0, vocab, (b, prompt_len + 1), generator=g).to(ctx.device)
            prompt, first = prompt[:, :-1].contiguous(), prompt[:, -1]  # same first token for all
            pool = iters + 1  # one fresh cache copy per timed call (warmup=1)
            impls = [
                ("transformers DynamicCache", lambda: _hf_runner(hf, "dynamic", prompt, first, steps, pool)),
                ("transformers StaticCache", lambda: _hf_runner(hf, "static", prompt, first, steps, pool)),
                ("mahalo slot cache", lambda: _our_runner(ours, prompt, first, steps, graph=False)),
            ]
            if short:
                del impls[1]
            if ctx.is_cuda:
                impls.append(("mahalo slot cache + CUDA graph",
                              lambda: _our_runner(ours, prompt, first, steps, graph=True)))
            base_time, base_logits = None, None
            for name, make in impls:
                fn, logits = make()
                t = timeit(fn, ctx.device, warmup=1, iters=iters) / steps
                if base_time is None:
                    base_time, base_logits = t, logits
                err = ((logits - base_logits).abs().max() / base_logits.abs().max()).item()
                yield {
                    "model": label, "B": b, "prompt": prompt_len, "impl": name,
                    "ms/step": t * 1e3, "speedup vs HF dynamic": base_time / t,
                    "rel Δlogits vs HF": err,
                }
                del fn
            if not short:
                yield from _read_rows(ctx, label, ours, b, steps, iters)


def _read_rows(ctx: BenchContext, label: str, model: Decoder, b: int, steps: int,
               iters: int) -> Iterator[dict]:
    """Our decode with the whole-max_len gathered read vs the bounded in-place read."""
    g = torch.Generator().manual_seed(100 + b)
    tokens = torch.randint(0, model.config.vocab_size, (b, READ_LIVE - steps + 1), generator=g)
    prompt, first = tokens[:, :-1].to(ctx.device), tokens[:, -1].to(ctx.device)
    kv_len = kv_bucket(READ_LIVE, READ_MAX_LEN)
    for graph in (False, True) if ctx.is_cuda else (False,):
        suffix = " + CUDA graph" if graph else ""
        base_time = base_logits = None
        for name, bounded in ((f"mahalo, gather all {READ_MAX_LEN} positions{suffix}", False),
                              (f"mahalo, in-place [0, {kv_len}){suffix}", True)):
            fn, logits = _our_runner(model, prompt, first, steps, graph, max_len=READ_MAX_LEN,
                                     bounded=bounded)
            t = timeit(fn, ctx.device, warmup=1, iters=iters) / steps
            if base_time is None:
                base_time, base_logits = t, logits
            yield {
                "model": label, "B": b, "prompt": prompt.shape[1], "impl": name,
                "ms/step": t * 1e3, "speedup vs full read": base_time / t,
                "rel Δlogits vs full read":
                    ((logits - base_logits).abs().max() / base_logits.abs().max()).item(),
            }
            del fn


def _hf_sample(logits: torch.Tensor) -> torch.Tensor:
    """transformers' ``generate`` sampling: temperature, then its top-k warper (drop scores below
    the k-th largest), softmax, one multinomial draw per row."""
    scores = logits / ENGINE_T
    kth = torch.topk(scores, ENGINE_TOP_K)[0][..., -1, None]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(torch.softmax(scores, dim=-1), 1).squeeze(1)


def _engine_rows(ctx: BenchContext, label: str, hf, model: Decoder, steps: int,
                 iters: int) -> Iterator[dict]:
    """Whole decode steps: transformers (greedy / sampling) vs our decode + the engine's Sampler
    over an H-head policy, shared weights (merged heads) and distinct weights (general path)."""
    b, vocab, d = ENGINE_B, model.config.vocab_size, model.config.hidden_size
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (b, ENGINE_PROMPT + 1), generator=g).to(ctx.device)
    prompt, first = tokens[:, :-1].contiguous(), tokens[:, -1]
    lm = model.lm_head.weight.detach()
    noise = torch.randn(ENGINE_H - 1, vocab, d, generator=g).to(ctx.device, lm.dtype)
    heads = torch.cat((lm[None], lm[None] + 0.1 * lm.std() * noise))
    del noise
    shared = torch.full((b, ENGINE_H), 1.0 / ENGINE_H)
    distinct = torch.softmax(torch.randn(b, ENGINE_H, generator=g), dim=-1)

    def hf_step(kind: str):
        pick = (lambda z: z.argmax(-1)) if kind == "greedy" else _hf_sample
        cache_kw = hf_cache_kwarg(hf)
        from transformers import DynamicCache

        with torch.no_grad():
            cache = DynamicCache(config=hf.config)
            hf(input_ids=prompt, use_cache=True, **{cache_kw: cache})
        copies = [copy.deepcopy(cache) for _ in range(iters + 1)]

        @torch.no_grad()
        def run():
            c = copies.pop() if copies else copy.deepcopy(cache)
            ids = first
            for _ in range(steps):
                ids = pick(hf(input_ids=ids[:, None], use_cache=True, **{cache_kw: c}).logits[:, -1])
        return run

    def our_step(kind: str, weights: torch.Tensor):
        cache = KVCache.allocate(model.config, b, ENGINE_PROMPT + steps + 1, dtype=lm.dtype,
                                 device=ctx.device)
        model.prefill(cache, prompt.tolist(), torch.arange(b, device=ctx.device))
        saved = cache.lens.clone()
        sampler = Sampler(heads, b)
        sampler.set_weights(weights)
        sampler.configure(0.0 if kind == "greedy" else ENGINE_T, ENGINE_TOP_K, seed=0)
        kv_len = kv_bucket(ENGINE_PROMPT + steps, cache.max_len)

        @torch.no_grad()
        def run():
            cache.lens.copy_(saved)
            ids = first
            for _ in range(steps):
                hidden = model.decode(cache, ids, slice(0, b), kv_len=kv_len)
                ids, _ = sampler.sample(hidden)
        return run

    base = {}
    impls = [(f"transformers DynamicCache, {k}", k, lambda k=k: hf_step(k))
             for k in ("greedy", "sampling")]
    impls += [(f"mahalo engine step H={ENGINE_H}, {w_name} weights, {k}", k,
               lambda k=k, w=w: our_step(k, w))
              for w_name, w in (("shared", shared), ("distinct", distinct))
              for k in ("greedy", "sampling")]
    for name, kind, make in impls:
        fn = make()
        t = timeit(fn, ctx.device, warmup=1, iters=iters) / steps
        base.setdefault(kind, t)
        yield {"model": label, "B": b, "prompt": ENGINE_PROMPT, "impl": name,
               "ms/step": t * 1e3, "vs HF": base[kind] / t}
        del fn
