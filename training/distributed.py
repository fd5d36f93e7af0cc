"""Model wrapping and collectives of the trainers under ``torchrun``.

The trainers join the process group of `mahalo_engine.distributed` and wrap their trainable module
in DDP, or FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per decoder layer plus the
root). Global-batch semantics do not depend on the world size: the trainers split each global
batch over ranks and normalise losses by global counts, and both wrappers average gradients over
ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mahalo_engine.distributed import DistInfo


def wrap_model(module: nn.Module, info: DistInfo, strategy: str = "ddp", *,
               mixed_precision: bool = False) -> nn.Module:
    """DDP or FSDP2 around ``module`` under torchrun; the module itself otherwise.

    FSDP2 shards each decoder layer and the root (embeddings, norm, heads) over ranks; with
    ``mixed_precision`` (CUDA) it computes in bf16 and reduces gradients in fp32. FSDP2 is meant
    for CUDA/NCCL; it also runs on CPU/gloo, which is how the tests check it.
    """
    if strategy not in ("ddp", "fsdp2"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp2', got {strategy!r}")
    if not info.distributed:
        return module
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(module, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if mixed_precision else MixedPrecisionPolicy())
    for layer in module.decoder.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(module, mp_policy=mp)
    return module


def unwrapped_name(name: str) -> str:
    """A parameter's name in the module the trainer built: DDP prefixes ``module.``; FSDP2 keeps
    names as they are."""
    return name.removeprefix("module.")


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on CPU for DDP, FSDP2 or a plain module. Complete on rank
    0 (the only rank that writes); under FSDP2 other ranks get an empty dict. Collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))


def load_full_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
