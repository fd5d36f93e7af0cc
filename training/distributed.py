"""Process-group set-up and model wrapping for ``torchrun`` launches.

Launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment), the trainers join a
process group (gloo on CPU, NCCL on CUDA) and wrap their trainable module in DDP, or FSDP2
(``torch.distributed.fsdp.fully_shard``, one unit per decoder layer plus the root); under
torchrun this holds for one process too, so ``--nproc_per_node 1`` exercises the same path.
Without those variables they run as one process. Global-batch semantics do not depend on the
world size: the trainers split each global batch over ranks and normalise losses by global
counts, and both wrappers average gradients over ranks. The inference CLIs (``training.sharded``)
use the same set-up plus two object collectives: ``broadcast_from_main`` and ``gather_to_main``.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool = False  # launched by torchrun: a process group exists (even of size 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the torchrun process group if launched by torchrun; pick this rank's device.

    ``device``: "cpu" or "cuda" (default: cuda when available). Under torchrun on CUDA, rank r
    uses ``cuda:LOCAL_RANK``.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    launched = launched_by_torchrun()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda" and local >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ValueError(f"LOCAL_RANK={local} but only {n} CUDA device(s) are visible on this "
                         f"node: start at most {n} processes per node (torchrun --nproc_per_node "
                         f"{n}) or check CUDA_VISIBLE_DEVICES")
    dev = torch.device(f"cuda:{local}") if kind == "cuda" else torch.device("cpu")
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if launched and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if kind == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return DistInfo(rank, world, local, dev, launched)


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


# A round of the inference CLIs waits for its slowest rank's work unit (minutes, possibly more);
# a rank that dies is caught by torchrun, which stops the others, so the wait may be long.
_OBJECT_TIMEOUT = datetime.timedelta(hours=12)
_object_groups: list[dist.ProcessGroup] = []  # at most one, dropped by `cleanup`


def _object_group(info: DistInfo) -> dist.ProcessGroup:
    """A gloo group for pickled objects (results to gather): host memory, reachable on any
    backend's nodes, and a timeout long enough for a round of inference. Created once, by every
    rank at its first object collective."""
    if not _object_groups:
        _object_groups.append(dist.new_group(backend="gloo", timeout=_OBJECT_TIMEOUT))
    return _object_groups[0]


def broadcast_from_main(obj: Any, info: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group). Collective."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_object_group(info))
    return box[0]


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, None on the others (``[obj]`` without a
    process group). Collective."""
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, out, dst=0, group=_object_group(info))
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    _object_groups.clear()
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
