"""Where things are on disk: the project's caches (tiny checkpoints, reference log-probs, JIT
builds) and the local model directories the command lines are given.

One cache root for all of them: ``$MAHALO_CACHE``, else ``$XDG_CACHE_HOME/mahalo_engine``, else
``~/.cache/mahalo_engine``. A model path is checked on the file system alone (`check_model_dir`):
nothing is ever downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """``<cache root>/<parts...>`` (not created here)."""
    env = os.environ.get("MAHALO_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "mahalo_engine"
    return root.joinpath(*parts)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(path: str | Path, flag: str = "--model", need: str = "config.json") -> Path:
    """``path`` as a local model directory holding ``need``, checked on the file system alone: the
    project never downloads, so a typo is answered at once with "no such directory: ..." rather
    than after a hub lookup. ``need="tokenizer"``: any of ``TOKENIZER_FILES``."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"{flag}: no such directory: {root} (a local Hugging Face model "
                                f"directory; nothing is downloaded)")
    if not root.is_dir():
        raise ValueError(f"{flag}: {root} is a file; expected a model directory")
    if need == "tokenizer":
        if not any((root / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"{flag}: no tokenizer files in {root} (expected one of "
                                    f"{', '.join(TOKENIZER_FILES)})")
    elif not (root / need).is_file():
        raise FileNotFoundError(f"{flag}: no {need} in {root}")
    return root


def load_tokenizer(path: str | Path, flag: str = "--model"):
    """The tokenizer of a local model directory (`check_model_dir` first, then transformers'
    AutoTokenizer with ``local_files_only``: never a network lookup). A tokenizer that encodes
    text to nothing is refused here rather than deep inside the engine."""
    # Imported here: transformers takes seconds to import, which a bad path need not wait for.
    from transformers import AutoTokenizer

    root = check_model_dir(path, flag, need="tokenizer")
    tok = AutoTokenizer.from_pretrained(root, local_files_only=True)
    if not tok("a", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"{flag}: the tokenizer in {root} encodes 'a' to no tokens; its "
                         f"tokenizer files are incomplete")
    return tok
