"""Resumable training checkpoints (written with `mahalo_engine.utils.atomic_files`).

A checkpoint is a directory ``<out>/checkpoints/step-<N>/`` holding ``trainer_model.safetensors``
(the trainable module's full state, float tensors as trained), ``trainer_state.pt`` (optimizer,
scheduler, RNG states, step, and the trainer's own arguments) and, beside them, whatever the
trainer's ``extra`` writes (the trainers export their artefact there: a checkpoint of
``training.mah_dpo`` is a policy directory ``load_policy`` reads, so a run can be evaluated while
it trains). It is written into a temporary directory and renamed into place; ``<out>/checkpoints/latest`` (itself replaced atomically) names the newest
one. A crash at any point leaves the previous checkpoint intact. ``trainer_state.pt`` holds only
tensors and plain Python values and is read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from mahalo_engine.utils.atomic_files import atomic_directory, atomic_write_text
from mahalo_engine.utils.cli import add_debug_flag, run_cli
from mahalo_engine.utils.safetensors_io import load_safetensors


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


MODEL_STATE = "trainer_model.safetensors"  # not model.safetensors: that name is the exported model's
TRAINER_STATE = "trainer_state.pt"


def save_checkpoint(out_dir: str | Path, step: int, model_state: dict[str, torch.Tensor],
                    trainer_state: dict[str, Any], *, keep: int = 1,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``<out_dir>/checkpoints/step-<step>`` atomically, point ``latest`` at it, and keep only
    the newest ``keep`` checkpoints. ``trainer_state`` must hold tensors and plain values only.
    ``extra(dir)`` writes more files into the checkpoint before it is published."""
    from safetensors.torch import save_file

    root = Path(out_dir) / "checkpoints"
    final = root / f"step-{step}"
    with atomic_directory(final) as tmp:
        save_file(_unaliased(model_state), str(tmp / MODEL_STATE), metadata={"step": str(step)})
        torch.save({**trainer_state, "step": step, "rng": rng_state()}, tmp / TRAINER_STATE)
        if extra is not None:
            extra(tmp)
    atomic_write_text(root / "latest", final.name + "\n")
    steps = sorted((int(p.name.split("-", 1)[1]) for p in root.glob("step-*")
                    if p.is_dir() and p.name.split("-", 1)[1].isdigit()), reverse=True)
    for old in steps[keep:]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    return final


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies safetensors accepts: tied weights (one storage, two names) are saved twice."""
    out, seen = {}, set()
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names under ``<out_dir>/checkpoints``, or None if there is none."""
    root = Path(out_dir) / "checkpoints"
    marker = root / "latest"
    if not marker.is_file():
        return None
    path = root / marker.read_text().strip()
    if not (path / MODEL_STATE).is_file() or not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(f"{marker} names {path.name}, which is missing or incomplete")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_state, trainer_state)`` of a checkpoint directory (RNG states not yet applied)."""

    path = Path(path)
    model_state = load_safetensors(path / MODEL_STATE)
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    return model_state, trainer_state


def main(argv: list[str] | None = None) -> int:

    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:

    p = argparse.ArgumentParser(prog="python -m training.checkpoint",
                                description="Show the latest resumable checkpoint of a training "
                                "output directory (what --resume would continue from).")
    p.add_argument("out_dir", type=Path, help="a trainer's --out directory")
    add_debug_flag(p)
    args = p.parse_args(argv)
    ckpt = latest_checkpoint(args.out_dir)
    if ckpt is None:
        print(f"no checkpoint under {args.out_dir / 'checkpoints'}")
        return 1
    model_state, state = load_checkpoint(ckpt)
    n_params = sum(t.numel() for t in model_state.values())
    print(f"{ckpt}: step {state['step']}, {len(model_state)} tensors, {n_params:,} parameters, "
          f"trainer {state.get('trainer', '?')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
