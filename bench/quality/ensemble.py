"""The logit-ensemble baseline: two separately trained policies (two backbones), sampled from the
weighted sum of their logits ``w·logits_A + (1−w)·logits_B`` at every step.

This is the compute-heavy upper bound MAH-DPO approximates with one backbone (the paper's
ensemble of single-objective models); MAH-DPO mixes the logits of its heads the same way. Built on
the public API only (`Policy.logits`: a full forward, no cache), so it recomputes the whole
sequence at every step: fine at the bench's sizes, not a serving path. Sampling as the engine's:
temperature, then top-k, then a draw; an answer ends at EOS or ``max_new_tokens``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from mahalo_engine.text import encode_prompt
from mahalo_engine.utils.padding import pad_right


class LogitEnsemble:
    """``generate(prompts, weight, ...)`` over two policies that share a tokenizer."""

    def __init__(self, a: Any, b: Any) -> None:
        if a.config.vocab_size != b.config.vocab_size:
            raise ValueError(f"the policies' vocabularies differ: {a.config.vocab_size} vs "
                             f"{b.config.vocab_size}")
        self.a, self.b = a, b
        self.tokenizer = a.tokenizer
        self.eos = a.tokenizer.eos_token_id

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], weight: float, *, max_new_tokens: int,
                 temperature: float, top_k: int, seed: int) -> list[tuple[str, list[int]]]:
        """``(text, token ids)`` per prompt, sampled from ``weight·A + (1−weight)·B`` logits."""
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"ensemble weight must lie in [0, 1], got {weight}")
        gen = torch.Generator().manual_seed(seed)
        seqs = [encode_prompt(self.tokenizer, p) for p in prompts]
        out: list[list[int]] = [[] for _ in prompts]
        live = list(range(len(prompts)))
        for _ in range(max_new_tokens):
            if not live:
                break
            ids, lens = pad_right([seqs[i] + out[i] for i in live], self.eos or 0)
            mask = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()
            last = lens - 1
            rows = torch.arange(len(live))
            logits = torch.zeros(len(live), self.a.config.vocab_size)
            for policy, w in ((self.a, weight), (self.b, 1.0 - weight)):
                if w:
                    logits += w * policy.logits(ids, attention_mask=mask)[rows, last].cpu()
            token = _sample(logits, temperature, top_k, gen)
            still = []
            for j, i in enumerate(live):
                t = int(token[j])
                out[i].append(t)
                if t != self.eos:
                    still.append(i)
            live = still
        return [(self.tokenizer.decode(t, skip_special_tokens=True, clean_up_tokenization_spaces=False), t)
                for t in out]


def _sample(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if 0 < top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return torch.multinomial(scaled.softmax(-1), 1, generator=gen).squeeze(1)
