"""Schemas for the YAML configs, registered in Hydra's ConfigStore, so that Hydra checks overrides at compose time.

Every config node that is instantiated into a dataclass (``model``, ``stage.optim``, ``stage.grpo``,
``hardware.parallel``) or read into one (``eval``) names its schema first in its defaults list, the way Hydra's
"Structured Configs / Extending Configs" documents it::

Details: docs/modules.md, "config/schema.py".
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore

from moxin.config.eval import EvalConfig
from moxin.config.grpo import GRPOConfig
from moxin.config.lora import LoRAConfig
from moxin.config.model import ModelConfig
from moxin.config.optim import OptimConfig
from moxin.config.parallel import ParallelConfig

# Types OmegaConf 2.3 validates as they are; anything else is mapped by _omegaconf_type.
_PRIMITIVES = (int, float, bool, str)


def _omegaconf_type(tp: Any) -> Any:
    """The nearest type OmegaConf 2.3 accepts for a dataclass field's type.

    - ``X | None`` (PEP 604, which OmegaConf 2.3 does not read) -> ``Optional[X]``.
    - StrEnum (``Aggregation``, ``EvalAfter``, ...) -> ``str``: OmegaConf would match the YAML value against the
      member *names* (``TOKEN``) and put enum objects into the composed config; the dataclass parses the value
      (``parse_option``) and names the allowed choices.
    - bare ``list`` / ``dict`` -> ``List[Any]`` / ``Dict[str, Any]``; ``tuple[float, float]`` -> ``Tuple[float, float]``.
    - anything else OmegaConf cannot type (``Any``, other unions, classes) -> ``Any`` (no check at compose time).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = _omegaconf_type(rest[0])
            return Any if inner is Any else Optional[inner]
        return Any
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return str if issubclass(tp, str) else tp
    if tp in _PRIMITIVES:
        return tp
    if tp is list:
        return List[Any]
    if tp is dict:
        return Dict[str, Any]
    if origin is list and len(args) == 1:
        inner = _omegaconf_type(args[0])
        return List[inner] if inner in _PRIMITIVES else List[Any]
    if origin is tuple and args and all(a in _PRIMITIVES for a in args):
        return Tuple[args]
    if origin is dict:
        return Dict[str, Any]
    return Any


def _default(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory)
    value = f.default
    if isinstance(value, enum.Enum):  # StrEnum defaults as their value (the field is typed str above)
        value = value.value
    return dataclasses.field(default=value)  # MISSING stays MISSING: a required field (??? in the config)


def schema_of(cls: type, *, target: bool = True, exclude: tuple[str, ...] = ()) -> type:
    """A dataclass OmegaConf can type a config node with: ``cls``'s init fields (name, OmegaConf-typed type,
    default), minus ``exclude``, with ``_target_: str`` first when the node is instantiated (``target``)."""
    hints = typing.get_type_hints(cls)
    fields: list = []
    if target:
        fields.append(("_target_", str, dataclasses.field(default=f"moxin.config.{cls.__qualname__}")))
    for f in dataclasses.fields(cls):
        if f.init and f.name not in exclude:
            fields.append((f.name, _omegaconf_type(hints[f.name]), _default(f)))
    schema = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
    schema.__module__ = __name__  # the classes are this module's names below, so a composed config pickles
    return schema


ModelConfigSchema = schema_of(ModelConfig)  # conf/model/*.yaml
OptimConfigSchema = schema_of(OptimConfig)  # conf/stage/*.yaml, optim
GRPOConfigSchema = schema_of(GRPOConfig)  # conf/stage/grpo.yaml, grpo
LoRAConfigSchema = schema_of(LoRAConfig)  # conf/stage/*.yaml, lora
ParallelConfigSchema = schema_of(ParallelConfig)  # conf/hardware/{cpu,gpu,fsdp}.yaml, parallel
# conf/eval/*.yaml: read by EvalConfig.from_any (no _target_); tasks stay an untyped list (their keys depend on the
# task's kind; TaskConfig checks them)
EvalConfigSchema = schema_of(EvalConfig, target=False)

SCHEMAS = {"schema_model": ModelConfigSchema, "schema_optim": OptimConfigSchema, "schema_grpo": GRPOConfigSchema,
           "schema_lora": LoRAConfigSchema,
           "schema_parallel": ParallelConfigSchema, "schema_eval": EvalConfigSchema}


def register() -> None:
    """Store every schema in Hydra's ConfigStore under its name (idempotent: storing again replaces the entry)."""
    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        cs.store(name=name, node=node)


register()
