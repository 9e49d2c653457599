"""Compose a run's config the way `python -m moxin.run` does (conf/ with overrides, no Hydra run folder), and read
back the training losses a run logged."""

from __future__ import annotations

import csv
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from moxin import run as R


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(R.CONF_DIR, version_base=None):
        return compose("config", overrides=overrides, return_hydra_config=False)


def logged_train_losses(out_dir: Path) -> dict[int, float]:
    """{step: train/loss} from every launch's metrics.csv under `out_dir`/logs."""
    out = {}
    for f in sorted(out_dir.glob("logs/version_*/metrics.csv")):
        for r in csv.DictReader(open(f)):
            if r.get("train/loss"):
                out[int(r["step"])] = float(r["train/loss"])
    return out
