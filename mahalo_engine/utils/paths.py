"""Where the project keeps its on-disk caches (tiny checkpoints, reference log-probs, JIT builds).

One root for all of them: ``$MAHALO_CACHE``, else ``$XDG_CACHE_HOME/mahalo_engine``, else
``~/.cache/mahalo_engine``.
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
