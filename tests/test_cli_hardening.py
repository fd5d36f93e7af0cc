"""What a new user hits on the command lines: one-line errors with exit code 2 (--debug shows the
traceback), CLI-worded messages, defaults in --help, the --device check, corrupt files named,
Ctrl-C in trainers and label builders, search --out rows keeping the input's fields, the
install script's progress, the README's scratch folder and citations that stay in the repo.

CLI behaviour is checked through subprocesses (exit code and stderr as a user sees them); the
errors are all raised before a model is loaded, so each run costs an interpreter start."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mahalo_engine.tiny import tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "MAHALO_DEBUG"}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit code 2, no traceback, and the last stderr line is ``error: ...`` matching pattern."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-2000:]
    assert re.search(pattern, last), last
    return last


# -- items 2, 6, 7: the engine CLI ------------------------------------------------------------------

def test_engine_cli_errors_are_one_line_and_speak_cli():
    model = str(tiny_checkpoint("qwen2"))
    base = ["mahalo_engine", "search", "--model", model, "--prompt", "hi", "--device", "cpu"]
    _one_line_error(_cli(*base, "-k", "3"), r"-k 3 needs a PRM .*pass --prm DIR")
    last = _one_line_error(_cli(*base, "-k", "1", "--boundary", "maths"),
                           r"--boundary 'maths'.*math, paragraph, sentence, turn")
    assert "--boundary literal:maths" in last
    _one_line_error(_cli(*base, "-k", "1", "--stop", ""), r"--stop: the stop string is empty")
    # 0 is not silently replaced by the default (it used to become 256 / 4096)
    _one_line_error(_cli("mahalo_engine", "generate", "--model", model, "--prompt", "hi",
                         "--max-new-tokens", "0"), r"--max-new-tokens must be >= 1, got 0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only torch")
def test_device_cuda_without_cuda_and_bench_missing_model():
    model = str(tiny_checkpoint("qwen2"))
    _one_line_error(_cli("mahalo_engine", "generate", "--model", model, "--prompt", "hi",
                         "--device", "cuda"), r"--device cuda: .*without CUDA|no CUDA device")
    _one_line_error(_cli("bench", "--model", "/no/such/dir", "--sections", "kv"),
                    r"no such model directory: /no/such/dir")


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    args = ["mahalo_engine", "generate", "--model", str(tiny_checkpoint("qwen2")), "--prompts",
            str(bad), "--device", "cpu"]
    _one_line_error(_cli(*args), r"bad\.jsonl:2: not valid JSON")
    for proc in (_cli(*args, "--debug"), _cli(*args, env={"MAHALO_DEBUG": "1"})):
        assert proc.returncode != 0 and "Traceback" in proc.stderr
        assert "bad.jsonl:2: not valid JSON" in proc.stderr


# -- items 3, 4: trainers -----------------------------------------------------------------------------

def test_trainer_user_errors_are_one_line(tmp_path):
    model = str(tiny_checkpoint("qwen2"))
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "q"}) + "\n")  # no completion
    _one_line_error(_cli("training.sft", "--model", model, "--data", str(sft), "--out",
                         str(tmp_path / "o")), r"sft\.jsonl:1.*completion")
    pairs = tmp_path / "a.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "x", "rejected": "y"}) + "\n")
    _one_line_error(_cli("training.mah_dpo", "--model", model, "--data", f"acc={pairs}", "--data",
                         f"acc={pairs}", "--out", str(tmp_path / "o2")),
                    r"objective 'acc' is named twice")
    _one_line_error(_cli("training.labels", "mc", "--rollouts", str(tmp_path / "none.jsonl"),
                         "--out", str(tmp_path / "mc.jsonl")), r"none\.jsonl")


# -- item 1: Ctrl-C in a trainer, resume, overwrite --------------------------------------------------

def _sft_data(tmp_path: Path) -> Path:
    rows = [{"prompt": f"Question: {i} + {i} =", "completion": f" {2 * i}."} for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_sigint_finishes_the_step_saves_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = ["training.sft", "--model", str(tiny_checkpoint("qwen2")), "--data", str(_sft_data(tmp_path)),
            "--out", str(out), "--batch-size", "4", "--lr", "1e-3", "--device", "cpu"]
    env = {k: v for k, v in os.environ.items() if k != "MAHALO_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", *args, "--max-steps", "100000"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "log.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    match = re.fullmatch(r"interrupted at step (\d+); resume with --resume", err.strip().splitlines()[-1])
    assert match, err[-2000:]
    step = int(match.group(1))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step}"
    # the same command refuses the used --out; --resume continues from the checkpoint
    _one_line_error(_cli(*args, "--max-steps", str(step + 1)), r"already holds a training run.*--overwrite")
    done = _cli(*args, "--max-steps", str(step + 1), "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, step + 2))
    assert (out / "model.safetensors").is_file()


def test_a_run_with_a_log_but_no_checkpoint_resumes_from_zero_or_is_overwritten(tmp_path):
    from training import sft

    out = tmp_path / "run"
    out.mkdir()
    (out / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    args = ["--model", str(tiny_checkpoint("qwen2")), "--data", str(_sft_data(tmp_path)), "--out",
            str(out), "--batch-size", "4", "--max-steps", "1"]
    assert sft.main(args + ["--resume"]) == 0
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and record["loss"] != 9.0  # the stale record was dropped
    assert sft.main(args) == 2  # refused: it holds a run now
    assert sft.main(args + ["--overwrite"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-1"
    assert sft.main(args + ["--resume", "--overwrite"]) == 2


# -- item 1: label builders append per trajectory and resume --------------------------------------

def test_labels_keep_finished_trajectories_on_interrupt_and_resume(tmp_path, monkeypatch, capsys):
    from training.labels import main

    (tmp_path / "judges.py").write_text(
        "import os\n"
        "def judge(prompt, steps):\n"
        "    with open('calls.txt', 'a') as f:\n"
        "        f.write(prompt + '\\n')\n"
        "    if prompt == 'q2' and os.environ.get('STOP_AT_Q2'):\n"
        "        raise KeyboardInterrupt\n"
        "    return float(len(steps))\n")
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "traj.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "steps": ["a", "b"]}) + "\n"
                            for i in range(4)))
    out = tmp_path / "labels.jsonl"
    args = ["judge-prefix", "--data", str(data), "--judge", "judges:judge", "--out", str(out)]
    monkeypatch.setenv("STOP_AT_Q2", "1")
    try:
        code = main(args)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped training.labels instead of ending it with exit code 130")
    assert code == 130
    assert "interrupted after 2 of 4 trajectories" in capsys.readouterr().err
    assert [json.loads(line)["prompt"] for line in out.read_text().splitlines()] == ["q0", "q1"]
    with open(out, "a") as f:
        f.write('{"prompt": "q2", "compl')  # a torn write is dropped on resume
    monkeypatch.delenv("STOP_AT_Q2")
    assert main(args) == 2  # a fresh run refuses the existing output
    (tmp_path / "calls.txt").unlink()
    assert main(args + ["--resume"]) == 0
    assert (tmp_path / "calls.txt").read_text().split() == ["q2", "q2", "q3", "q3"]  # 2 prefixes each
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert all(r["labels"] == [1.0, 2.0] for r in rows)
    assert main(args + ["--overwrite"]) == 0 and len(out.read_text().splitlines()) == 4


# -- item 5: corrupt files are named ----------------------------------------------------------------

def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_are_named(tmp_path):
    from mahalo_engine.heads import save_heads
    from mahalo_engine.policy import load_policy
    from mahalo_engine.value_model import ValueHead, load_prm, save_prm
    from mahalo_engine.models.loader import load_decoder

    src = tiny_checkpoint("qwen2")
    broken = _copy_model(src, tmp_path / "model")
    _truncate(broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is corrupt or truncated"):
        load_policy(broken)
    _one_line_error(_cli("mahalo_engine", "generate", "--model", str(broken), "--prompt", "hi",
                         "--device", "cpu"), r"model/model\.safetensors is corrupt or truncated")

    heads_dir = _copy_model(src, tmp_path / "heads")
    w = load_decoder(src).lm_head.weight.detach()
    save_heads(heads_dir, torch.stack([w, w]), ["a", "b"])
    _truncate(heads_dir / "mahalo_heads.safetensors")
    with pytest.raises(ValueError, match=r"mahalo_heads\.safetensors is corrupt or truncated"):
        load_policy(heads_dir)

    backbone = load_decoder(src)
    from transformers import AutoTokenizer

    save_prm(tmp_path / "prm", backbone, ValueHead(backbone.config.hidden_size), "value",
             AutoTokenizer.from_pretrained(src))
    (tmp_path / "prm" / "value_head.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match=r"value_head\.safetensors is corrupt or truncated"):
        load_prm(tmp_path / "prm")


# -- item 8: --help shows defaults ------------------------------------------------------------------

@pytest.mark.parametrize("argv,options", [
    (["mahalo_engine", "search"], ["-k", "--max-steps", "--max-step-tokens", "--temperature",
                                   "--max-seq-len", "--max-batch", "--top-k", "--seed",
                                   "--check-every", "--selection-temperature"]),
    (["mahalo_engine", "generate"], ["--temperature", "--max-batch", "--top-k", "--max-new-tokens"]),
    (["training.mah_dpo"], ["--max-steps", "--lr", "--beta", "--alpha", "--truncate",
                            "--max-length", "--save-every", "--batch-size"]),
    (["training.prm"], ["--mse-reduction", "--loss", "--max-steps", "--lr"]),
    (["training.labels", "rollouts"], ["--temperature", "--top-k", "--seed", "--max-new-tokens", "--m"]),
    (["bench"], ["--sections", "--device"]),
])
def test_help_shows_every_default(argv, options, capsys):
    import importlib

    module = importlib.import_module(argv[0] if argv[0].startswith("training.")
                                     else f"{argv[0]}.__main__")
    with pytest.raises(SystemExit) as e:
        module.main(argv[1:] + ["--help"])
    assert e.value.code == 0
    entries: list[str] = []  # one entry per option: its header line and help lines
    for line in capsys.readouterr().out.splitlines():
        if re.match(r"^  -", line):
            entries.append(line)
        elif entries and line.startswith("    "):
            entries[-1] += " " + line.strip()
    for opt in options:
        (entry,) = [e for e in entries if re.match(rf"^  (?:-\S+ \S+, )?{re.escape(opt)}[ ,]", e)]
        assert "default" in entry, entry


# -- item 9: max_seq_len vs the model's positions ----------------------------------------------------

def test_max_seq_len_defaults_from_the_model_and_warns_past_it(caplog):
    from mahalo_engine.engine import Engine
    from mahalo_engine.policy import load_policy

    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    assert policy.config.max_position_embeddings == 4096
    assert Engine(policy).max_seq_len == 4096
    policy.config.max_position_embeddings = 300  # a short-context model
    assert Engine(policy).max_seq_len == 300
    with caplog.at_level("WARNING", logger="mahalo_engine.engine"):
        assert Engine(policy, max_seq_len=8192).max_seq_len == 8192
    warnings = [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
    assert len(warnings) == 1 and "8192" in warnings[0].getMessage()


# -- item 10: search --out keeps the input's fields -------------------------------------------------

def test_out_rows_keep_the_input_rows_fields(tmp_path):
    from mahalo_engine.__main__ import main

    prompts = tmp_path / "in.jsonl"
    prompts.write_text(json.dumps({"id": "a-1", "prompt": "The quick", "meta": {"src": "x"}}) + "\n"
                       + json.dumps({"id": 7, "messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    for cmd, extra in (("search", ["-k", "1", "--max-steps", "1", "--max-step-tokens", "3"]),
                       ("generate", ["--max-new-tokens", "3"])):
        out = tmp_path / f"{cmd}.jsonl"
        assert main([cmd, "--model", str(tiny_checkpoint("qwen2")), "--prompts", str(prompts),
                     "--device", "cpu", "--max-seq-len", "64", "--out", str(out), *extra]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["id"] for r in rows] == ["a-1", 7]
        assert rows[0]["meta"] == {"src": "x"} and rows[0]["prompt"] == "The quick"
        assert rows[1]["messages"] == [{"role": "user", "content": "Hi"}]
        assert all(len(r["token_ids"]) >= 1 and "finish_reason" in r for r in rows)


# -- item 15: EOS ids from generation_config.json ----------------------------------------------------

def test_every_eos_id_of_generation_config_stops_generation(tmp_path):
    from mahalo_engine.model_config import ModelConfig
    from mahalo_engine.engine import Engine
    from mahalo_engine.policy import load_policy

    src = tiny_checkpoint("qwen2")
    first = Engine(load_policy(src, dtype=torch.float32), max_seq_len=64).generate(
        ["The quick"], temperature=0, max_new_tokens=4)[0].token_ids[0]
    model = _copy_model(src, tmp_path / "m")
    config_eos = json.loads((src / "config.json").read_text())["eos_token_id"]
    gen = json.loads((model / "generation_config.json").read_text())
    gen["eos_token_id"] = [config_eos, 5, first]  # a list, as Llama-3 instruct ships it
    (model / "generation_config.json").write_text(json.dumps(gen))
    assert ModelConfig.from_pretrained(model).eos_token_ids == sorted({config_eos, 5, first})
    out = Engine(load_policy(model, dtype=torch.float32), max_seq_len=64).generate(
        ["The quick"], temperature=0, max_new_tokens=4)[0]
    assert out.token_ids == [first] and out.finish_reason == "eos"


# -- item 11: the bench's search workload and labels ------------------------------------------------

def test_bench_search_covers_long_prompts_and_names_the_model():
    from bench.common import BenchContext
    from bench.common import model_label
    from bench.search import _workloads

    for device, quick in (("cpu", True), ("cpu", False)):
        cases = _workloads(BenchContext(device=torch.device(device), quick=quick))
        assert cases[0][0] >= 512 and min(n for n, _ in cases) <= 64  # long main case + short one
    assert model_label(tiny_checkpoint("qwen2")) == "tiny-qwen2 (random init)"
    assert model_label(Path("/models/Qwen2.5-0.5B-Instruct")) == "Qwen2.5-0.5B-Instruct"


# -- item 12: install.sh says what it does ----------------------------------------------------------

def test_install_script_prints_one_line_per_stage(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
                    "case \"$*\" in *print*) echo 9.9;; esac\nexit 0\n")
    fake.chmod(0o755)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh")], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": str(fake)}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    stages = [line for line in proc.stderr.splitlines() if line.startswith("[install]")]
    assert [s.split()[1] for s in stages[:4]] == ["1/4", "2/4", "3/4", "4/4"]
    assert stages[-1].endswith("done") and "Triton 3.6" in stages[3]
    assert "-m pip install -q --no-build-isolation -e .[dev]" in (tmp_path / "calls").read_text()


# -- items 13, 14: the README's scratch folder, citations inside the repo ---------------------------

def test_readme_training_block_writes_under_an_ignored_folder():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Training"):]
    block = block[block.index("```bash"):]
    block = block[:block.index("```", 7)]
    assert "mkdir -p runs/readme && cd runs/readme" in block
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    if shutil.which("git") and (ROOT / ".git").exists():
        proc = subprocess.run(["git", "check-ignore", "-q", "runs/readme/sft.jsonl"], cwd=ROOT)
        assert proc.returncode == 0


def test_no_file_points_outside_the_repository():
    if not (shutil.which("git") and (ROOT / ".git").exists()):
        pytest.skip("needs a git checkout")
    pattern = "[.][.]/shared|shared" + "/research|DESIGN[.]md"
    proc = subprocess.run(["git", "grep", "-n", "-E", pattern], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 1 and proc.stdout == "", proc.stdout
    design = (ROOT / "docs" / "design.md").read_text()
    for section in ("## Layout", "## Public API", "## File formats", "## Device dispatch",
                    "When pre-merging heads is exact"):
        assert section in design
