"""Nothing lost, nothing clobbered (issue 23): outputs written safely (special files and symlinks
in place, umask modes), an existing output intact after every early error, inputs never
overwritten, one run per output (lock), resume refused on changed result-shaping options, bad
models and numbers refused early, and the small input rules (BOM, non-UTF-8, booleans, ...).

The CLIs run in-process (``main(argv)`` returns the exit code and prints the one-line error), so
each run costs no interpreter start; the tiny model keeps the engine runs to a second or two."""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mahalo_engine.__main__ import main as engine_main
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.utils.atomic_files import atomic_write_text
from mahalo_engine.utils.outputs import JsonlOutput, OutputLock, lock_path, read_text_lines

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "64", "--max-batch", "2",
          "--max-new-tokens", "3"]


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _error(capsys, code: int, pattern: str) -> str:
    """Exit code 2 and the last stderr line ``error: ...`` matching ``pattern``."""
    import re

    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and re.search(pattern, last), last
    return last


@pytest.fixture(scope="module")
def model():
    return str(tiny_checkpoint("qwen2"))


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"id": i, "prompt": f"Question {i}:"}) + "\n"
                         for i in range(3)))
    return p


# -- item 1: special files, symlinks, modes ---------------------------------------------------------

def test_char_device_and_symlink_outputs_are_written_in_place(tmp_path, model, prompts, capsys):
    if os.geteuid() != 0:
        pytest.skip("mknod of a character device needs root")
    node = tmp_path / "null"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a private /dev/null
    assert engine_main(["generate", "--model", model, "--prompts", str(prompts), "--out",
                        str(node), *COMMON]) == 0
    assert stat.S_ISCHR(node.lstat().st_mode)  # not replaced by a regular file
    assert not any(p.name.startswith(".null") or p.name == "null.lock" for p in tmp_path.iterdir())

    target, link = tmp_path / "real.jsonl", tmp_path / "link.jsonl"
    target.write_text("")
    link.symlink_to(target)
    assert engine_main(["generate", "--model", model, "--prompts", str(prompts), "--out",
                        str(link), *COMMON]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert [json.loads(x)["id"] for x in target.read_text().splitlines()] == [0, 1, 2]


def test_single_file_writes_keep_links_devices_and_modes(tmp_path):
    if os.geteuid() == 0:
        node = tmp_path / "null"
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        atomic_write_text(node, "x")
        assert stat.S_ISCHR(node.lstat().st_mode)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    atomic_write_text(fifo, "through the pipe\n")
    assert reader.communicate(timeout=30)[0] == "through the pipe\n"
    assert stat.S_ISFIFO(fifo.lstat().st_mode)

    new = tmp_path / "new.txt"
    atomic_write_text(new, "a")
    assert stat.S_IMODE(new.stat().st_mode) == _umask_mode()  # not mkstemp's 0600
    new.chmod(0o640)
    atomic_write_text(new, "b")
    assert stat.S_IMODE(new.stat().st_mode) == 0o640 and new.read_text() == "b"
    link = tmp_path / "link"
    link.symlink_to(new)
    atomic_write_text(link, "c")
    assert link.is_symlink() and new.read_text() == "c"


# -- item 2: an early error leaves an existing output as it was -------------------------------------

def test_existing_output_is_intact_after_each_early_error(tmp_path, model, prompts, capsys):
    out = tmp_path / "out.jsonl"
    old = '{"id": "precious"}\n'
    out.write_text(old)
    gen = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out), *COMMON]
    cases = [
        (gen + ["--weights", "0.5,0.5"], r"must hold 1 weights per row"),  # after the model loads
        (gen + ["--top-k", "-1"], r"--top-k must be >= 0"),
        (gen + ["--max-seq-len", "2"], r"prompt 0 \(.*prompts\.jsonl:1\) has \d+ tokens"),
        (["search", "--model", model, "--prompt", "hi", "--out", str(out), "-k", "0", *COMMON],
         r"-k must be >= 1, got 0"),
    ]
    empty = tmp_path / "empty-prompt.jsonl"
    empty.write_text(json.dumps({"prompt": ""}) + "\n")
    cases.append((["generate", "--model", model, "--prompts", str(empty), "--out", str(out),
                   *COMMON], r"prompt 0 .* is empty"))
    for argv, pattern in cases:
        _error(capsys, engine_main(argv), pattern)
        assert out.read_text() == old, argv
        assert not lock_path(out).exists()  # released after the error


# -- items 3, 4: the output is one of the inputs ----------------------------------------------------

