"""The multi-head policy: a decoder backbone, its tokenizer and H LM heads mixed per request.

Head logits ``z_i = W_i h`` on the post-norm hidden state; a request's logits are
``sum_i w_i z_i`` with its weights validated and normalised to sum 1 (``weight_matrix``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from mahalo_engine.model_config import ModelConfig
from mahalo_engine.heads import HEADS_FILE, check_heads, load_heads
from mahalo_engine.models.decoder import Decoder
from mahalo_engine.models.from_hf import as_decoder
from mahalo_engine.models.loader import is_ignored_tensor, load_decoder
from mahalo_engine.utils.paths import load_tokenizer
from triton_kernels.multihead.heads_plan import plan_heads

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

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, heads: torch.Tensor | None = None,
                   objectives: Sequence[str] | None = None) -> "Policy":
        """A policy over in-memory objects, sharing their storage (nothing is copied): ``model`` a
        `Decoder` or a transformers ``*ForCausalLM`` of a supported family (`as_decoder`),
        ``heads [H,V,d]`` on the model's device and in its dtype (None: the model's ``lm_head`` as
        the one head, objective ``"lm_head"``, as `load_policy` without a heads file).
        ``objectives`` default to ``head0 .. head{H-1}``."""
        decoder = as_decoder(model)
        if heads is None:
            if decoder.lm_head is None:
                raise ValueError("the model has no lm_head (a trainer dropped it for separate "
                                 "heads): pass heads=")
            heads, default = decoder.lm_head.weight.detach().unsqueeze(0), ["lm_head"]
        else:
            if not isinstance(heads, torch.Tensor):
                raise TypeError(f"heads must be a tensor [H, V, d], got {type(heads).__name__}")
            check_heads(heads, decoder.config)
            if (heads.dtype, heads.device) != (decoder.dtype, decoder.device):
                raise ValueError(f"heads are {heads.dtype} on {heads.device} but the model is "
                                 f"{decoder.dtype} on {decoder.device}; convert them first (the "
                                 "policy shares the tensor, it does not copy it)")
            heads = heads.detach()  # the same storage and version counter, outside autograd
            default = [f"head{i}" for i in range(heads.shape[0])]
        return cls(decoder, tokenizer, heads, default if objectives is None else list(objectives))

    def load_weights(self, weights: Any, heads: torch.Tensor | None = None) -> None:
        """Copy new weights into this policy's tensors in place (their storage never changes).

        ``weights``: a state dict with the decoder's (= transformers') names, a `Decoder` or a
        transformers ``*ForCausalLM``. Every backbone tensor (``model.*``) must be present with
        its shape; ``lm_head.weight`` is optional (a trainer with separate heads drops it) unless
        the policy's one head is its ``lm_head``. ``heads``: new ``[H,V,d]`` heads, or None to keep
        them. Dtypes and devices may differ (``copy_`` converts); a source tensor that already is
        the target's storage is skipped. Everything is checked before anything is written."""
        if isinstance(weights, torch.nn.Module):
            weights = as_decoder(weights).state_dict()
        if not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a state dict, a Decoder or a transformers "
                            f"*ForCausalLM, got {type(weights).__name__}")
        target = self.model.state_dict()
        source = {k: v for k, v in weights.items() if not is_ignored_tensor(k)}
        # The engine samples from the heads, never from lm_head, so a source without lm_head
        # leaves nothing stale -- unless the one head is an untied lm_head itself.
        head_is_lm_head = self._head_is_lm_head() and not self.config.tie_word_embeddings
        optional = set() if head_is_lm_head else {"lm_head.weight"}
        missing = sorted(set(target) - set(source) - optional)
        unexpected = sorted(set(source) - set(target) - {"lm_head.weight"})
        if missing or unexpected:
            raise ValueError(f"new weights do not fit the policy: missing {missing}, unexpected "
                             f"{unexpected}")
        bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise TypeError(f"new weights {bad[:5]} are not tensors")
        wrong = [f"{k}: {tuple(v.shape)}, expected {tuple(target[k].shape)}"
                 for k, v in sorted(source.items()) if k in target and v.shape != target[k].shape]
        if heads is not None and heads.shape != self.heads.shape:
            wrong.append(f"heads: {tuple(heads.shape)}, expected {tuple(self.heads.shape)}")
        if wrong:
            raise ValueError(f"new weights are mis-shaped: {wrong}")
        if self.config.tie_word_embeddings and "lm_head.weight" in source and not torch.equal(
                source["lm_head.weight"].to(source["model.embed_tokens.weight"]),
                source["model.embed_tokens.weight"]):
            raise ValueError("the policy ties lm_head to the embedding but the new lm_head.weight "
                             "differs from model.embed_tokens.weight (one would overwrite the other)")
        pairs = [(target[k], v) for k, v in source.items() if k in target]
        if heads is not None:
            pairs.append((self.heads, heads))
        frozen = [k for k, v in target.items() if v.is_inference()]
        if frozen or self.heads.is_inference():
            raise ValueError(f"the policy's tensors {(frozen or ['heads'])[:3]} are inference "
                             "tensors (made under torch.inference_mode()), which cannot be updated "
                             "in place; build the policy outside inference mode")
        with torch.no_grad():
            for dst, src in pairs:
                if not _same_storage(dst, src):
                    dst.copy_(src)

    def _head_is_lm_head(self) -> bool:
        lm = getattr(self.model, "lm_head", None)
        return lm is not None and self.num_heads == 1 and _same_storage(self.heads[0], lm.weight)

    @property
    def num_heads(self) -> int:
        return self.heads.shape[0]

    def weight_matrix(self, head_weights: HeadWeights, batch: int) -> torch.Tensor:
        """float32 ``[batch, H]`` on the heads' device, each row normalised to sum 1.

        ``head_weights``: None (uniform), one list of H weights for every row, or one list per row
        (``batch`` lists). Weights must be finite, non-negative and not all zero (`weight_rows`).
        """
        h = self.num_heads
        if head_weights is None:
            return torch.full((batch, h), 1.0 / h, dtype=torch.float32, device=self.heads.device)
        w = weight_rows(head_weights, batch, h, objectives=self.objectives)
        return w.to(dtype=torch.float32, device=self.heads.device)

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


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype \
        and a.shape == b.shape and a.stride() == b.stride()


