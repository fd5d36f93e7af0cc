"""Data-parallel sampling CLIs (`mahalo_engine.sharded`): 2 gloo processes under torchrun write the
same file as 1 process, byte for byte; an interrupted output resumes to the same file; each chunk
(search) or trajectory (labels) is the Python call with seed --seed + its index."""
import json

import pytest
import torch

from mahalo_engine.distributed import DistInfo
from mahalo_engine.tiny import tiny_checkpoint
from tiny_prm import save_tiny_prm
from torchrun import torchrun

COMMON = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "64", "--max-batch", "2"]


@pytest.fixture(autouse=True)
def cpu_sampling_path(monkeypatch):
    """Sample on the engine's CPU path (`triton_kernels.multihead.cpu`), as CPU users run it, here and in the
    torchrun processes: Triton's interpreter would take about a second per sampled token. The
    kernels' agreement with that path is tested in their own files."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


PROMPTS = ["Question: How many clips", "The quick brown", "Once upon", "Question: How many clips",
           "Hello there"]


@pytest.fixture(scope="module")
def search_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    save_tiny_prm(tmp / "prm", tiny_checkpoint("qwen2", seed=1))
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    argv = ["search", "--model", tiny_checkpoint("qwen2"), "--prm", tmp / "prm", "--prompts",
            prompts, "-k", "2", "--boundary", " ", "--max-steps", "2", "--max-step-tokens", "3",
            "--check-every", "2", "--seed", "5", "--chunk-size", "2", *COMMON]
    return tmp, [str(a) for a in argv]


def _main_one_thread(main, argv):
    """The CLI in this process with one thread, as each torchrun process runs (CPU matmuls may
    round differently with another thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def test_search_two_processes_write_what_one_writes(search_setup):
    from mahalo_engine.__main__ import main
    from mahalo_engine.engine import Engine, SearchConfig
    from mahalo_engine.policy import load_policy
    from mahalo_engine.value_model import load_prm

    tmp, argv = search_setup
    one, two = tmp / "one.jsonl", tmp / "two.jsonl"
    assert _main_one_thread(main, argv + ["--out", str(one)]) == 0
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(PROMPTS)))

    # Reference: chunk c (2 prompts) is one Python search call with seed 5 + c.
    engine = Engine(load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32),
                    prm=load_prm(tmp / "prm", dtype=torch.float32), max_batch=2, max_seq_len=64,
                    cuda_graphs=False)
    ref = []
    for c in range(3):
        cfg = SearchConfig(candidates=2, boundary=" ", max_steps=2, max_step_tokens=3,
                           check_every=2, seed=5 + c)
        ref += engine.search(PROMPTS[2 * c:2 * c + 2], config=cfg)
    assert [r["token_ids"] for r in rows] == [r.token_ids for r in ref]
    # (this process's thread count differs from the CLI run's: scores round differently)
    for r, x in zip(rows, ref):
        assert [s["score"] for s in r["steps"]] == pytest.approx([s.score for s in x.steps],
                                                                 rel=1e-5)
    # The same prompt in chunks 0 and 1 is sampled with other seeds.
    assert rows[0]["token_ids"] != rows[3]["token_ids"]

    # 3 chunks on 2 ranks: rank 0 runs chunks 0 and 2, rank 1 chunk 1 and idles in round 2.
    proc = torchrun(2, "mahalo_engine", argv[:] + ["--out", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert proc.stderr.count("results written to") == 1  # rank 0 alone reports


def test_search_resume_keeps_whole_chunks(search_setup, capsys):
    from mahalo_engine.__main__ import main

    tmp, argv = search_setup
    full, part = tmp / "full.jsonl", tmp / "part.jsonl"
    assert _main_one_thread(main, argv + ["--out", str(full)]) == 0
    lines = full.read_text().splitlines(keepends=True)
    # 3 finished prompts (chunk 0 and half of chunk 1) and a torn write: chunk 1 is redone whole
    part.write_text("".join(lines[:3]) + lines[3][:20])
    assert _main_one_thread(main, argv + ["--out", str(part), "--resume"]) == 0
    assert part.read_bytes() == full.read_bytes()
    # a file from other prompts is refused, named by line
    other = tmp / "other.jsonl"
    other.write_text(json.dumps({"id": 0, "prompt": "something else", "text": ""}) + "\n")
    assert main(argv + ["--out", str(other), "--resume"]) == 2
    assert "line 1 is not the first row of input prompt 1" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 2
    assert "--resume continues an --out file" in capsys.readouterr().err


def test_labels_rollouts_resume_on_two_processes_equals_one_process(tmp_path, monkeypatch):
    from mahalo_engine.policy import load_policy
    from training.labels import load_callable, main, trajectory_rollouts

    (tmp_path / "sharded_rules.py").write_text(
        "def verifier(prompt, steps):\n    return float(len(''.join(steps)) % 2)\n")
    monkeypatch.chdir(tmp_path)
    trajs = [{"prompt": f"Question: {i} + 2 = ?", "steps": ["We add.\n\n", f"It is {i + 2}."]}
             for i in range(4)]
    trajs[1] = trajs[0]  # the same trajectory twice: sampled with other seeds
    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps(t) + "\n" for t in trajs))
    policy = tiny_checkpoint("qwen2")
    argv = ["rollouts", "--policy", policy, "--data", data, "--rollouts-per-prefix", "2",
            "--max-new-tokens", "6",
            "--seed", "7", "--verifier", "sharded_rules:verifier"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert _main_one_thread(main, [str(a) for a in argv] + ["--out", str(one)]) == 0
    rows = [json.loads(line) for line in one.read_text().splitlines()]
    assert len(rows) == 4 * (1 + 2)

    # Reference: trajectory i is the Python call with seed 7 + i.
    p = load_policy(policy)
    verifier = load_callable("sharded_rules:verifier")
    sampling = dict(boundary="\n\n", max_new_tokens=6, temperature=1.0, top_k=0,
                    chat_template=False)
    ref = [r for i, t in enumerate(trajs)
           for r in trajectory_rollouts(p, t, verifier, 2, seed=7 + i, **sampling)]
    assert rows == ref
    assert rows[1:3] != rows[4:6]  # trajectories 0 and 1 are equal; their rollouts are not

    # Interrupted after one trajectory, mid-write; the rest resumes on 2 ranks (3 trajectories:
    # rank 1 runs trajectory 1 only).
    lines = one.read_text().splitlines(keepends=True)
    two.write_text("".join(lines[:3]) + lines[3][:10])
    proc = torchrun(2, "training.labels", argv + ["--out", two, "--resume"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()
    assert proc.stderr.count("already holds 1 of 4 trajectories") == 1  # logged by rank 0 only


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank: the collectives' code paths, in this process."""
    import torch.distributed as dist

    from mahalo_engine.distributed import cleanup

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0,
                            world_size=1)
    info = DistInfo(0, 1, 0, torch.device("cpu"), distributed=True)
    yield info
    cleanup(info)


def test_run_sharded_writes_in_order_and_raises_a_units_error_everywhere(one_rank_group):
    from mahalo_engine.sharded import on_main, run_sharded

    info = one_rank_group
    written = []
    run_sharded(5, lambda u: u * u, lambda u, r: written.append((u, r)), info, start=1,
                per_rank=2)
    assert written == [(1, 1), (2, 4), (3, 9), (4, 16)]

    def work(u):
        if u == 3:
            raise ValueError("bad unit")
        return u

    written.clear()
    with pytest.raises(ValueError, match="rank 0: bad unit"):
        run_sharded(6, work, lambda u, r: written.append(u), info, per_rank=2)
    assert written == [0, 1]  # the failed round [2, 3] is not written
    assert on_main(lambda: 42, info) == 42
    with pytest.raises(ValueError, match="no such"):
        on_main(lambda: (_ for _ in ()).throw(ValueError("no such file")), info)


def test_prepare_output_keeps_whole_aligned_items(tmp_path):
    from mahalo_engine.sharded import prepare_output

    out = tmp_path / "o.jsonl"
    rows = [{"i": i // 2} for i in range(10)]  # 5 items of 2 rows
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:7]) + '{"i": 3')
    is_first = lambda i, row: row["i"] == i  # noqa: E731
    # 3 complete items; aligned to 2: the 2 first are kept, item 2 is redone
    assert prepare_output(out, [2] * 5, is_first, resume=True, overwrite=False, align=2) == 2
    assert out.read_text() == "".join(json.dumps(r) + "\n" for r in rows[:4])
    with pytest.raises(ValueError, match="already exists.*--resume"):
        prepare_output(out, [2] * 5, is_first, resume=False, overwrite=False)
    with pytest.raises(ValueError, match="line 3 is not the first row of input input 2"):
        prepare_output(out, [2] * 5, lambda i, row: i == 0, resume=True, overwrite=False)
    assert prepare_output(out, [2] * 5, is_first, resume=False, overwrite=True) == 0
    assert out.read_text() == ""


def test_local_rank_beyond_the_visible_gpus_is_an_error(monkeypatch):
    from mahalo_engine.distributed import init_distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"LOCAL_RANK=3 but only 2 CUDA device\(s\).*"
                                         r"--nproc_per_node 2"):
        init_distributed("cuda")


def test_device_index_under_torchrun_is_an_error(monkeypatch):
    from mahalo_engine.sharded import setup

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("mahalo_engine.sharded.resolve_device", lambda name: torch.device(name))
    with pytest.raises(ValueError, match="each rank uses cuda:LOCAL_RANK; pass --device cuda"):
        setup("cuda:1")
