"""The multi-head policy: a decoder backbone, its tokenizer and H LM heads mixed per request.

Head logits ``z_i = W_i h`` on the post-norm hidden state; a request's logits are
``sum_i w_i z_i`` with its weights validated and normalised to sum 1 (``weight_matrix``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from mahalo_engine.config import ModelConfig
from mahalo_engine.heads import HEADS_FILE, check_heads, load_heads
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.utils.loader import load_decoder
from triton_kernels.heads_plan import plan_heads

HeadWeights = Sequence[float] | Sequence[Sequence[float]] | torch.Tensor | None


class Policy:
    def __init__(self, model: Decoder, tokenizer, heads: torch.Tensor, objectives: list[str],
                 path: Path | None = None) -> None:
        check_heads(heads, model.config)
        if len(objectives) != heads.shape[0]:
            raise ValueError(f"{heads.shape[0]} heads but {len(objectives)} objectives: {objectives}")
        self.model = model
        self.config: ModelConfig = model.config
        self.tokenizer = tokenizer
        self.heads = heads
        self.objectives = list(objectives)
        self.path = path

    @property
    def num_heads(self) -> int:
        return self.heads.shape[0]

    def weight_matrix(self, head_weights: HeadWeights, batch: int) -> torch.Tensor:
        """float32 ``[batch, H]`` on the heads' device, each row normalised to sum 1.

        ``head_weights``: None (uniform), one list of H weights for every row, or one list per row
        (``batch`` lists). Weights must be finite, non-negative and not all zero.
        """
        h = self.num_heads
        if head_weights is None:
            return torch.full((batch, h), 1.0 / h, dtype=torch.float32, device=self.heads.device)
        if isinstance(head_weights, torch.Tensor):
            w = head_weights.detach().double().cpu()
        else:
            try:
                w = torch.as_tensor(head_weights, dtype=torch.float64)
            except (TypeError, ValueError) as e:  # ragged rows, strings, ...
                raise ValueError(f"head_weights {_show(head_weights)} must be one list of {h} "
                                 f"numbers or one such list per row ({e})") from e
        if w.dim() == 1:
            w = w.expand(batch, -1)
        if w.dim() != 2 or w.shape[1] != h:
            raise ValueError(f"head_weights {_show(head_weights)} must hold {h} weights per row "
                             f"(objectives {self.objectives})")
        if w.shape[0] != batch:
            raise ValueError(f"head_weights has {w.shape[0]} rows {_show(head_weights)} for a "
                             f"batch of {batch}; give one list for all rows or one per row")
        if not torch.isfinite(w).all():
            raise ValueError(f"head_weights {_show(head_weights)} must be finite")
        if (w < 0).any():
            raise ValueError(f"head_weights {_show(head_weights)} must be non-negative")
        sums = w.sum(dim=1, keepdim=True)
        if (sums == 0).any():
            raise ValueError(f"head_weights {_show(head_weights)}: a row is all zero; at least one "
                             "weight per row must be positive")
        return (w / sums).to(dtype=torch.float32, device=self.heads.device)

    def logits(self, input_ids: torch.Tensor, head_weights: HeadWeights = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``[B,T,V]``: the weighted sum of the heads' logits after a full forward (no
        cache). With a single head this equals transformers' logits.

        ``Σ_i w_i W_i h = (Σ_i w_i W_i) h``: the rows are grouped by distinct weight vector with
        the engine's shared-weights plan (``triton_kernels.plan_heads``), each group's heads are
        mixed into one head (``HeadsPlan.mixed_head``: a one-hot mix is its head as is) and
        applied with one matmul, so neither ``[H,B,T,V]`` per-head logits nor H matmuls over all
        tokens are ever made; the extra memory is one mixed head at a time."""
        device = self.heads.device
        input_ids = input_ids.to(device)
        weights = self.weight_matrix(head_weights, input_ids.shape[0])
        with torch.no_grad():
            hidden = self.model(input_ids, None if attention_mask is None else attention_mask.to(device))
            # merge=False: mix one distinct row at a time (memory: one head), even when U < H.
            plan = plan_heads(self.heads, weights, merge=False)
            if len(plan.rows) == 1:
                return torch.nn.functional.linear(hidden, plan.mixed_head(0)).float()
            out = torch.empty(*input_ids.shape, self.config.vocab_size, dtype=torch.float32,
                              device=device)
            for u in range(len(plan.rows)):
                rows = (plan.index == u).nonzero().squeeze(1).to(device)
                out[rows] = torch.nn.functional.linear(hidden[rows], plan.mixed_head(u)).float()
        return out


def _show(w: HeadWeights) -> str:
    if isinstance(w, torch.Tensor):
        return f"tensor{w.tolist()}"
    return repr(w)


def load_policy(path: str | Path, *, heads: str | Path | None = None,
                dtype: torch.dtype | None = None, device: torch.device | str | None = None
                ) -> Policy:
    """A ``Policy`` from a Hugging Face directory. ``heads``: a heads file; default
    ``<path>/mahalo_heads.safetensors`` if present, else the checkpoint's lm_head as the one head
    (objective ``"lm_head"``). ``dtype`` None: config.json's dtype, else the stored one (as
    transformers' ``"auto"``); ``device`` None is the CPU."""
    from transformers import AutoTokenizer

    root = Path(path)
    model = load_decoder(root, dtype=dtype, device=device)
    weight = model.model.embed_tokens.weight
    if heads is None and (root / HEADS_FILE).is_file():
        heads = root / HEADS_FILE
    if heads is None:
        head_tensor, objectives = model.lm_head.weight.detach().unsqueeze(0), ["lm_head"]
    else:
        head_tensor, objectives = load_heads(heads, device=weight.device)
        check_heads(head_tensor, model.config, what=f"heads in {heads}")
        if not torch.isfinite(head_tensor).all():
            raise ValueError(f"heads file {heads} holds non-finite values")
        head_tensor = head_tensor.to(weight.dtype)
    tokenizer = AutoTokenizer.from_pretrained(root)
    return Policy(model, tokenizer, head_tensor, objectives, root)
