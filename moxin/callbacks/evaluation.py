"""Benchmark evaluation inside a training run: ``+eval=sample eval.after=phase|stage`` runs the tasks of the eval
config (moxin/eval) at the end of every phase or once at the end of the stage, with the same code and numbers as
``python -m moxin.run +experiment=eval``. Results go to the run's loggers (``eval/<task>/<metric>`` at the
current optimizer step), to a printed table, and to ``out_dir/eval.json`` (every evaluation of the run, in order;
a resumed run keeps the earlier launches' evaluations up to the step it resumes from).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning as L

from moxin.config import EvalAfter, MoxinUserError
from moxin.distributed import is_sharded
from moxin.eval.runner import evaluate, flat_metrics, print_table, write_results
from moxin.eval.tasks import eval_config
from moxin.tokenizer import Tokenizer

__all__ = ["EvalCallback"]


class EvalCallback(L.Callback):
    def __init__(self, eval_cfg, tokenizer: Tokenizer, out_dir: str | None = None):
        self.cfg = eval_config(eval_cfg)  # a bad task config stops the run before training
        self.tokenizer = tokenizer  # the run's tokenizer (moxin/assemble.py)
        self.out_dir = out_dir
        self.history: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        # a resumed run: eval.json keeps the earlier launches' evaluations up to the step it resumes from (those
        # after it were made by a launch whose later checkpoints never became last; this launch makes them again)
        self.history = [e for e in self._recorded() if int(e.get("step", 0)) <= trainer.global_step]

    def _recorded(self) -> list[dict]:
        path = Path(self.out_dir) / "eval.json" if self.out_dir else None
        if path is None or not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text()).get("evaluations", []))
        except (OSError, ValueError, AttributeError) as e:
            raise MoxinUserError(f"{path}: cannot read the run's earlier evaluations ({e}); move the file away to "
                                 "start its record afresh") from e

    def on_train_epoch_end(self, trainer, pl_module):
        if self.cfg.after == EvalAfter.phase:
            self.run(trainer, pl_module, f"phase {trainer.current_epoch}")

    def on_train_end(self, trainer, pl_module):
        if self.cfg.after == EvalAfter.stage:
            self.run(trainer, pl_module, "end of stage")

    def run(self, trainer, pl_module, when: str) -> dict:
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