def test_out_that_is_an_input_is_refused(tmp_path, model, prompts, capsys):
    before = prompts.read_text()
    _error(capsys, engine_main(["generate", "--model", model, "--prompts", str(prompts), "--out",
                                str(prompts), *COMMON]),
           r"--out .*prompts\.jsonl is the same file as --prompts")
    assert prompts.read_text() == before
    link = tmp_path / "alias.jsonl"
    link.symlink_to(prompts)
    _error(capsys, engine_main(["generate", "--model", model, "--prompts", str(prompts), "--out",
                                str(link), "--resume", *COMMON]), r"same file as --prompts")
    assert prompts.read_text() == before

    from training.sft import main as sft_main

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n")
    copy = tmp_path / "model"
    shutil.copytree(model, copy)
    files = {p.name: p.read_bytes() for p in copy.iterdir()}
    _error(capsys, sft_main(["--model", str(copy), "--data", str(data), "--out", str(copy),
                             "--overwrite", "--device", "cpu"]),
           r"--out .*model is the same file as --model")
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == files


# -- item 5: one run per output ---------------------------------------------------------------------

def test_second_run_refused_and_stale_lock_taken_over(tmp_path, model, prompts, capsys):
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out), *COMMON]
    # Another process holds the lock: a child that takes it and waits.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from mahalo_engine.utils.outputs import "
         "OutputLock; l = OutputLock(sys.argv[1]); l.acquire(); print('held', flush=True); "
         "time.sleep(120)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        _error(capsys, engine_main(argv), rf"in use by another run \(pid {holder.pid}\b")
        assert not out.exists()
        from training.sft import main as sft_main

        run = tmp_path / "run"
        data = tmp_path / "sft.jsonl"
        data.write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n")
        with OutputLock(run):
            _error(capsys, sft_main(["--model", model, "--data", str(data), "--out", str(run),
                                     "--device", "cpu"]),
                   rf"--out .*run is in use by another run \(pid {os.getpid()}\b")
    finally:
        holder.kill()
        holder.wait()
    # The killed holder left its lock file behind with its (now dead) pid: taken over.
    assert lock_path(out).read_text().strip() == str(holder.pid)
    assert engine_main(argv) == 0
    assert len(out.read_text().splitlines()) == 3 and not lock_path(out).exists()


# -- item 6: honest resume ---------------------------------------------------------------------------

def test_engine_resume_refuses_every_changed_result_option(tmp_path, model, prompts, capsys):
    out = tmp_path / "out.jsonl"
    base = ["generate", "--model", model, "--prompts", str(prompts), "--out", str(out),
            "--seed", "1", "--temperature", "1.0", "--chunk-size", "2", *COMMON]
    assert engine_main(base) == 0
    rows = out.read_text().splitlines()
    out.write_text("\n".join(rows[:2]) + "\n")  # an interrupted run: chunk 0 kept
    saved = out.read_text()
    other_model = str(tiny_checkpoint("qwen2", seed=1))
    changes = {"--seed": "2", "--temperature": "0.5", "--top-k": "5", "--top-p": "0.9",
               "--min-p": "0.1", "--max-new-tokens": "4",
               "--chunk-size": "1", "--max-batch": "1", "--max-seq-len": "48",
               "--dtype": "bfloat16", "--weights": "2", "--model": other_model,
               "--stop": "x", "--chat": None}
    for flag, value in changes.items():
        argv = list(base) + ["--resume"]
        if value is None:
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        name = flag.lstrip("-")
        _error(capsys, engine_main(argv), rf"--resume: .* other options \(.*--{name} was ")
        assert out.read_text() == saved, flag
    assert engine_main(base + ["--resume"]) == 0
    assert out.read_text().splitlines() == rows  # the same options continue the same rows


def test_search_resume_refuses_changed_k(tmp_path, model, capsys):
    from tiny_prm import save_tiny_prm

    prm = tmp_path / "prm"
    save_tiny_prm(prm, tiny_checkpoint("qwen2", seed=1))
    out = tmp_path / "s.jsonl"
    base = ["search", "--model", model, "--prm", str(prm), "--prompt", "Q:", "--out", str(out),
            "-k", "2", "--boundary", " ", "--max-steps", "1", "--max-step-tokens", "2", *COMMON]
    assert engine_main(base) == 0
    saved = out.read_text()
    for flag, value in (("-k", "3"), ("--max-steps", "2"), ("--selection-temperature", "1"),
                        ("--boundary", "math")):
        argv = list(base) + ["--resume"]
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        _error(capsys, engine_main(argv), r"--resume: .* other options \(")
        assert out.read_text() == saved, flag


def _sft_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", model, "--data", str(data), "--out", str(out), "--batch-size", "2",
            "--device", "cpu", "--max-steps", "2", "--save-every", "1", *extra]


