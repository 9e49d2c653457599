"""Every config dataclass and option of moxin, in one leaf package: it imports nothing of moxin outside itself (no
model, stage, data or Lightning code), so the implementations import it, never the other way round.

Each rule about a value is checked once, in its dataclass (``__post_init__``); Hydra's schemas for the YAML nodes
are made from these dataclasses (:mod:`moxin.config.schema`, registered when ``moxin.paths`` is imported). User
mistakes raise a :class:`MoxinUserError` (:mod:`moxin.config.errors`).
"""

from moxin.config.data import DecontaminateConfig, SourceConfig, config_fields, plain
from moxin.config.errors import ConfigError, DataError, EvalConfigError, InitFromError, MoxinUserError
from moxin.config.eval import TASK_PRESETS, EvalConfig, TaskConfig, TaskPreset, task_from_any
from moxin.config.grpo import GRPOConfig
from moxin.config.lora import LoRAConfig
from moxin.config.model import ModelConfig
from moxin.config.optim import OptimConfig
from moxin.config.options import (Aggregation, ContaminatedAction, DecodePath, DPOLoss, EvalAfter, FewshotSampler,
                                  Float8Recipe, GradientSync, KLEstimator, Recompute, ReduceDtype, ReferenceMode,
                                  TaskKind, parse_option)
from moxin.config.parallel import ParallelConfig, check_tensor_parallel
from moxin.config.run import RunConfig, TrainerConfig, check_init_from

__all__ = ["ModelConfig", "OptimConfig", "GRPOConfig", "LoRAConfig", "ParallelConfig", "EvalConfig", "TaskConfig",
           "TaskPreset", "TASK_PRESETS", "task_from_any", "SourceConfig", "DecontaminateConfig", "TrainerConfig",
           "RunConfig", "check_init_from", "parse_option", "DPOLoss", "KLEstimator", "Aggregation", "ReferenceMode",
           "Recompute", "Float8Recipe", "DecodePath", "EvalAfter", "TaskKind", "FewshotSampler", "ContaminatedAction",
           "MoxinUserError", "ConfigError", "DataError", "EvalConfigError", "InitFromError", "plain", "config_fields",
           "check_tensor_parallel"]
