"""The run's loggers: CSV always (the notebook, the sweep summary and `summary.json` read it), plus any of
W&B and TensorBoard (`logger=[csv,wandb,tensorboard]`). Each `conf/logger/NAME.yaml` is packaged under
`logger.NAME`, so a list of names composes into one mapping.

A logger whose package is missing stops the run before any work with the pip command, instead of an
ImportError from inside Lightning.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from moxin.config import ConfigError

#: the module each logger needs, and how to get it
REQUIRES = {"wandb": ("wandb", "pip install wandb"),
            "tensorboard": ("tensorboard", 'pip install tensorboard (or pip install -e ".[tensorboard]")')}
CSV = {"_target_": "lightning.pytorch.loggers.CSVLogger", "name": "logs"}


def check_loggers(cfg: DictConfig) -> None:
    for name in (cfg.get("logger") or {}):
        mod, fix = REQUIRES.get(name, (None, None))
        if mod and importlib.util.find_spec(mod) is None:
            raise ConfigError(f"logger={name}: the {mod!r} package is not installed; {fix}, or drop it from logger=[...]")


def build_loggers(cfg: DictConfig, out_dir: Path) -> list:
    """CSV first (Lightning's `trainer.logger` is the first one: metrics.csv's folder names the version)."""
    chosen = dict(cfg.get("logger") or {})
    csv = chosen.pop("csv", None) or CSV
    loggers = [instantiate(csv, save_dir=str(out_dir))]
    for name, spec in chosen.items():
        loggers.append(instantiate(spec, save_dir=str(out_dir)))
    return loggers
