"""TrainerConfig (``trainer.*``) and RunConfig (the top-level keys of conf/config.yaml): the run's own settings,
checked once here, before any work (``RunConfig.from_cfg``: moxin.errors.preflight and the run's build call it).

No Hydra schema types ``trainer``: a wrong type there is named here with the fix (``trainer.max_steps=abc`` arrives
as a string), as a one-line user error, rather than as Hydra's composition error.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moxin.config.data import plain
from moxin.config.errors import ConfigError, InitFromError

__all__ = ["TrainerConfig", "RunConfig", "check_init_from", "PROGRESS_BARS", "INIT_FROM_MARKERS"]

PROGRESS_BARS = ("rich", "rich_always", "plain", "none")

#: what moxin.checkpoint.weights.load_model_weights reads in a folder: a HF folder, a distributed checkpoint (an FSDP
#: run's last.ckpt is such a folder), a checkpoints folder, a run folder or a PEFT adapter
INIT_FROM_MARKERS = ("config.json", ".metadata", "last.ckpt", "checkpoints/last.ckpt", "adapter_config.json")


def _example(value: str):
    """A field's metadata: an override that fixes it, for the message naming a value of the wrong type."""
    return {"example": value}


def _accepted(tp: Any) -> tuple:
    """The run-time types a field's annotation accepts (``int | None`` -> (int, NoneType))."""
    args = typing.get_args(tp)
    return args if args else (tp,)


def _type_names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


@dataclass
class TrainerConfig:
    """How the run trains, checkpoints, validates and reports (``trainer.*``; conf/config.yaml says what each
    does)."""

    checkpoint_every_n_steps: int = field(default=25, metadata=_example("25"))
    keep_checkpoints: int = field(default=1, metadata=_example("3"))
    keep_all_checkpoints: bool = field(default=False, metadata=_example("true"))
    save_checkpoints: bool = field(default=True, metadata=_example("false"))
    async_checkpoint: bool = field(default=False, metadata=_example("true"))
    """FSDP2's distributed checkpoints written in the background (moxin/checkpoint/async_save.py): a save costs the
    step only the copy of the shards to host memory; ``last`` still moves only once the save is complete."""
    max_nonfinite_steps: int = field(default=5, metadata=_example("5"))
    """Optimizer steps with a NaN/Inf loss or gradient norm are skipped (weights, optimizer moments untouched)
    and counted (``train/nonfinite_steps``); this many in a row stop the run with an error."""
    val_every_n_steps: int | None = field(default=25, metadata=_example("25 (or null)"))
    max_steps: int = field(default=-1, metadata=_example("100"))
    limit_val_batches: int | float = field(default=1.0, metadata=_example("1.0"))
    progress_bar: str = field(default="rich", metadata=_example("plain"))
    progress_every_n_steps: int = field(default=10, metadata=_example("10"))
    deterministic: bool = field(default=False, metadata=_example("true"))

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            v, types = getattr(self, f.name), _accepted(hints[f.name])
            if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
                raise ConfigError(f"trainer.{f.name}={v!r}: expected {_type_names(types)}, got {type(v).__name__}. "
                                  f"Fix the override, e.g. trainer.{f.name}={f.metadata['example']}")
        if self.progress_bar not in PROGRESS_BARS:
            raise ConfigError(f"trainer.progress_bar={self.progress_bar!r}: use one of {', '.join(PROGRESS_BARS)}")
        if self.progress_every_n_steps < 1:
            raise ConfigError(f"trainer.progress_every_n_steps={self.progress_every_n_steps}: must be at least 1")
        problems = []
        for key in ("checkpoint_every_n_steps", "keep_checkpoints", "val_every_n_steps"):
            v = getattr(self, key)
            if v is not None and v < 1:
                problems.append(f"trainer.{key}={v!r} must be an integer >= 1 or null")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"trainer.max_steps={self.max_steps!r} must be -1 (the whole schedule) or an integer >= 1")
        lv = self.limit_val_batches
        if not math.isfinite(lv) or lv < 0 or (isinstance(lv, float) and lv > 1):
            problems.append(f"trainer.limit_val_batches={lv!r} must be a fraction in [0, 1] or a whole number of "
                            "batches")
        if self.max_nonfinite_steps < 1:
            problems.append(f"trainer.max_nonfinite_steps={self.max_nonfinite_steps!r} must be an integer >= 1")
        if problems:
            raise ConfigError("; ".join(problems))


def check_init_from(init: str | os.PathLike) -> None:
    """``init_from`` names weights that exist: a file, or a folder holding one of INIT_FROM_MARKERS (the one place
    this is checked: RunConfig for a run, moxin.checkpoint.weights.load_model_weights for any other caller)."""
    p = Path(str(init))
    if not p.exists():
        hint = ""
        if p.name == "last.ckpt" and p.parent.parent.exists():
            hint = f" ({p.parent.parent} exists but has no checkpoints/last.ckpt: did that run finish a step?)"
        raise InitFromError(f"init_from={str(init)!r}: no such file or folder (cwd {os.getcwd()}){hint}. Give a "
                            f"moxin run's checkpoints/last.ckpt, a Hugging Face MistralForCausalLM folder (its hf/ "
                            f"export) or a .safetensors file")
    if p.is_dir() and not any((p / name).exists() for name in INIT_FROM_MARKERS):
        raise InitFromError(f"init_from={str(init)!r} is a folder without config.json (Hugging Face), .metadata (an "
                            f"FSDP run's distributed checkpoint) or last.ckpt; point it at "
                            f"runs/<name>/checkpoints/last.ckpt or runs/<name>/hf")


@dataclass
class RunConfig:
    """The top-level keys of a run (conf/config.yaml says what each does). ``init_from`` must name weights that
    exist; ``+experiment=eval`` (``eval_only``) needs one. ``run_name`` and ``out_dir`` are not read here: they are
    interpolations Hydra resolves inside its job (``${hydra:job.name}``), and no rule applies to them."""

    seed: int = 1234
    resume: Any = None
    """null (a fresh run), auto, or a checkpoint path."""
    init_from: str | None = None
    tokenizer: str = "mistral"
    monitor: str | None = "val/loss"
    export_hf: bool = True
    eval_only: bool = False
    trainer: TrainerConfig = field(default_factory=TrainerConfig)

    def __post_init__(self):
        if isinstance(self.trainer, dict):
            known = {f.name for f in dataclasses.fields(TrainerConfig)}
            self.trainer = TrainerConfig(**{k: v for k, v in self.trainer.items() if k in known})
        if self.resume not in (None, "", False, "auto") and not isinstance(self.resume, str):
            raise ConfigError(f"resume={self.resume!r}: use null, auto or a path to a .ckpt")
        if self.eval_only and not self.init_from:
            raise ConfigError("+experiment=eval needs init_from=<a Hugging Face model folder, a run's hf/ folder, a "
                              "moxin .ckpt or a .safetensors file>; nothing was evaluated")
        if self.init_from:
            check_init_from(self.init_from)

    @classmethod
    def from_cfg(cls, cfg: Any) -> "RunConfig":
        """The run's settings from a composed config (a DictConfig or a mapping); the other nodes (model, data,
        stage, ...) are left to their own dataclasses. Unknown keys are moxin.errors.check_keys's to name."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: plain(cfg[k]) for k in cfg if k in known})
