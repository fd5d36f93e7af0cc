"""MAHALO training: plain-torch SFT, MAH-DPO and PRM trainers, data readers and label builders.

CLIs: ``python -m training.sft``, ``training.mah_dpo``, ``training.prm``, ``training.labels``,
``training.convert``, ``training.data``, ``training.checkpoint`` (each with ``--help``).
"""
from training.losses import mah_dpo_loss

__all__ = ["mah_dpo_loss", "hindsight_targets"]


def __getattr__(name: str):
    if name == "hindsight_targets":
        # Imported on first use so that `python -m training.labels` does not import its own
        # module twice (once through this package, once as __main__).
        from training.labels import hindsight_targets

        return hindsight_targets
    raise AttributeError(f"module 'training' has no attribute {name!r}")
