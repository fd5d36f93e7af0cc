"""The tokenisation contract (`mahalo_engine.text`): the trainers' collate paths and the engine's
scorer path produce the same token ids for the same dialogue, with and without the chat template
(and with a BOS-adding tokenizer); `split_steps` cuts texts as the engine's device tables and host
confirmation cut a token stream, and as hand-written expectations say for every preset."""
import pytest
import torch

from mahalo_engine.engine import Engine, SearchConfig
from mahalo_engine.boundary import Boundary, vocab_texts
from mahalo_engine.engine.scorers import Candidates, ValueModelPRM
from mahalo_engine.policy import load_policy
from mahalo_engine.value_model import ValueHead, load_prm, save_prm
from mahalo_engine.text import encode_prompt, split_steps
from mahalo_engine.tiny import tiny_checkpoint
from mahalo_engine.models.loader import load_decoder
from training.collate import collate_pairs, collate_step_pairs, collate_steps
from training.encode import tokenize_pairs, tokenize_step_pairs, tokenize_steps
from training.readers import PreferenceData, PreferencePair, StepExample, StepPair

PROMPT = "Question: Tom has 3 apples and buys 5 more. How many apples does he have?"
STEPS = ["Tom starts with 3 apples.\n\n", "He buys 5 more, so 3 + 5 = 8.\n\n",
         "The answer is 8."]
LONG = dict(max_length=1024, max_prompt_length=512)


def _with_bos(tok):
    """The tokenizer, made to prepend a BOS (``<|endoftext|>``) as Llama's does."""
    from tokenizers import processors

    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    assert tok("a")["input_ids"][0] == bos
    return tok


@pytest.fixture(scope="module")
def policy():
    return load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory):
    """A PRM with another tokenizer (vocabulary 400): the engine re-tokenises step texts for it."""
    from transformers import AutoTokenizer

    src = tiny_checkpoint("llama", seed=2, vocab_size=400)
    torch.manual_seed(0)
    model = load_decoder(src, dtype=torch.float32)
    out = tmp_path_factory.mktemp("prm") / "bridge"
    save_prm(out, model, ValueHead(model.config.hidden_size), "value",
             AutoTokenizer.from_pretrained(src))
    return load_prm(out, dtype=torch.float32)


class _Feed:
    """Records every row a decoder's ``extend`` takes (``prefill`` goes through it too)."""

    def __init__(self, model):
        self.rows: list[list[int]] = []
        inner = model.extend

        def extend(cache, ids, num_new, slots, *a, **kw):
            self.rows += [ids[i, :int(n)].tolist() for i, n in enumerate(num_new)]
            return inner(cache, ids, num_new, slots, *a, **kw)

        model.extend = extend


