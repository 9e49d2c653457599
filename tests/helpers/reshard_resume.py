"""A tiny FSDP2 pretraining run (gloo, launched by torchrun on any process count) through `assemble`, recording for
every optimizer step the rows every rank trained on (a hash of each row's tokens, gathered from all ranks) and the
step's loss, to OUT (JSON, written by rank 0). Used by tests/test_reshard_resume.py: a run resumed on another
process count must consume the straight run's rows step for step.

usage: reshard_resume.py OUT_JSON OUT_DIR MAX_STEPS [RESUME_PATH] [NUM_WORKERS]"""

import hashlib
import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist

from moxin.assemble import assemble
from compose import compose_config  # this script's folder is on sys.path when torchrun runs it
from tiny_overrides import TINY_PRETRAIN, replaced


class RecordRows(L.Callback):
    """Per optimizer step: the sorted hashes of every row all ranks consumed, and the logged loss."""

    def __init__(self):
        self.rows: list[str] = []
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        ids = batch["input_ids"].cpu()
        self.rows += [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in ids]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        rows = [self.rows]
        if dist.is_initialized():
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, self.rows)
        self.rows = []
        self.steps.append({"step": trainer.global_step, "rows": sorted(r for rk in rows for r in rk),
                           "loss": float(trainer.callback_metrics["train/loss"])})


def main(out_json, out_dir, max_steps, resume=None, num_workers="0"):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    overrides = replaced(TINY_PRETRAIN, "trainer.checkpoint_every_n_steps=3", f"hardware.num_workers={num_workers}",
                         "trainer.val_every_n_steps=null", "data.val_tokens=0",
                         "schedule.micro_batch_tokens=128")  # 4 micro-batches a step: 1, 2 or 4 processes
    overrides += ["hardware=fsdp_cpu", f"hardware.devices={world}", f"trainer.max_steps={max_steps}",
                  "trainer.keep_all_checkpoints=true", f"out_dir={out_dir}", "run_name=run"]
    if resume:
        overrides.append(f"resume={resume}")
    run = assemble(compose_config(overrides))
    rec = RecordRows()
    run.trainer.callbacks.append(rec)
    run.trainer.fit(run.stage, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    if run.trainer.is_global_zero:
        with open(out_json, "w") as f:
            json.dump({"world": world, "accumulate": run.trainer.accumulate_grad_batches, "steps": rec.steps}, f)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(*sys.argv[1:])
