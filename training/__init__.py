"""MAHALO training: plain-torch SFT, MAH-DPO and PRM trainers, data readers and label builders.

CLIs: ``python -m training.sft``, ``training.mah_dpo``, ``training.prm``, ``training.labels``,
``training.convert``, ``training.data``, ``training.checkpoint`` (each with ``--help``).
"""
from training.labels import hindsight_targets
from training.losses import mah_dpo_loss

__all__ = ["mah_dpo_loss", "hindsight_targets"]
