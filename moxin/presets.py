"""The model presets: ``conf/model/<name>.yaml``, the one place they are stated (``model=<name>`` on the command
line picks the same file; Hydra checks them against ModelConfig's fields, moxin/config/schema.py).

- ``moxin-7b``: Moxin-7B exactly as published (Mistral-7B extended to 36 blocks).
- ``mistral-7b``: the same shape with 32 blocks.
- ``tiny``: a few hundred thousand parameters, for unit tests (vocab 512, window 16).
- ``tiny-cpu``: the default run's model: the real 32000-entry vocabulary, 4 small blocks, window 256.

Kept out of ``moxin.config`` (a leaf that reads no files) and out of the model core (which does not read conf/):
code outside a Hydra run (tests, scripts, notebooks) reads a preset here.
"""

from __future__ import annotations

import dataclasses

import yaml

from moxin.config import ModelConfig
from moxin.paths import conf_dir

__all__ = ["load_preset", "preset_names"]


def preset_names() -> list[str]:
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def load_preset(name: str, **overrides) -> ModelConfig:
    """The model of ``conf/model/<name>.yaml`` with ``overrides`` replaced."""

    def fields_of(preset: str) -> dict:
        path = conf_dir() / "model" / f"{preset}.yaml"
        if not path.is_file():
            raise KeyError(f"unknown model preset {preset!r}; choose one of {preset_names()} (files in {path.parent})")
        own = yaml.safe_load(path.read_text()) or {}
        out: dict = {}
        for parent in own.pop("defaults", []):  # Hydra's `defaults: [other_preset, _self_]` in a model file
            if parent != "_self_" and not parent.startswith("/schema_"):  # the schema: ModelConfig itself
                out.update(fields_of(parent))
        own.pop("_target_", None)
        return out | own

    return dataclasses.replace(ModelConfig(**fields_of(name)), **overrides)
