"""``python -m moxin.run +experiment=eval init_from=...``: evaluation as a Lightning ``test`` run.

Why through Lightning rather than a plain loop: the same hardware profiles then apply unchanged (one GPU with
bf16 autocast, FSDP2 over N GPUs through ``ModelParallelStrategy`` with its device mesh, SLURM / torchrun
launchers), and the model is built, loaded and parallelised by the same ``MoxinStage.configure_model`` as in
training. The one "test batch" is a placeholder; :func:`moxin.eval.runner.evaluate` does the work, with ranks
splitting the items.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from hydra.utils import instantiate

from moxin.assemble import hardware_trainer
from moxin.config import EvalConfig, RunConfig
from moxin.data.base import loader_generator
from moxin.distributed import is_sharded
from moxin.eval.runner import evaluate, flat_metrics, print_table, write_results
from moxin.eval.tasks import eval_config
from moxin.model.hf import hf_to_moxin_config
from moxin.stages.base import MoxinStage
from moxin.tokenizer import Tokenizer, load_tokenizer

__all__ = ["EvalStage", "run_eval", "model_config_for"]


class EvalStage(MoxinStage):
    """Holds the model (built by the base from ``init_from``) and evaluates it in its single test step."""

    def __init__(self, model, eval_cfg: EvalConfig, tokenizer: Tokenizer, out_dir: str | None = None,
                 parallel=None, init_from: str | None = None):
        super().__init__(model=model, parallel=parallel, init_from=init_from, tokenizer=tokenizer)
        self.eval_cfg = eval_config(eval_cfg)
        self.out_dir = out_dir
        self.results: dict | None = None

    def test_dataloader(self):
        return torch.utils.data.DataLoader([0], batch_size=None, generator=loader_generator())

    def test_step(self, batch, batch_idx):
        sharded = is_sharded(self.trainer.strategy) and self.trainer.world_size > 1
        self.results = evaluate(self.model, self.tokenizer, self.eval_cfg, lockstep=sharded)
        self.results["init_from"] = self.init_from
        if self.trainer.is_global_zero:
            if self.out_dir:
                self.results["eval_json"] = str(write_results(self.results, Path(self.out_dir) / "eval.json").resolve())
            if self.logger is not None:
                self.logger.log_metrics(flat_metrics(self.results), step=0)
                self.logger.save()


def model_config_for(cfg):
    """The model config of an eval run: a Hugging Face folder's config.json when init_from is one (the attention
    backend still from ``model``), else the ``model`` group (a .ckpt / .safetensors must match it)."""
    init = RunConfig.from_cfg(cfg).init_from  # eval_only: init_from given and readable (RunConfig checks it)
    model_cfg = instantiate(cfg.model)
    p = Path(str(init))
    if p.is_dir() and (p / "config.json").exists():
        hf = hf_to_moxin_config(json.loads((p / "config.json").read_text()), source=str(p / "config.json"))
        return dataclasses.replace(hf, attn_backend=model_cfg.attn_backend)
    return model_cfg


def run_eval(cfg, tokenizer: Tokenizer | None = None) -> dict:
    """Build the eval stage (``tokenizer``, or loaded from ``cfg.tokenizer``) and a trainer on the config's hardware
    (moxin/assemble.py), run, print, return the results."""
    eval_cfg = eval_config(cfg.eval)  # config errors before any model is built
    model_cfg = model_config_for(cfg)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    stage = EvalStage(model_cfg, eval_cfg, tokenizer=tokenizer, out_dir=str(Path(cfg.out_dir)),
                      parallel=instantiate(cfg.hardware.parallel), init_from=str(cfg.init_from))
    trainer = hardware_trainer(cfg, enable_progress_bar=False)
    trainer.test(stage, verbose=False)
    if trainer.is_global_zero:
        print_table(stage.results, title=f"moxin evaluation of {cfg.init_from}")
        if stage.results.get("eval_json"):
            eval_json = Path(stage.results["eval_json"])
            print(f"results: {eval_json} (table: {eval_json.with_suffix('.md')})")
    return stage.results
