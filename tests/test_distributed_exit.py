"""`exit_process`: after leaving a process group, a CLI process ends without the interpreter's
teardown (where a gloo group that torch still holds can abort it), and loses nothing it printed
or logged; without a group it is a plain ``sys.exit``."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from torchrun import free_port, torchrun

# A CLI's shape: join the group (FSDP2 keeps it alive in torch's caches after it is destroyed),
# print without a newline, log, leave, exit. The atexit handler stands for the interpreter's
# teardown.
_SCRIPT = textwrap.dedent("""
    import atexit, logging, sys
    import torch
    from mahalo_engine.distributed import barrier, cleanup, exit_process, init_distributed

    logging.basicConfig(level=logging.INFO)
    atexit.register(lambda: print("TEARDOWN", flush=True))
    info = init_distributed("cpu")
    if info.distributed:
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(torch.nn.Linear(4, 4))
        model(torch.ones(2, 4)).sum().backward()
        barrier(info)
        cleanup(info)
    print(f"rank{info.rank} done", end="")
    logging.getLogger("probe").info("logged by rank %d", info.rank)
    exit_process(int(sys.argv[1]))
""")


def _plain_python(tmp_path: Path, code: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The script as one process, its stdout block-buffered into a pipe (torchrun's workers
    write through, so only here would an unflushed print be lost)."""
    (tmp_path / "probe_exit.py").write_text(_SCRIPT)
    base = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    return subprocess.run([sys.executable, "probe_exit.py", str(code)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={**base, "PYTHONPATH": str(Path(__file__).parents[1]),
                               "OMP_NUM_THREADS": "1", **env})


def test_two_ranks_that_left_their_group_skip_teardown_and_keep_their_output(tmp_path):
    (tmp_path / "probe_exit.py").write_text(_SCRIPT)
    proc = torchrun(2, "probe_exit", ["0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank0 done" in proc.stdout and "rank1 done" in proc.stdout
    assert "logged by rank 0" in proc.stderr and "logged by rank 1" in proc.stderr
    assert "TEARDOWN" not in proc.stdout


def test_a_buffered_process_that_left_its_group_flushes_before_it_exits(tmp_path):
    proc = _plain_python(tmp_path, 5, {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                                       "MASTER_ADDR": "127.0.0.1",
                                       "MASTER_PORT": str(free_port())})
    assert proc.returncode == 5, proc.stderr[-3000:]
    assert proc.stdout == "rank0 done"  # flushed, and no teardown ran
    assert "logged by rank 0" in proc.stderr


def test_without_a_group_it_is_sys_exit(tmp_path):
    proc = _plain_python(tmp_path, 3, {})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stdout == "rank0 doneTEARDOWN\n"
