"""Step boundaries: device tables + host confirmation on crafted token streams, against the host
rule applied at every token (the definition), and hand-worked positions."""
import random

import pytest
import torch

from mahalo_engine.boundary import PRESETS, Boundary, end_of_turn_id, vocab_texts

# A crafted vocabulary: each id's text as it appears mid-sequence.
TEXTS = ["a", "\n", "\n\n", ".", " b", " e.g.", '"', " ", "\nx", "1.", "Hello", "x\n\ny", "!",
         " word", "\n\nSo", ")", "?", " Dr.", "-", "abc", "bcd", "ab", "<|im_end|>", "\ufffd",
         "。"]
ID = {t: i for i, t in enumerate(TEXTS)}
EOT = ID["<|im_end|>"]


def ids(*texts):
    return [ID[t] for t in texts]


def first_stop(boundary, stream, texts=TEXTS, eot=EOT, decode=None):
    """Where a step ends the way the engine decides it: one table lookup per token on the device;
    a table hit is confirmed on the host with the decoded text, and a rejected slot resumes (in
    the automaton states of its text where the tables cannot know them)."""
    decode = decode or (lambda ids: "".join(texts[j] for j in ids))
    cb = boundary.compile(texts, end_of_turn_id=eot)
    state = torch.zeros(1, cb.num_automata, dtype=torch.long)
    for i, t in enumerate(stream):
        state, hit, exact = cb.step(state, torch.tensor([t]), torch.tensor([i + 1]))
        if exact.item():
            return i
        if hit.item():
            text = decode(stream[: i + 1])
            if boundary.confirm(text, decode(stream[:i]), i + 1):
                return i
            if cb.resume_from_text:
                state = torch.tensor([cb.states_after(text)])
    return None


def first_stop_by_rule(boundary, stream, texts=TEXTS, eot=EOT):
    """The definition: the first token after which the host rule holds (no tables)."""
    for i, t in enumerate(stream):
        if t in boundary.token_ids or (boundary.end_of_turn and t == eot):
            return i
        text = "".join(texts[j] for j in stream[: i + 1])
        if boundary.confirm(text, "".join(texts[j] for j in stream[:i]), i + 1):
            return i
    return None


def test_double_newline_split_across_tokens():
    b = Boundary.parse("\n\n")
    assert first_stop(b, ids("a", "\n", "a", "\n", "\n", "a")) == 4
    assert first_stop(b, ids("a", "\n", " b", "\n\n")) == 3
    assert first_stop(b, ids("a", "x\n\ny", "a")) == 1  # inside one token
    assert first_stop(b, ids("\n", "\nx", "a")) == 1  # begun by the previous token
    assert first_stop(b, ids("a", "\n", "a", "\n", "a")) is None


def test_strings_overlapping_patterns():
    b = Boundary(strings=("abcd", "bc"))
    # The text "abbcd" contains "bc", completed by the second token before "abcd" could be.
    assert first_stop(b, ids("ab", "bcd")) == 1
    b = Boundary(strings=("aab",))
    assert first_stop(b, ids("a", "a", "a", "ab")) == 3  # "aaaab": a failed partial match restarts
    assert first_stop(b, ids("a", "ab")) == 1


def test_min_tokens_ignores_early_matches():
    b = Boundary(strings=("\n\n",), min_tokens=3)
    assert first_stop(b, ids("\n\n", "a", "a", "a")) is None
    assert first_stop(b, ids("\n\n", "a", "\n", "\n")) == 3


def test_sentence_guards_and_closers():
    b = PRESETS["sentence"]
    eight = ["Hello"] * 8
    assert first_stop(b, ids(*eight, ".", " word")) == 8
    assert first_stop(b, ids("Hello", ".", *eight)) is None  # before min_tokens (8)
    # The "." (7th token) is too early; the closing quote completes the sentence as the 8th.
    assert first_stop(b, ids(*eight[:6], ".", '"', " word")) == 7
    assert first_stop(b, ids(*eight[:5], ".", ")", '"', " word")) == 7
    # Abbreviations and bare list markers do not end a sentence.
    assert first_stop(b, ids(*eight, " e.g.", " word", " Dr.", " word", "!")) == 12
    assert first_stop(b, ids(*eight, "\n", "1.", " word", "?")) == 11
    assert first_stop(b, ids(*eight, "\n", "-", " word", ".")) == 11
    # Paragraph breaks: split across tokens, and guarded after a bare list marker.
    assert first_stop(b, ids(*eight, "\n", "\n")) == 9
    assert first_stop(b, ids(*eight, "\n", "1.", "\n\n", " word", "\n\n")) == 12
    # "\n\nSo": the text does not end with the break, so it is not a paragraph end.
    assert first_stop(b, ids(*eight, "\n\nSo", " word")) is None


