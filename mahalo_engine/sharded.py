"""Data-parallel inference under ``torchrun``: ordered work units sharded over ranks, results
written by rank 0 in input order, resumable.

The sampling CLIs (``python -m training.labels rollouts|judge-votes|judge-prefix``,
``python -m mahalo_engine search|generate``) cut their input into work units (one trajectory; one
chunk of prompts) whose result depends on the unit alone: its sampling seed is the run's seed plus
the unit's index, never the rank, and a chunk is always the same engine call. Unit ``u`` runs on
rank ``u mod world_size``; units run in rounds of ``per_rank × world_size``, after each of which
rank 0 gathers the round's results (over gloo: no shared file system is needed between nodes) and
appends them to the output in unit order. So N processes write the same file as one process, and
the output is always a prefix of it: an interrupted run keeps whole rounds, and a rerun with
``--resume`` continues after them (`prepare_output`).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from mahalo_engine.distributed import (DistInfo, broadcast_from_main, gather_to_main,
                                       init_distributed, launched_by_torchrun)
from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.cli import USER_ERRORS, resolve_device

T = TypeVar("T")
log = logging.getLogger(__name__)


def setup(device: str | None) -> DistInfo:
    """This process's place for a sampling CLI's ``--device``: under torchrun, its rank of the
    process group (`init_distributed`: ``cuda:LOCAL_RANK``, or the CPU with gloo), with logging
    quiet on ranks other than 0; otherwise one process on ``device``."""
    dev = resolve_device(device)
    if not launched_by_torchrun():
        return DistInfo(0, 1, 0, dev, False)
    if dev.index is not None:
        raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass "
                         f"--device cuda")
    info = init_distributed(dev.type)
    if not info.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    return info


def on_main(fn: Callable[[], T], info: DistInfo) -> T:
    """``fn()`` run on rank 0; its result on every rank. A user error there (e.g. an output that
    cannot be resumed) is raised on every rank, so that all of them stop with its message."""
    if not info.distributed:
        return fn()
    result, error = None, None
    if info.is_main:
        try:
            result = fn()
        except USER_ERRORS as e:
            error = e
    result, message = broadcast_from_main((result, None if error is None else str(error)), info)
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    return result


def run_sharded(units: int, work: Callable[[int], T], write: Callable[[int, T], None],
                info: DistInfo, *, start: int = 0, per_rank: int = 1) -> None:
    """``work(u)`` for every unit ``u`` in ``[start, units)``, unit u on rank ``u mod world``;
    rank 0 calls ``write(u, result)`` in order of u after each round of ``per_rank × world``
    units. Ranks without a unit in a round (more ranks than units left) wait for the round.

    Collective. A user error in a unit on any rank is raised on every rank (named with its rank)
    after that round, whose results are then not written.
    """
    if per_rank < 1:
        raise ValueError(f"per_rank must be >= 1, got {per_rank}")
    world, rank = info.world_size, info.rank
    step = per_rank * world
    for first in range(start, units, step):
        last = min(first + step, units)
        mine = [u for u in range(first, last) if u % world == rank]
        if not info.distributed:
            for u in mine:
                write(u, work(u))
            continue
        results, failure = {}, None
        try:
            for u in mine:
                results[u] = work(u)
        except USER_ERRORS as e:
            failure = f"rank {rank}: {' '.join(str(e).split())}"
        parts = gather_to_main((results, failure), info)
        if info.is_main:
            failure = next((f for _, f in parts if f is not None), None)
            if failure is None:
                merged = {u: r for part, _ in parts for u, r in part.items()}
                for u in range(first, last):
                    write(u, merged[u])
        failure = broadcast_from_main(failure, info)
        if failure is not None:
            raise ValueError(failure)


def prepare_output(path: Path, sizes: Sequence[int], is_first_row: Callable[[int, dict], bool],
                   *, resume: bool, overwrite: bool, item: str = "input", items: str = "inputs",
                   afresh: str = "--overwrite", align: int = 1) -> int:
    """Prepare the jsonl ``path`` for appending whole items (item i = ``sizes[i]`` rows, in input
    order); returns how many leading items it already holds in full.

    A fresh run refuses an existing file unless ``overwrite`` (then empties it). ``resume`` keeps
    the complete items, a multiple of ``align`` of them (a unit of several items is redone whole),
    drops the rest (such as a torn last line of an interrupted write) and checks that each kept
    item's first row is ``is_first_row(i, row)`` (else the file came from other data).
    ``item``/``items`` name an item in messages, ``afresh`` how to start over.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if not resume:
        if path.exists() and not overwrite:
            raise ValueError(f"--out {path} already exists; pass --resume to continue it (its "
                             f"finished {items} are kept) or --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, "")
        return 0
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
        if not line.endswith("\n"):
            rows.pop()  # torn last line
            break
    ends = [0]  # ends[i]: rows in the first i complete items
    for i, n in enumerate(sizes):
        if ends[-1] + n > len(rows):
            break
        if not is_first_row(i, rows[ends[-1]]):
            raise ValueError(f"--resume: {path} line {ends[-1] + 1} is not the first row of input "
                             f"{item} {i + 1} (it was written from other data or options); start "
                             f"afresh with {afresh} or choose another --out")
        ends.append(ends[-1] + n)
    done = (len(ends) - 1) // align * align
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(lines[:ends[done]]))
    if done:
        log.info("--resume: %s already holds %d of %d %s", path, done, len(sizes), items)
    return done


def append_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows appended and flushed to disk in one write (a crash tears at most the last line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())
