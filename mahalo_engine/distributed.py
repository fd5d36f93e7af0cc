"""Process groups under ``torchrun``, for the trainers and the data-parallel sampling CLIs.

Launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the environment), a process joins a
process group (gloo on CPU, NCCL on CUDA) and uses ``cuda:LOCAL_RANK``; under torchrun this holds
for one process too, so ``--nproc_per_node 1`` exercises the same path. Without those variables
it runs as one process. The sampling CLIs (`mahalo_engine.sharded`) add two object collectives,
``broadcast_from_main`` and ``gather_to_main``; the trainers' model wrapping (DDP/FSDP2) is
``training.distributed``.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist


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


_left_group: list[bool] = []  # set by `cleanup` once this process has left its process group


def cleanup(info: DistInfo) -> None:
    """Leave the process group (a no-op without one). Collective in effect: call it on every rank
    after a last `barrier`. A CLI that joined a group ends its process with `exit_process`."""
    _object_groups.clear()
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
        # destroy_process_group shuts the backends down, but a gloo group's worker threads stop
        # only when the group object is freed; one held by a reference cycle (DDP's reducer) is
        # freed here, while the interpreter is whole.
        gc.collect()
        _left_group.append(True)


def exit_process(code: int | None) -> NoReturn:
    """End a CLI process with exit code ``code`` (None: 0). After `cleanup` left a process group,
    the interpreter's teardown is skipped (``os._exit``, after flushing logging, stdout and
    stderr): torch's DTensor caches keep FSDP2's device meshes, and with them the gloo group,
    alive to the end, and a gloo group freed during interpreter finalisation can abort the
    process (SIGABRT, "terminate called without an active exception") after a run that
    succeeded. Everything a CLI writes is closed by then (atomic files, ``with`` blocks)."""
    code = int(code or 0)
    if not _left_group:
        sys.exit(code)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
