"""LightningModules over the shared model core: pretrain, sft, dpo, grpo."""

from moxin.stages.base import MoxinStage, OptimConfig, StepLoss
from moxin.stages.pretrain import PretrainStage

__all__ = ["MoxinStage", "OptimConfig", "StepLoss", "PretrainStage"]
