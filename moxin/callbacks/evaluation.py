"""Benchmark evaluation inside a training run: ``+eval=sample eval.after=phase|stage`` runs the tasks of the eval
config (moxin/eval) at the end of every phase or once at the end of the stage, with the same code and numbers as
``python -m moxin.run +experiment=eval``. Results go to the run's loggers (``eval/<task>/<metric>`` at the
current optimizer step), to a printed table, and to ``out_dir/eval.json`` (every evaluation of the run, in order).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import lightning as L

from moxin.eval.runner import EvalAfter, EvalConfig, evaluate, flat_metrics, print_table, write_results
from moxin.distributed import is_sharded
from moxin.tokenizer import as_tokenizer

__all__ = ["EvalCallback"]


class EvalCallback(L.Callback):
    def __init__(self, eval_cfg, tokenizer="mistral", out_dir: str | None = None):
        self.cfg = EvalConfig.from_any(eval_cfg)  # a bad task config stops the run before training
        self.tokenizer = tokenizer  # the run's tokenizer (moxin.run), or a spec loaded on first use
        self.out_dir = out_dir
        self.history: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        if self.cfg.after == EvalAfter.phase:
            self.run(trainer, pl_module, f"phase {trainer.current_epoch}")

    def on_train_end(self, trainer, pl_module):
        if self.cfg.after == EvalAfter.stage:
            self.run(trainer, pl_module, "end of stage")

    def run(self, trainer, pl_module, when: str) -> dict:
        self.tokenizer = as_tokenizer(self.tokenizer)
        sharded = is_sharded(trainer.strategy) and trainer.world_size > 1
        plugin = getattr(trainer, "precision_plugin", None)
        ctx = plugin.forward_context() if plugin is not None else contextlib.nullcontext()
        with ctx:  # the run's precision (bf16 autocast with hardware=gpu)
            res = evaluate(pl_module.model, self.tokenizer, self.cfg, lockstep=sharded)
        res.update(when=when, step=trainer.global_step)
        self.history.append(res)
        if trainer.is_global_zero:
            if self.out_dir:
                write_results({"evaluations": self.history}, Path(self.out_dir) / "eval.json")
            print_table(res, title=f"moxin evaluation ({when}, step {trainer.global_step})")
            if trainer.logger is not None:
                trainer.logger.log_metrics(flat_metrics(res), step=trainer.global_step)
        return res
