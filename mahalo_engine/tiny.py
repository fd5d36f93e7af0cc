"""Tiny Hugging Face checkpoints built locally: a seeded random model of each supported family plus a
byte-level BPE tokenizer trained on a built-in corpus, saved as a directory that both
``load_policy`` and ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` read. No downloads.

Every parameter is redrawn (not transformers' init, which zeroes biases and sets norms to one) so
that a parity test notices a dropped bias, norm weight or RoPE detail.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mahalo_engine.model_config import SUPPORTED_MODEL_TYPES
from mahalo_engine.utils.paths import cache_dir

FAMILIES = SUPPORTED_MODEL_TYPES
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Bump when the checkpoint recipe changes, so cached directories are rebuilt.
_RECIPE_VERSION = 1

_CORPUS = """\
Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.
How many clips did Natalia sell altogether in April and May?

Step 1: In May she sold 48 / 2 = 24 clips.

Step 2: Altogether she sold 48 + 24 = 72 clips. The answer is 72.

Question: A train travels 120 km in 2 hours. What is its average speed, in km per hour?

The average speed is distance divided by time: 120 / 2 = 60. So the train moves at 60 km/h.

Let x be a number such that 3x + 7 = 22. Then 3x = 15, and x = 5. We check: 3 * 5 + 7 = 22.
The square of 12 is 144; the square root of 81 is 9; 2^10 = 1024 and 10% of 250 is 25.

A good assistant is helpful, honest and kind. It explains each step clearly, admits when it is not
sure, and never makes up facts. When a student is stuck, it asks a question that points the way
instead of giving the whole answer at once.

User: Can you help me understand fractions?
Assistant: Of course! A fraction such as 3/4 means three parts out of four equal parts. If you cut a
pizza into 4 slices and eat 3 of them, you ate 3/4 of the pizza. Adding 1/4 + 2/4 gives 3/4.

The quick brown fox jumps over the lazy dog. Numbers: 0 1 2 3 4 5 6 7 8 9, 10, 100, 1000, 3.14159.
Punctuation matters too: commas, periods. Questions? Yes! (Parentheses) [brackets] {braces} "quotes".

Therefore, the total cost is $15.50 + $4.25 = $19.75, and the change from $20 is $0.25.
"""


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on ``_CORPUS``, wrapped for transformers."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenisation (digits split one by one): transformers v5 rebuilds any qwen2
    # checkpoint's tokenizer with it, so using it everywhere keeps AutoTokenizer == tokenizer.json.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )


def _hf_config(family: str, *, vocab_size: int, hidden_size: int, intermediate_size: int,
               num_layers: int, num_heads: int, num_key_value_heads: int, head_dim: int | None,
               tie_word_embeddings: bool, rope_theta: float, rope_scaling: dict | None,
               sliding_window: int | None, max_position_embeddings: int, special_ids: dict[str, int]):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
    kw: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        tie_word_embeddings=tie_word_embeddings, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6, **special_ids,
    )
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling is not None:
        rope = {**rope, **rope_scaling}
    kw["rope_parameters"] = rope
    if family == "mistral":
        kw["sliding_window"] = sliding_window
    elif family in ("qwen2", "qwen3") and sliding_window is not None:
        kw.update(use_sliding_window=True, sliding_window=sliding_window, max_window_layers=0)
    elif sliding_window is not None:
        raise ValueError(f"sliding_window is not available for family {family!r}")
    return cls(**kw)


def make_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "qwen2",
    *,
    seed: int = 0,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    sliding_window: int | None = None,
    max_position_embeddings: int = 4096,
    init_std: float = 0.08,
) -> Path:
    """Build a seeded random ``family`` model and a trained tokenizer, saved in ``out_dir``.

    ``rope_scaling`` takes transformers' keys, e.g. ``{"rope_type": "linear", "factor": 2.0}``.
    ``vocab_size`` (>= 300: the byte alphabet plus specials plus merges) sizes both the model and
    the tokenizer's training target.
    """
    import torch
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 for a byte-level tokenizer, got {vocab_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    special_ids = {"bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
                   "pad_token_id": ids["<|endoftext|>"]}
    config = _hf_config(
        family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_layers=num_layers, num_heads=num_heads, num_key_value_heads=num_key_value_heads,
        head_dim=head_dim, tie_word_embeddings=tie_word_embeddings, rope_theta=rope_theta,
        rope_scaling=rope_scaling, sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings, special_ids=special_ids,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(init_std * noise)
    model.generation_config.pad_token_id = special_ids["pad_token_id"]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_family(path: str | Path) -> str | None:
    """The family of a directory built by ``tiny_checkpoint`` (its ``mahalo_tiny.json`` recipe),
    or None for any other directory."""
    recipe = Path(path) / "mahalo_tiny.json"
    if not recipe.is_file():
        return None
    return json.loads(recipe.read_text()).get("family")


def tiny_checkpoint(family: str = "qwen2", **kw: Any) -> Path:
    """The directory of ``make_tiny_checkpoint(family, **kw)``, built once and cached on disk.

    The cache key covers every option, so different shapes never collide. Building happens in a
    temporary directory renamed into place, so parallel processes never see a half-written one.
    """
    key_src = json.dumps({"family": family, "v": _RECIPE_VERSION, **kw}, sort_keys=True, default=str)
    key = f"{family}-{hashlib.sha256(key_src.encode()).hexdigest()[:16]}"
    root = cache_dir("tiny")
    final = root / key
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        make_tiny_checkpoint(tmp, family, **kw)
        (tmp / "mahalo_tiny.json").write_text(key_src)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a real failure, not another process winning the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