def weight_rows(head_weights: HeadWeights, rows: int, num_heads: int | None, *,
                name: str = "head_weights", broadcast: bool = True,
                objectives: Sequence[str] | None = None,
                rows_for: str = "a batch of") -> torch.Tensor:
    """float64 ``[rows, H]`` on the CPU, each row normalised to sum 1: the one check of head
    weights. ``head_weights``: one list per row, or (``broadcast``) one list for every row;
    ``num_heads`` None accepts any H the rows share. Finite, non-negative, not all zero per row;
    ValueError naming ``name``, the value and what was expected otherwise."""
    if isinstance(head_weights, torch.Tensor):
        w = head_weights.detach().double().cpu()
    else:
        try:
            w = torch.as_tensor(head_weights, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:  # ragged rows, strings, ...
            h = "H" if num_heads is None else num_heads
            form = f"one list of {h} numbers or one such list per row" if broadcast \
                else f"one list of {h} numbers per row"
            raise ValueError(f"{name} {_show(head_weights)} must be {form} ({e})") from e
    if w.dim() == 1 and broadcast:
        w = w.expand(rows, -1)
    if w.dim() != 2 or w.shape[1] == 0 or (num_heads is not None and w.shape[1] != num_heads):
        h = "H" if num_heads is None else num_heads
        heads = "" if objectives is None else f" (objectives {list(objectives)})"
        per = "per row" if broadcast else f"in each of {rows} rows"
        raise ValueError(f"{name} {_show(head_weights)} must hold {h} weights {per}{heads}")
    if w.shape[0] != rows:
        also = "give one list for all rows or one per row" if broadcast \
            else f"give exactly {rows} rows"
        raise ValueError(f"{name} has {w.shape[0]} rows {_show(head_weights)} for {rows_for} "
                         f"{rows}; {also}")
    if not torch.isfinite(w).all():
        raise ValueError(f"{name} {_show(head_weights)} must be finite")
    if (w < 0).any():
        raise ValueError(f"{name} {_show(head_weights)} must be non-negative")
    sums = w.sum(dim=1, keepdim=True)
    if (sums == 0).any():
        raise ValueError(f"{name} {_show(head_weights)}: a row is all zero; at least one "
                         "weight per row must be positive")
    return w / sums


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
    tokenizer = load_tokenizer(root, "policy")
    return Policy(model, tokenizer, head_tensor, objectives, root)
