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
``--resume`` continues after them (`prepare_output`; the writing itself is
`mahalo_engine.utils.outputs.JsonlOutput`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from mahalo_engine.distributed import (DistInfo, broadcast_from_main, gather_to_main,
                                       init_distributed, launched_by_torchrun)
from mahalo_engine.utils.cli import USER_ERRORS, resolve_device
from mahalo_engine.utils.outputs import (JsonlOutput, check_options, is_special, options_path,
                                         read_options, write_target)

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
                   afresh: str = "--overwrite", align: int = 1,
                   options: dict[str, Any] | None = None) -> JsonlOutput:
    """Check the jsonl ``path`` for appending whole items (item i = ``sizes[i]`` rows, in input
    order); returns its `JsonlOutput`, whose ``done`` says how many leading items it already holds
    in full. Nothing is written here: the file changes only when the first new rows arrive.

    A fresh run refuses an existing file unless ``overwrite`` (then replaced by the new rows).
    ``resume`` keeps the complete items, a multiple of ``align`` of them (a unit of several items
    is redone whole), drops the rest (such as a torn last line of an interrupted write) and checks
    that each kept item's first row is ``is_first_row(i, row)`` (else the file came from other
    data). ``options`` (the result-shaping options) are stored beside the file
    (``<path>.meta.json``); a resume with other options is refused, naming old and new values.
    ``item``/``items`` name an item in messages, ``afresh`` how to start over.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    target = write_target(path)
    if not resume or is_special(target):
        if not overwrite and target.is_file() and target.stat().st_size > 0:
            raise ValueError(f"--out {path} already exists; pass --resume to continue it (its "
                             f"finished {items} are kept) or {afresh} to replace it")
        return JsonlOutput(path, options=options)
    data = target.read_bytes() if target.is_file() else b""
    lines = data.splitlines(keepends=True)
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.endswith(b"\n"):
            break  # torn last line
        try:
            rows.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
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
    if rows and options is not None:
        saved = read_options(path)
        if saved is None:
            raise ValueError(f"--resume: {path} has no record of the options it was made with "
                             f"({options_path(path)} is missing), so a resume could mix results "
                             f"of other settings; start afresh with {afresh}")
        check_options(path, saved, options)
    done = (len(ends) - 1) // align * align
    if done:
        log.info("--resume: %s already holds %d of %d %s", path, done, len(sizes), items)
    keep = sum(len(line) for line in lines[:ends[done]])
    return JsonlOutput(path, done=done, keep_bytes=keep, options=options)