def test_trainer_resume_refuses_every_changed_result_option(tmp_path, model, capsys):
    from training.sft import main as sft_main

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q {i}:", "completion": f" {i}."}) + "\n"
                            for i in range(4)))
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text())
    out = tmp_path / "run"
    assert sft_main(_sft_args(model, data, out, "--lr", "1e-3")) == 0
    changes = {"--lr": "2e-3", "--optimizer": "rmsprop", "--weight-decay": "0.1",
               "--warmup-steps": "3", "--max-grad-norm": "1", "--batch-size": "4", "--seed": "5",
               "--max-length": "64", "--max-prompt-length": "8", "--truncate": "end",
               "--chat-template": None, "--data": str(other),
               "--model": str(tiny_checkpoint("qwen2", seed=1))}
    for flag, value in changes.items():
        argv = _sft_args(model, data, out, "--lr", "1e-3", "--resume", "--max-steps", "3")
        if value is None:
            argv.append(flag)
        elif flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        _error(capsys, sft_main(argv), rf"--resume: .*other options \(--{flag[2:]} was ")
    # More steps with the same options is a resume, not a change.
    assert sft_main(_sft_args(model, data, out, "--lr", "1e-3", "--resume", "--max-steps", "3")) == 0


def test_mah_dpo_resume_refuses_new_beta_alpha_sigma(tmp_path, model, capsys):
    from training.mah_dpo import main as dpo_main

    pairs = tmp_path / "p.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q {i}:", "chosen": f" {i}.",
                                         "rejected": f" {i + 1}.", "objective": o}) + "\n"
                             for i in range(2) for o in ("acc", "eng")))
    out = tmp_path / "run"
    base = ["--model", model, "--data", str(pairs), "--out", str(out), "--batch-size", "2",
            "--device", "cpu", "--ref-cache", str(tmp_path / "ref"), "--save-every", "1"]
    assert dpo_main(base + ["--max-steps", "2"]) == 0
    for extra, name in ((["--beta", "0.5"], "beta"), (["--alpha", "acc=0.9"], "alphas"),
                        (["--sigma", "0.1"], "sigma"), (["--lr", "1e-3"], "lr")):
        _error(capsys, dpo_main(base + ["--resume", "--max-steps", "3"] + extra),
               rf"--{name} was ")
    assert dpo_main(base + ["--resume", "--max-steps", "3"]) == 0


# -- items 7, 8, 9: bad models, bad numbers, typos ---------------------------------------------------

def _copy_model(tmp_path: Path, model: str, name: str = "m") -> Path:
    copy = tmp_path / name
    shutil.copytree(model, copy)
    return copy


