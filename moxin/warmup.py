"""The SFT warm-up before a run: a fresh model learns the task's answer form from worked solutions before RL.

``warmup.steps > 0`` (conf/config.yaml) makes one ``python -m moxin.run`` command two ordinary runs, one after the
other, under the command's run lock:

Details: docs/modules.md, "warmup.py".
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from moxin.assemble import connected_datamodule, say, world_size_of
from moxin.checkpoint.resume import find_resume
from moxin.config import ConfigError
from moxin.paths import conf_dir  # importing it registers the stage's schemas (optim, lora) that compose() needs
from moxin.tokenizer import Tokenizer
from moxin.ui import run_log

__all__ = ["SOLUTIONS", "warmup_dir", "warmup_config", "write_solutions", "finished_checkpoint", "run_warmup"]

SOLUTIONS = "solutions.jsonl"


def warmup_dir(cfg: DictConfig) -> Path:
    return Path(cfg.out_dir) / "warmup"


def compose_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml composed with ``overrides``: through the running app's Hydra under ``python -m moxin.run``
    (its config tree), else through one started on moxin's conf/ for the call (a run started from Python)."""
    if GlobalHydra.instance().is_initialized():
        return compose("config", overrides=overrides)
    with initialize_config_dir(str(conf_dir()), version_base=None):
        return compose("config", overrides=overrides)


def warmup_config(cfg: DictConfig) -> DictConfig:
    """The warm-up's own run config: the command's config with the SFT stage (its optimizer merged with
    ``warmup.optim``, the command's LoRA settings) and SFT data on the written solutions, composed by Hydra from
    ``stage=sft data=sft_sample``; ``out_dir=<out_dir>/warmup`` and no warm-up of its own."""
    w = cfg.warmup
    wdir = warmup_dir(cfg)
    # null: each rank takes its whole share of the batch at once (batch_size / processes), so one setting serves one
    # process and FSDP alike; a batch that does not split over the processes is refused by the data module
    mbs = w.get("micro_batch_size") or max(1, int(w.batch_size) // world_size_of(cfg.hardware))
    sft = compose_config([
        "stage=sft", "stage.validate_at_start=false",
        "data=sft_sample", "data.val=null", f"data.max_length={int(w.max_length)}",
        f"data.batch_size={int(w.batch_size)}", f"data.micro_batch_size={int(mbs)}", "data.num_epochs=1",
        "data.num_workers=0", "data.pad_to_multiple_of=8", "data.max_bad_records=0", "data.max_bad_fraction=0.0",
    ])
    # the path as a value, not an override (any character may be in it); the command's LoRA settings too: a model
    # that needs adapters to fit needs them for its warm-up as well
    sft.data.train = {"name": "warmup_solutions", "path": str(wdir / SOLUTIONS)}
    stage = OmegaConf.merge(sft.stage, {"optim": w.get("optim") or {}, "lora": cfg.stage.get("lora") or {}})
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.run_name = f"{cfg.run_name}-warmup"
        out.out_dir = str(wdir)
        out.resume = "auto" if cfg.get("resume") not in (None, "", False) else None
        out.stage = stage
        out.data = sft.data
        out.warmup.steps = 0
        out.export_hf = False
        out.monitor = "train/loss"
        out.samples.prompts = []
        if out.get("eval") is not None:
            out.eval = None
        out.trainer.max_steps = -1  # trainer.max_steps is the command's run's (GRPO's) limit, not the warm-up's
        out.trainer.val_every_n_steps = None
    return out


def write_solutions(cfg: DictConfig, path: Path, tokenizer: Tokenizer) -> int:
    """Write ``warmup.steps x warmup.batch_size`` solution conversations of the command's data as a chat jsonl
    (atomically: every rank may write the same bytes). Returns how many."""
    n = int(cfg.warmup.steps) * int(cfg.warmup.batch_size)
    dm = connected_datamodule(cfg, tokenizer, max_seq_len=OmegaConf.select(cfg, "model.max_seq_len"))
    if not hasattr(dm, "solution_conversations"):
        raise ConfigError(f"warmup.steps={cfg.warmup.steps}: the data module {type(dm).__name__} has no worked "
                          "solutions to warm up on (GRPO's prompt data has); set warmup.steps=0")
    convs = dm.solution_conversations(n)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for c in convs:
            fh.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(convs)


def finished_checkpoint(wcfg: DictConfig) -> str | None:
    """The warm-up's final checkpoint when it has run to its end (the whole schedule, saved at its end), else None."""
    info, _ = find_resume(wcfg.out_dir)
    if info is None or not info.moxin.get("finished"):
        return None
    total = info.moxin.get("total_steps")
    if total is not None and info.step < int(total):
        return None
    return str(info.path.resolve())


def run_warmup(cfg: DictConfig, tokenizer: Tokenizer, train: Callable[[DictConfig], dict]
               ) -> tuple[DictConfig, dict | None]:
    """Run (or resume, or skip when finished) the warm-up of ``cfg``: its solutions are written with the command's
    ``tokenizer``, and ``train(warm-up config)`` runs it (moxin.run's train, handed that same tokenizer).

    Returns the command's config to go on with (``init_from`` = the warm-up's final checkpoint; ``cfg`` itself when
    ``warmup.steps`` is 0), and the warm-up's summary when it stopped early (a signal): then nothing else runs.
    """
    w = cfg.get("warmup")
    if not w or not int(w.get("steps") or 0):
        return cfg, None
    wcfg = warmup_config(cfg)
    ckpt = finished_checkpoint(wcfg) if wcfg.resume else None
    if ckpt is not None:
        say(f"warm-up: done ({ckpt}); not run again")
    else:
        n = write_solutions(cfg, Path(wcfg.out_dir) / SOLUTIONS, tokenizer)
        say(f"warm-up: SFT on {n} solutions ({w.steps} steps of {w.batch_size}) in {Path(wcfg.out_dir).resolve()}, "
            f"then the run starts from its final weights")
        try:
            info = train(wcfg)
        finally:
            run_log().close()  # the warm-up's log file; the run itself opens its own
        if info.get("stopped_by_signal_at") is not None:
            return cfg, info
        ckpt = finished_checkpoint(wcfg)
        if ckpt is None:
            raise ConfigError(f"warm-up in {wcfg.out_dir} ended without its final checkpoint; continue it with "
                              "resume=auto")
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.init_from = ckpt
    return out, None
