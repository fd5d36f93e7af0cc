"""Data readers (errors name file:line), truncation rule, tokenisation, collation, balanced batches."""
import json
from collections import Counter

import pytest

from mahalo_engine.tiny import tiny_checkpoint
from training.checkpoint import atomic_write_text
from training.batching import BalancedBatches
from training.collate import IGNORE, collate_pairs
from training.encode import tokenize_pairs, tokenize_steps, truncate
from training.readers import DataError, read_preferences, read_sft, read_steps


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


PAIR = {"prompt": "Q?", "chosen": "yes", "rejected": "no"}


def test_malformed_line_names_file_and_line(tmp_path):
    f = _write(tmp_path / "acc.jsonl", [PAIR, "", '{"prompt": "Q", "chosen": ', PAIR])
    with pytest.raises(DataError, match=r"acc\.jsonl:3: invalid JSON"):
        read_preferences([("acc", f)])
    f = _write(tmp_path / "b.jsonl", [PAIR, {"prompt": "Q", "chosen": "a"}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: missing field 'rejected'"):
        read_preferences([("acc", f)])
    f = _write(tmp_path / "c.jsonl", [{"prompt": 3, "chosen": "a", "rejected": "b"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'prompt' must be str or list"):
        read_preferences([("acc", f)])
    f = _write(tmp_path / "d.jsonl", [{"prompt": "q", "completions": ["a", "b"], "labels": [1.0]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: 1 labels for 2 completions"):
        read_steps(f)
    f = _write(tmp_path / "e.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"e\.jsonl:1: expected a JSON object"):
        read_sft(f)


def test_empty_file_and_empty_objective_are_errors(tmp_path):
    acc = _write(tmp_path / "acc.jsonl", [PAIR])
    empty = tmp_path / "eng.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"eng\.jsonl: no examples"):
        read_preferences([("acc", acc), ("eng", empty)])
    with pytest.raises(DataError, match=r"objective\(s\) \['eng'\] have no examples"):
        read_preferences([("acc", acc)], objectives=["acc", "eng"])
    mixed = _write(tmp_path / "all.jsonl", [{**PAIR, "objective": "eng"}, {**PAIR, "objective": "acc"}, PAIR])
    with pytest.raises(DataError, match=r"all\.jsonl:3: missing field 'objective'"):
        read_preferences([(None, mixed)])


def test_objective_field_and_conversational_rows(tmp_path):
    f = _write(tmp_path / "all.jsonl", [
        {**PAIR, "objective": "eng"}, {**PAIR, "objective": "acc"},
        {"prompt": [{"role": "user", "content": "hi"}], "objective": "acc",
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go away"}])
    data = read_preferences([(None, f)])
    assert data.objectives == ["eng", "acc"]
    assert [len(g) for g in data.by_objective()] == [1, 2]
    assert data.pairs[2].chosen == "hello" and data.pairs[2].source.endswith("all.jsonl:3")


def test_truncation_rule_prompt_side_first():
    p, r1, r2 = list(range(10)), [100, 101, 102], [200]
    # fits: untouched
    assert truncate(p, [r1, r2], 13, 4) == (p, [r1, r2], False, False)
    # keep="end": the prompt loses its oldest tokens down to max_length - longest response
    assert truncate(p, [r1, r2], 8, 4, keep="end") == (p[5:], [r1, r2], True, False)
    # ... but not below max_prompt_length; then the responses keep their start
    assert truncate(p, [[1] * 10, r2], 8, 5, keep="end") == (p[5:], [[1, 1, 1], r2], True, True)
    with pytest.raises(ValueError, match="max_prompt_length"):
        truncate(p, [r1], 8, 8)
    with pytest.raises(ValueError, match="'start' or 'end'"):
        truncate(p, [r1], 8, 4, keep="middle")


def test_truncation_keeps_the_prompt_start_by_default_like_the_paper(tmp_path):
    """The paper's keep_start: the BOS / system / chat header survive, the tail goes."""
    p, r1 = list(range(10)), [100, 101, 102]
    assert truncate(p, [r1], 8, 4) == (p[:5], [r1], True, False)
    assert truncate(p, [[1] * 10], 8, 5) == (p[:5], [[1, 1, 1]], True, True)
    # Through the tokenizer's chat template: the system turn (the header) is kept
    from mahalo_engine.tiny import tiny_checkpoint
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    msgs = [{"role": "system", "content": "You are a tutor."},
            {"role": "user", "content": "word " * 200}]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": msgs, "chosen": "yes", "rejected": "no"}) + "\n")
    data = read_preferences([("acc", path)])
    full = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    header = tok(full[:full.index("word")], add_special_tokens=False)["input_ids"]
    (start,), stats = tokenize_pairs(tok, data, max_length=64, max_prompt_length=32,
                                     chat_template=False)
    assert stats.prompt_cut == 1 and "nearest the response" in str(stats)
    assert start.prompt == full_ids[:len(start.prompt)] and start.prompt[:len(header)] == header
    (end,), _ = tokenize_pairs(tok, data, max_length=64, max_prompt_length=32,
                               chat_template=False, keep_prompt="end")
    assert end.prompt == full_ids[-len(end.prompt):]


def test_tokenise_and_collate_pairs(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    f = _write(tmp_path / "a.jsonl", [{"prompt": "The answer is", "chosen": " 72", "rejected": " 71 or so"}])
    data = read_preferences([("acc", f)])
    (item,), stats = tokenize_pairs(tok, data, max_length=64, max_prompt_length=32, chat_template=False)
    assert item.prompt == tok("The answer is")["input_ids"]
    assert item.chosen == tok(" 72", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert stats.total == 1 and stats.prompt_cut == 0
    (chat,), _ = tokenize_pairs(tok, data, max_length=64, max_prompt_length=32, chat_template=True)
    assert tok.decode(chat.prompt) == "<|im_start|>user\nThe answer is<|im_end|>\n<|im_start|>assistant\n"
    batch = collate_pairs([item, item], pad_id=0)
    n_p, n_c, n_r = len(item.prompt), len(item.chosen), len(item.rejected)
    assert batch.input_ids.shape == (4, n_p + max(n_c, n_r))
    assert batch.labels[0, :n_p].eq(IGNORE).all()
    assert batch.labels[0, n_p:n_p + n_c].tolist() == item.chosen
    assert batch.labels[2, n_p:n_p + n_r].tolist() == item.rejected
    assert batch.attention_mask[0].sum() == n_p + n_c


def test_tokenise_steps_positions_and_dropped_steps(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    f = _write(tmp_path / "s.jsonl", [{"prompt": "Q: 2+2?", "completions": ["It is 4.", "Done.\n\n", "x" * 50],
                                       "labels": [1.0, 0.5, 0.0]}])
    (ex,) = read_steps(f)
    p = tok("Q: 2+2?")["input_ids"]
    s1 = tok("It is 4.\n\n", add_special_tokens=False)["input_ids"]
    s2 = tok("Done.\n\n", add_special_tokens=False)["input_ids"]  # separator not doubled
    (it,), stats = tokenize_steps(tok, [ex], max_length=len(p) + len(s1) + len(s2) + 2,
                                  max_prompt_length=len(p), chat_template=False, step_separator="\n\n")
    assert it.ids == p + s1 + s2 and stats.prompt_cut == 0
    assert it.positions == [len(p) + len(s1) - 1, len(p) + len(s1) + len(s2) - 1]
    assert it.labels == [1.0, 0.5] and stats.response_cut == 1


def test_balanced_batches():
    s = BalancedBatches([5, 9, 7], batch_size=6, mode="truncate", seed=3)
    assert s.steps_per_epoch == 2  # 5 // 2
    seen = [set(), set(), set()]
    for step in range(2):
        rows = s.batch(step)
        assert Counter(o for o, _ in rows) == {0: 2, 1: 2, 2: 2}
        for o, i in rows:
            assert i not in seen[o]
            seen[o].add(i)
    assert s.batch(1) == BalancedBatches([5, 9, 7], 6, mode="truncate", seed=3).batch(1)  # pure
    assert s.batch(2) != s.batch(0)  # a new epoch reshuffles
    r = BalancedBatches([2, 6], batch_size=4, mode="replacement", seed=0)
    assert r.steps_per_epoch == 3
    drawn = Counter(i for step in range(3) for o, i in r.batch(step) if o == 0)
    assert set(drawn) == {0, 1} and sum(drawn.values()) == 6 and max(drawn.values()) == 3
    with pytest.raises(ValueError, match="multiple of the number of objectives"):
        BalancedBatches([5, 5], batch_size=3)


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "old")
    atomic_write_text(p, "new")
    assert p.read_text() == "new"
    assert [f.name for f in tmp_path.iterdir()] == ["x.txt"]


def test_one_objective_named_for_two_files_is_an_error(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for f in (a, b):
        f.write_text(json.dumps({"prompt": "q", "chosen": "x", "rejected": "y"}) + "\n")
    with pytest.raises(DataError, match=r"objective 'acc' is named twice .*a\.jsonl.*b\.jsonl"):
        read_preferences([("acc", a), ("acc", b)])
    assert read_preferences([("acc", a), ("eng", b)]).objectives == ["acc", "eng"]
