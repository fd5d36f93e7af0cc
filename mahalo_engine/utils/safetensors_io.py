"""Opening safetensors files so that a corrupt or truncated file is an error naming the file.

safetensors reports a damaged file as ``SafetensorError: Error while deserializing header:
incomplete metadata ...`` without a path; every loader of the project opens files through
``open_safetensors`` / ``load_safetensors`` instead, which raise ``ValueError`` with the path.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open


def _corrupt(path: str | Path, e: Exception) -> ValueError:
    return ValueError(f"{path} is corrupt or truncated (not a readable safetensors file: {e}); "
                      f"re-create or re-download it")


@contextlib.contextmanager
def open_safetensors(path: str | Path, device: str | torch.device = "cpu") -> Iterator:
    """``safe_open(path, framework="pt", device=device)``; a damaged file is a ValueError naming
    ``path`` (also when the damage shows while a tensor is read)."""
    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except SafetensorError as e:
        raise _corrupt(path, e) from None
    with handle as h:
        try:
            yield h
        except SafetensorError as e:
            raise _corrupt(path, e) from None


def load_safetensors(path: str | Path, device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (``safetensors.torch.load_file`` with the error above)."""
    with open_safetensors(path, device) as h:
        return {k: h.get_tensor(k) for k in h.keys()}