def test_nan_weights_are_refused_at_load_naming_the_tensor(tmp_path, model, capsys):
    bad = _copy_model(tmp_path, model)
    state = load_file(bad / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    _error(capsys, engine_main(["generate", "--model", str(bad), "--prompt", "hi", *COMMON]),
           r"tensor model\.layers\.1\.mlp\.up_proj\.weight holds NaN")


def test_non_finite_logits_stop_generation_without_writing_nan(tmp_path, model, capsys,
                                                               monkeypatch):
    # The engine's CPU path (Triton's interpreter, used by the tests, stops on NaN in numpy).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    bad = _copy_model(tmp_path, model)
    state = load_file(bad / "model.safetensors")
    state["lm_head.weight"] = torch.full_like(state["lm_head.weight"], 3e38)  # finite, overflows
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o.jsonl"
    for temperature in ("0", "1"):  # greedy: caught in the log-probs; sampling: in the sampler
        last = _error(capsys, engine_main(["generate", "--model", str(bad), "--prompt", "hi",
                                           "--temperature", temperature, "--out", str(out),
                                           *COMMON]), r"non-finite")
        assert str(bad) in last
        assert not out.exists()


def test_undefined_config_values_and_huge_models_are_refused_quickly(tmp_path, model, capsys):
    from mahalo_engine.model_config import ModelConfig

    d = json.loads((Path(model) / "config.json").read_text())
    for change, pattern in (({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
                            ({"rope_parameters": {"rope_theta": 0.0, "rope_type": "default"}},
                             "rope_theta"),
                            ({"max_position_embeddings": 0}, "max_position_embeddings"),
                            ({"num_key_value_heads": 0}, "num_key_value_heads")):
        with pytest.raises(ValueError, match=pattern):
            ModelConfig.from_dict(d | change)
    huge = _copy_model(tmp_path, model)
    (huge / "config.json").write_text(json.dumps(d | {"num_hidden_layers": 10**9}))
    t0 = time.perf_counter()
    _error(capsys, engine_main(["generate", "--model", str(huge), "--prompt", "hi", *COMMON]),
           r"describes a model of .* parameters .*more than this machine can hold")
    assert time.perf_counter() - t0 < 5
    # Large enough to pass the config check, too large for the memory free now.
    from mahalo_engine.cache import available_bytes
    from mahalo_engine.models.loader import load_decoder

    free = available_bytes(torch.device("cpu"))
    if free is None:
        pytest.skip("free memory unknown on this platform")
    cfg = ModelConfig.from_dict(d)
    per_layer = (cfg.num_parameters - ModelConfig.from_dict(d | {"num_hidden_layers": 1})
                 .num_parameters)
    layers = int(free / 4 / per_layer) + 10
    big = ModelConfig.from_dict(d | {"num_hidden_layers": layers})
    if big.num_parameters * 2 > 256 * 2**30:
        pytest.skip("this machine has more free memory than the config check allows")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"GiB in float32, but cpu has .* GiB free"):
        load_decoder(model, dtype=torch.float32, config=big)
    assert time.perf_counter() - t0 < 5


def test_missing_relative_model_path_is_answered_at_once_without_network(tmp_path, model,
                                                                         monkeypatch, capsys):
    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    from training.mah_dpo import main as dpo_main
    from training.sft import main as sft_main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "q", "completion": " a"}) + "\n")
    for cli in (sft_main, dpo_main):
        t0 = time.perf_counter()
        _error(capsys, cli(["--model", "models/Qwen-typo", "--data", str(data), "--out",
                            "run", "--device", "cpu"]), r"no such directory: models/Qwen-typo")
        assert time.perf_counter() - t0 < 5
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"\0" * 16)
    _error(capsys, sft_main(["--model", str(a_file), "--data", str(data), "--out", "run"]),
           r"weights\.bin is a file; expected a model directory")
    _error(capsys, engine_main(["generate", "--model", str(a_file), "--prompt", "hi"]),
           r"is a file; expected a model directory")
    no_tok = _copy_model(tmp_path, model, "notok")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (no_tok / f).unlink()
    _error(capsys, sft_main(["--model", str(no_tok), "--data", str(data), "--out", "run"]),
           r"no tokenizer files in .*notok")
    _error(capsys, engine_main(["generate", "--model", str(no_tok), "--prompt", "hi", *COMMON]),
           r"no tokenizer files in .*notok")


# -- item 10: the small ones -------------------------------------------------------------------------

def test_bom_and_non_utf8_inputs(tmp_path, model, capsys):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"id": "b", "prompt": "hi"}).encode() + b"\n")
    out = tmp_path / "o.jsonl"
    assert engine_main(["generate", "--model", model, "--prompts", str(bom), "--out", str(out),
                        *COMMON]) == 0
    assert json.loads(out.read_text())["id"] == "b"
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    _error(capsys, engine_main(["generate", "--model", model, "--prompts", str(latin), *COMMON]),
           r"latin\.jsonl:2: not UTF-8 text")
    from training.readers import DataError, read_sft

    with pytest.raises(DataError, match=r"latin\.jsonl:2: not UTF-8"):
        read_sft(latin)
    assert [n for n, _ in read_text_lines(bom)] == [1]


def test_boolean_head_weight_and_chunk_prompt_index(tmp_path, model, capsys):
    rows = tmp_path / "w.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "head_weights": [1]}) + "\n"
                    + json.dumps({"prompt": "b", "head_weights": [True]}) + "\n")
    _error(capsys, engine_main(["generate", "--model", model, "--prompts", str(rows), *COMMON]),
           r"w\.jsonl:2: head_weights must be a non-empty list of numbers, got \[true\]")
    chunks = tmp_path / "c.jsonl"
    chunks.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("a", "b", "c", "")))
    _error(capsys, engine_main(["generate", "--model", model, "--prompts", str(chunks),
                                "--chunk-size", "2", *COMMON]),
           r"prompt 3 \(.*c\.jsonl:4\) is empty")