def test_end_of_turn_and_token_ids_are_exact():
    assert first_stop(Boundary.parse("turn"), ids("a", "\n\n", "<|im_end|>", "a")) == 2
    assert first_stop(Boundary(token_ids=(ID["!"],)), ids("a", "!", "a")) == 1
    with pytest.raises(ValueError, match="end-of-turn"):
        Boundary.parse("turn").compile(TEXTS, end_of_turn_id=None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Boundary(token_ids=(len(TEXTS),)).compile(TEXTS)


def test_incomplete_utf8_tokens_are_left_to_the_host():
    cb = Boundary(strings=("。",)).compile(TEXTS)
    state = torch.zeros(1, 1, dtype=torch.long)
    _, hit, _ = cb.step(state, torch.tensor([ID["\ufffd"]]), torch.tensor([1]))
    assert hit.item()  # may complete a multi-byte character: the host decides
    cb = Boundary(strings=("\n\n",)).compile(TEXTS)
    _, hit, _ = cb.step(state, torch.tensor([ID["\ufffd"]]), torch.tensor([1]))
    assert not hit.item()  # an ASCII boundary cannot end inside a partial character


@pytest.mark.parametrize("spec", ["math", "sentence", "paragraph", ["\n\n", "!"],
                                  Boundary(strings=("abcd", "bc", "aab", "d\n")),
                                  Boundary(sentence=True, min_tokens=2)])
def test_tables_agree_with_the_rule_on_random_streams(spec):
    b = Boundary.parse(spec)
    rng = random.Random(0)
    pool = [i for i, t in enumerate(TEXTS) if t not in ("<|im_end|>", "\ufffd")]
    for _ in range(300):
        stream = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        assert first_stop(b, stream) == first_stop_by_rule(b, stream), \
            [TEXTS[i] for i in stream]


def test_parse():
    assert Boundary.parse("\n\n") == Boundary(strings=("\n\n",)) == PRESETS["math"]
    assert Boundary.parse("<|im_end|>") == Boundary(strings=("<|im_end|>",))
    both = Boundary.parse(["turn", "\n\n", "sentence"])
    assert both.end_of_turn and both.sentence and both.paragraph and both.strings == ("\n\n",)
    assert both.min_tokens == 8
    with pytest.raises(ValueError, match="unknown boundary 'sentense'"):
        Boundary.parse("sentense")
    with pytest.raises(ValueError, match="unknown boundary"):
        Boundary.parse(3)
    with pytest.raises(ValueError, match="unknown boundary"):
        Boundary.parse([])
    with pytest.raises(ValueError, match="non-empty"):
        Boundary(strings=("",))
    with pytest.raises(TypeError, match="wrap it in a tuple"):
        Boundary(strings="\n\n")
    with pytest.raises(ValueError, match="min_tokens"):
        Boundary(min_tokens=0)


def test_real_tokenizer_texts_and_end_of_turn():
    from transformers import AutoTokenizer

    from mahalo_engine.tiny import tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    texts = vocab_texts(tok, 600)
    assert len(texts) == 600 and texts[-1] == ""  # padded embedding rows
    for s in ["Step 1: x = 3.\n\nStep 2: so", "Hello world! (Parentheses) \"quotes\".\n"]:
        assert "".join(texts[t] for t in tok.encode(s, add_special_tokens=False)) == s
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == "<|im_end|>"
    # "\n\n" is two tokens in this vocabulary: the split case on a real tokenizer.
    stream = tok.encode("We add 3.\n\nNext", add_special_tokens=False)
    stop = first_stop(Boundary.parse("math"), stream, texts=texts, eot=eot)
    assert tok.decode(stream[: stop + 1]).endswith("\n\n")
    assert "\n\n" not in tok.decode(stream[:stop])


def test_boundary_completed_after_a_utf8_character_split_over_byte_tokens():
    """The character "。" is three byte tokens here: the tables cannot follow a partial character,
    so they hand each byte token to the host, which resumes the slot in the state of the decoded
    text; the "\\n" that follows then completes "。\\n" on the device."""
    from transformers import AutoTokenizer

    from mahalo_engine.tiny import tiny_checkpoint

    tok = AutoTokenizer.from_pretrained(tiny_checkpoint("qwen2"))
    texts = vocab_texts(tok, 600)
    stream = tok.encode("We add 3\u3002\nNext", add_special_tokens=False)
    assert sum(texts[t] == "\ufffd" for t in stream) >= 2  # the character is split
    boundary = Boundary(strings=("\u3002\n",))
    stop = first_stop(boundary, stream, texts=texts, eot=None, decode=tok.decode)
    assert stop is not None and tok.decode(stream[: stop + 1]) == "We add 3\u3002\n"
    assert boundary.compile(texts).resume_from_text
    assert not Boundary(strings=("\n\n",)).compile(texts).resume_from_text  # ASCII: exact tables
