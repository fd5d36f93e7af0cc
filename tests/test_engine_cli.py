"""`python -m mahalo_engine search|generate`: the CLI returns what the Python API returns."""
import json

import pytest
import torch

from mahalo_engine.__main__ import main
from mahalo_engine.engine import Engine, SearchConfig
from mahalo_engine.policy import load_policy
from mahalo_engine.value_model import load_prm
from mahalo_engine.tiny import tiny_checkpoint
from tiny_prm import save_tiny_prm

COMMON = ["--device", "cpu", "--dtype", "float32", "--max-seq-len", "96", "--max-batch", "2"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    save_tiny_prm(tmp / "prm", tiny_checkpoint("qwen2", seed=1))
    return tiny_checkpoint("qwen2"), tmp / "prm", tmp


def test_search_cli_matches_python(dirs, capsys):
    model, prm_dir, tmp = dirs
    prompts = tmp / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Question: How many clips"}) + "\n"
                       + json.dumps({"messages": [{"role": "user", "content": "Hi!"}]}) + "\n")
    out = tmp / "search.jsonl"
    argv = ["search", "--model", str(model), "--prm", str(prm_dir), "--prompts", str(prompts),
            "-k", "2", "--boundary", " ", "--max-steps", "2", "--max-step-tokens", "5",
            "--check-every", "2", "--seed", "3", "--cache-layout", "shared_prefix", "--out",
            str(out), *COMMON]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]

    policy = load_policy(model, dtype=torch.float32)
    # The reference runs the default fork layout: the CLI's shared_prefix run must match it.
    engine = Engine(policy, prm=load_prm(prm_dir, dtype=torch.float32), max_batch=2,
                    max_seq_len=96)
    ref = engine.search(["Question: How many clips", [{"role": "user", "content": "Hi!"}]],
                        config=SearchConfig(candidates=2, boundary=" ", max_steps=2,
                                            max_step_tokens=5, check_every=2, seed=3))
    assert [r["token_ids"] for r in rows] == [r.token_ids for r in ref]
    # The PRM follows the policy's layout: in shared_prefix its scores come from the cascade
    # extend attention (another summation order), equal to the fork run's to rounding.
    got = [s["score"] for r in rows for s in r["steps"]]
    assert got == pytest.approx([s.score for r in ref for s in r.steps], rel=1e-5, abs=1e-6)
    assert [len(r["steps"]) for r in rows] == [len(r.steps) for r in ref]

    # Printed form: one block per request, one line per step with its scores.
    printed_argv = [a for a in argv if a not in ("--out", str(out))]
    printed_argv[printed_argv.index("--max-steps") + 1] = "1"  # one step is enough to print
    assert main(printed_argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("=== request") == 2 and "--- step 1: score" in printed
    first = ref[0].steps[0]
    assert f"--- step 1: score {first.score:.4g} (candidates " \
           f"{', '.join(f'{c:.4g}' for c in first.candidate_scores)}; " in printed


def test_generate_cli_matches_python(dirs, capsys):
    model, _, tmp = dirs
    out = tmp / "gen.jsonl"
    assert main(["generate", "--model", str(model), "--prompt", "The quick", "--temperature", "0",
                 "--max-new-tokens", "6", "--out", str(out), *COMMON]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    policy = load_policy(model, dtype=torch.float32)
    ref = Engine(policy, max_seq_len=96).generate(["The quick"], temperature=0, max_new_tokens=6)
    assert row["token_ids"] == ref[0].token_ids and row["finish_reason"] == ref[0].finish_reason


def test_generate_cli_top_p_and_min_p(dirs, capsys):
    """--top-p/--min-p reach the sampler: a tiny nucleus (or min-p 1) draws the greedy tokens;
    a bad value is one line naming it and exit 2, before any model loads."""
    model, _, tmp = dirs
    greedy = Engine(load_policy(model, dtype=torch.float32), max_seq_len=96).generate(
        ["The quick"], temperature=0, max_new_tokens=6)[0].token_ids
    for i, flags in enumerate((["--top-p", "1e-6"], ["--min-p", "1"])):
        out = tmp / f"nucleus{i}.jsonl"
        assert main(["generate", "--model", str(model), "--prompt", "The quick", "--seed", "3",
                     "--max-new-tokens", "6", "--out", str(out), *flags, *COMMON]) == 0
        assert json.loads(out.read_text())["token_ids"] == greedy, flags
    out = tmp / "nucleus.jsonl"
    assert main(["generate", "--model", str(model), "--prompt", "The quick", "--top-p", "0.9",
                 "--min-p", "0.05", "--max-new-tokens", "6", "--out", str(out), *COMMON]) == 0
    assert len(json.loads(out.read_text())["token_ids"]) > 0
    for command, flag, value in (("generate", "--top-p", "0"), ("search", "--min-p", "1.5"),
                                 ("generate", "--top-p", "nan")):
        capsys.readouterr()
        assert main([command, "--model", "/nonexistent", "--prompt", "a", flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {flag} must be a finite number in") and value in err
        assert len(err.splitlines()) == 1


def test_cli_errors_and_help(dirs, capsys):
    model, _, tmp = dirs
    with pytest.raises(SystemExit) as e:
        main(["search", "--help"])
    assert e.value.code == 0 and "--boundary" in capsys.readouterr().out
    bad = tmp / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    assert main(["generate", "--model", str(model), "--prompts", str(bad), *COMMON]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --prompt and --prompts are exclusive
        main(["generate", "--model", str(model), "--prompt", "a", "--prompts", str(bad)])
    with pytest.raises(SystemExit, match="expected comma-separated numbers|2"):
        main(["generate", "--model", str(model), "--prompt", "a", "--weights", "0.7,x"])
