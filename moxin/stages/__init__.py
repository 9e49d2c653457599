"""LightningModules over the shared model core: pretrain, sft, dpo, grpo."""

from moxin.stages.base import MoxinStage, StepLoss
from moxin.stages.pretrain import PretrainStage

__all__ = ["MoxinStage", "StepLoss", "PretrainStage"]