def test_lr_nan_is_refused_before_anything_loads(tmp_path, model, capsys, monkeypatch):
    import mahalo_engine.models.loader as loader
    import training.mah_dpo as mah_dpo

    monkeypatch.setattr(mah_dpo, "reference_logps", lambda *a, **k: pytest.fail("ran the reference"))
    monkeypatch.setattr(loader, "load_decoder", lambda *a, **k: pytest.fail("loaded the model"))
    dpo_main = mah_dpo.main

    pairs = tmp_path / "p.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b",
                                 "objective": "acc"}) + "\n")
    _error(capsys, dpo_main(["--model", model, "--data", str(pairs), "--out",
                             str(tmp_path / "o"), "--lr", "nan"]), r"--lr must be a finite")


def test_identical_pairs_are_counted_in_a_warning(tmp_path, caplog):
    from training.readers import read_preferences

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": "q", "chosen": c, "rejected": r}) + "\n"
                         for c, r in (("a", "a"), ("a", "b"), ("c", "c"))))
    with caplog.at_level("WARNING"):
        read_preferences([("acc", p)])
    assert "2 of 3 preference pairs have chosen == rejected" in caplog.text


# -- the shared writer --------------------------------------------------------------------------------

def test_jsonl_output_writes_nothing_before_the_first_rows(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"a": 1}\n{"a": 2}\n{"a"')
    w = JsonlOutput(out, done=1, keep_bytes=len('{"a": 1}\n'), options={"seed": 1})
    assert out.read_text() == '{"a": 1}\n{"a": 2}\n{"a"'  # untouched until rows arrive
    w.append([{"a": 3}])
    w.append([{"a": 4}])
    assert out.read_text() == '{"a": 1}\n{"a": 3}\n{"a": 4}\n'
    assert json.loads((tmp_path / "o.jsonl.meta.json").read_text())["options"] == {"seed": 1}
    with pytest.raises(FloatingPointError, match=r"row\['x'\]\[1\] = nan"):
        w.append([{"x": [1.0, float("nan")]}])
    assert "NaN" not in out.read_text()


# -- item 11: the bench's printout ------------------------------------------------------------------

def test_bench_header_counts_threads_and_plot_labels_do_not_crowd(tmp_path):
    from bench.common import BenchContext

    name = BenchContext(device=torch.device("cpu"), quick=True).device_name
    assert f"of {os.cpu_count()} cores" in name and "1 threads" not in name
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.quality.report import _label_points

    fig, ax = plt.subplots(figsize=(4, 3), dpi=100)
    ax.plot([0, 1], [0, 1])
    _label_points(ax, [("0.0", 0.5, 0.5, "red"), ("0.1", 0.501, 0.501, "red"),
                       ("1.0", 0.9, 0.1, "red")])
    assert [t.get_text() for t in ax.texts] == ["0.0", "1.0"]
    plt.close(fig)


# -- item 12: install.sh's test-only download -------------------------------------------------------

def _fake_install(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[str, str]:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"$@\" >> \"$(dirname \"$0\")/calls\"\n"
                    "case \"$*\" in *print*) echo 9.9;; esac\nexit 0\n")
    fake.chmod(0o755)
    (tmp_path / "calls").unlink(missing_ok=True)
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), *args],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": str(fake), **(env or {})})
    assert proc.returncode == 0, proc.stderr
    stage4 = next(line for line in proc.stderr.splitlines() if line.startswith("[install] 4/4"))
    return stage4, (tmp_path / "calls").read_text()


def test_install_unpacks_triton36_only_for_the_tests(tmp_path):
    stage4, calls = _fake_install(tmp_path)
    assert "skipping Triton 3.6" in stage4 and "--tests" in stage4
    assert "triton==3.6.0" not in calls
    stage4, calls = _fake_install(tmp_path, "--tests", env={"MAHALO_SKIP_TRITON36": "1"})
    assert "MAHALO_SKIP_TRITON36=1" in stage4 and "triton==3.6.0" not in calls
    stage4, calls = _fake_install(tmp_path, "--tests")
    if (ROOT / ".triton36" / "triton").is_dir():
        assert "keeping Triton 3.6" in stage4
    else:
        assert "unpacking Triton 3.6" in stage4 and "triton==3.6.0" in calls
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("Set-up and test suite"):]
    test_line = block[block.index("```bash\n") + 8:].splitlines()[0]
    assert test_line.startswith("bash scripts/install.sh --tests && ")
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith("#")]
    assert ci[-1] == test_line  # CI runs exactly the README's test command