def _scorer_feed(policy, prm, prompt, steps, chat):
    """What the engine's PRM scorer feeds ``prm`` for one request whose committed steps are
    ``steps`` (one candidate per step), and the positions it reads scores at."""
    engine = Engine(policy, max_batch=1, max_seq_len=256, cuda_graphs=False)
    (req,) = engine._prompts([prompt], chat)
    scorer = ValueModelPRM(prm)
    scorer.prepare(1, 256, policy)
    feed = _Feed(prm.model)
    try:
        scorer.start(torch.tensor([[0]]), [req])
        committed = ""
        for text in steps:
            ids = policy.tokenizer(text, add_special_tokens=False)["input_ids"]
            cands = Candidates(torch.tensor([[0]]), [ids], [text],
                               torch.zeros(1, policy.config.hidden_size), [req], [committed])
            assert torch.isfinite(scorer.score(cands)).all()
            none = torch.zeros(0, dtype=torch.long)
            scorer.promote(none, none, torch.tensor([0]), torch.tensor([[0]]))
            committed += text
    finally:
        del prm.model.extend  # the instance attribute: back to the class's method
    reads = torch.tensor([len(r) for r in feed.rows]).cumsum(0)[1:] - 1
    return [t for r in feed.rows for t in r], reads.tolist(), req


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_prm_trainer_collate_equals_the_engine_scorer_feed(policy, bridge, chat):
    ids, reads, _ = _scorer_feed(policy, bridge, PROMPT, STEPS, chat)
    tok = bridge.tokenizer
    # The PRM trainer (step data, steps keeping their own separators).
    items, _ = tokenize_steps(tok, [StepExample(PROMPT, STEPS, [0.0] * 3, "t:1")],
                              chat_template=chat, step_separator="", **LONG)
    batch = collate_steps(items, pad_id=0)
    assert batch.input_ids[0].tolist() == ids
    assert batch.cols.tolist() == reads
    # With the default separator "\n\n": the steps that end with it are unchanged, the last one
    # is tokenised with it appended.
    items, _ = tokenize_steps(tok, [StepExample(PROMPT, STEPS, [0.0] * 3, "t:1")],
                              chat_template=chat, step_separator="\n\n", **LONG)
    assert items[0].ids == ids[:reads[1] + 1] + tok(STEPS[2] + "\n\n",
                                                     add_special_tokens=False)["input_ids"]
    # The BT trainer: a pair of partial responses, read at each side's last token.
    pairs, _ = tokenize_step_pairs(tok, [StepPair(PROMPT, STEPS, STEPS[:2], "t:1")],
                                   chat_template=chat, step_separator="", **LONG)
    bt = collate_step_pairs(pairs, pad_id=0)
    assert bt.input_ids[0].tolist() == ids and bt.cols.tolist() == [reads[-1], reads[1]]
    assert bt.input_ids[1, :reads[1] + 1].tolist() == ids[:reads[1] + 1]
    # Independent reference: the tokenizer called by hand on the documented rule.
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                       add_generation_prompt=True, tokenize=False)
        ref = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ref = tok(PROMPT)["input_ids"]
    for s in STEPS:
        ref += tok(s, add_special_tokens=False)["input_ids"]
    assert ids == ref


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_mah_dpo_collate_equals_the_engine_prompt_and_step(policy, bridge, chat):
    # One-step response: MAH-DPO tokenises a response whole, as one step, then EOS.
    ids, _, req = _scorer_feed(policy, bridge, PROMPT, STEPS[:1], chat)
    for tok, engine_ids in ((bridge.tokenizer, ids), (policy.tokenizer, None)):
        data = PreferenceData(["acc"], [PreferencePair(PROMPT, STEPS[0], "No.", "acc", "t:1")])
        items, _ = tokenize_pairs(tok, data, chat_template=chat, **LONG)
        batch = collate_pairs(items, pad_id=0)
        row = batch.input_ids[0][batch.attention_mask[0].bool()].tolist()
        assert row[-1] == tok.eos_token_id
        labelled = (batch.labels[0] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(len(items[0].prompt), len(row)))
        if engine_ids is not None:  # the PRM's tokenizer: the scorer's feed, EOS aside
            assert row[:-1] == engine_ids
        else:  # the policy's tokenizer: the engine's own prompt ids
            assert row[:len(req.ids)] == req.ids and len(items[0].prompt) == len(req.ids)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_bos_rule_engine_and_trainer_agree(chat):
    policy = load_policy(tiny_checkpoint("qwen2"), dtype=torch.float32)
    tok = _with_bos(policy.tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    engine = Engine(policy, max_batch=1, max_seq_len=256, cuda_graphs=False)
    (req,) = engine._prompts([PROMPT], chat)
    data = PreferenceData(["acc"], [PreferencePair(PROMPT, "Yes.", "No.", "acc", "t:1")])
    items, _ = tokenize_pairs(tok, data, chat_template=chat, **LONG)
    assert items[0].prompt == req.ids == encode_prompt(tok, PROMPT, chat)
    messages = [{"role": "user", "content": PROMPT}]
    assert encode_prompt(tok, messages) == encode_prompt(tok, PROMPT, True)
    if chat:  # the rendered template brings its own specials: the tokenizer's BOS is not added
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert req.ids == tok(text, add_special_tokens=False)["input_ids"] and req.ids[0] != bos
    else:
        assert req.ids[0] == bos and req.ids[1:] == tok(PROMPT, add_special_tokens=False)["input_ids"]


def test_engine_search_steps_reach_the_prm_as_the_trainer_tokenises_them(policy, bridge):
    """End to end: the steps a real search commits, fed to a re-tokenising PRM, are the ids the
    PRM trainer builds from that dialogue's texts."""
    engine = Engine(policy, max_batch=1, max_seq_len=256, cuda_graphs=False)
    # Few decode steps: under TRITON_INTERPRET each one runs the interpreted sampling kernels.
    cfg = SearchConfig(candidates=1, boundary=" ", max_steps=3, max_step_tokens=3, seed=5,
                       top_k=0, check_every=3, scorer=bridge)
    feed = _Feed(bridge.model)
    try:
        (res,) = engine.search(["Tom has 3 apples."], config=cfg)
    finally:
        del bridge.model.extend
    texts = [s.text for s in res.steps if s.text]  # an EOS-only step feeds nothing
    assert len(texts) >= 2 and len(feed.rows) == 1 + len(texts)
    items, _ = tokenize_steps(bridge.tokenizer, [StepExample("Tom has 3 apples.", texts,
                                                             [0.0] * len(texts), "t:1")],
                              chat_template=False, step_separator="", **LONG)
    assert items[0].ids == [t for r in feed.rows for t in r]


# -- split_steps -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(policy):
    return policy.tokenizer


SENTENCES = ("The farmer sold twelve apples at the market this morning. He then bought "
             "four more from his neighbour Mr. Smith who lives across the road. Finally he "
             "counted all of them again!\n\nThe answer is sixteen.")
PARAGRAPHS = ("Hi\n\nThis paragraph is long enough to count as one whole step.\n\n"
              "The items are these:\n1.\n\nfirst item\n\nEnd")


def test_split_steps_hand_written_expectations(tok):
    text = "First.\n\nSecond.\n\nThird"
    expect = ["First.\n\n", "Second.\n\n", "Third"]
    assert split_steps(text, "\n\n") == expect
    assert split_steps(text, "math") == expect
    assert split_steps(text, "math", tok) == expect
    assert split_steps(text, ["\n\n", "."]) == ["First.", "\n\n", "Second.", "\n\n", "Third"]
    # sentence: sentence ends (not after an abbreviation) and paragraph breaks, >= 8 tokens
    assert split_steps(SENTENCES, "sentence", tok) == [
        "The farmer sold twelve apples at the market this morning.",
        " He then bought four more from his neighbour Mr. Smith who lives across the road.",
        " Finally he counted all of them again!",
        "\n\nThe answer is sixteen."]
    # paragraph: breaks after >= 8 tokens ("Hi\n\n" is 4), never after a bare list marker
    assert split_steps(PARAGRAPHS, "paragraph", tok) == [
        "Hi\n\nThis paragraph is long enough to count as one whole step.\n\n",
        "The items are these:\n1.\n\nfirst item\n\n",
        "End"]
    # turn: the end-of-turn token never occurs in decoded text
    assert split_steps(text, "turn") == [text]
    assert split_steps("", "math") == []


def _engine_steps(tok, text, boundary):
    """The engine's cut of ``text``'s tokens: the compiled device tables, one token at a time,
    each hit confirmed on the decoded step (as `Engine._confirmer`)."""
    spec = Boundary.parse(boundary)
    compiled = spec.compile(vocab_texts(tok, len(tok)))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    opts = dict(skip_special_tokens=False, clean_up_tokenization_spaces=False)
    zero = torch.zeros(1, compiled.num_automata, dtype=torch.long)
    steps, cur, state = [], [], zero
    for t in ids:
        cur.append(t)
        state, hit, exact = compiled.step(state, torch.tensor([t]), torch.tensor([len(cur)]))
        if bool(exact) or bool(hit) and spec.confirm(tok.decode(cur, **opts),
                                                     tok.decode(cur[:-1], **opts), len(cur)):
            steps.append(tok.decode(cur, **opts))
            cur, state = [], zero
    if cur:
        steps.append(tok.decode(cur, **opts))
    return steps


@pytest.mark.parametrize("boundary", ["math", "sentence", "paragraph", "\n", [".", "\n\n"],
                                      " apples"])
def test_split_steps_matches_the_engine_token_stream(tok, boundary):
    for text in (SENTENCES, PARAGRAPHS, "a.\n\n\n\nb. c!\n\n"):
        pieces = split_steps(text, boundary, tok)
        assert "".join(pieces) == text
        assert pieces == _engine_steps(tok, text, boundary)


def test_split_steps_errors(tok):
    with pytest.raises(ValueError, match="min_tokens=8 tokens: pass the tokenizer"):
        split_steps(SENTENCES, "sentence")
    with pytest.raises(ValueError, match="token ids"):
        split_steps(SENTENCES, Boundary(token_ids=(3,)))
    with pytest.raises(ValueError, match="unknown boundary 'steps'"):
        split_steps(SENTENCES, "steps")
