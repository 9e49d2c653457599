"""A tiny FSDP2 run (gloo, launched by torchrun on any process count) through `assemble`, recording for every
optimizer step the rows every rank trained on (a hash of each row's tokens, gathered from all ranks) and the step's
loss, to OUT (JSON, written by rank 0). Used by tests/test_reshard_resume.py: a run resumed on another process
count must consume the straight run's rows step for step. STAGE: pretrain (two phases), sft or dpo (two epochs of
the sample sets), grpo (the arithmetic task's prompts; its loss depends on each rank's sampling, so only the
prompts are compared).

usage: reshard_resume.py OUT_JSON OUT_DIR MAX_STEPS [RESUME_PATH] [NUM_WORKERS] [STAGE]"""

import hashlib
import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist

from moxin.assemble import assemble
from compose import compose_config  # this script's folder is on sys.path when torchrun runs it
from tiny_overrides import TINY_MODEL, TINY_PRETRAIN, replaced

#: the post-training stages shrunk to seconds: SFT 5 steps an epoch (160 conversations, 32 a step, 4 a micro-batch),
#: DPO 6 steps an epoch (218 pairs, 32 a step, 2 a micro-batch), GRPO 4 prompts x 2 samples a step
POST = TINY_MODEL + ["trainer.val_every_n_steps=null", "samples.prompts=[]", "trainer.progress_bar=none",
                     "trainer.checkpoint_every_n_steps=3", "export_hf=false"]
STAGES = {
    "sft": POST + ["+experiment=sft", "data.max_length=128", "data.batch_size=32", "data.micro_batch_size=4",
                   "data.num_epochs=2"],
    "dpo": POST + ["+experiment=dpo", "data.max_length=128", "data.batch_size=32", "data.micro_batch_size=2",
                   "data.num_epochs=2"],
    "grpo": POST + ["+experiment=grpo", "warmup.steps=0", "data.prompts_per_step=4", "data.steps=12",
                    "stage.grpo.group_size=2", "stage.grpo.max_new_tokens=4", "stage.grpo.micro_batch_size=8",
                    "stage.grpo.filter_zero_std=false", "stage.grpo.verifier_workers=0",  # an update every step
                    "stage.grpo.ppo_epochs=1", "stage.grpo.num_minibatches=1"],  # one optimizer step a rollout
}


class RecordRows(L.Callback):
    """Per optimizer step: the sorted hashes of every row all ranks consumed, and the logged loss."""

    def __init__(self):
        self.rows: list[str] = []
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if isinstance(batch, list):  # GRPO: the step's prompts
            rows = [torch.tensor(r["prompt_ids"]) for r in batch]
        else:
            rows = (batch["input_ids"] if "input_ids" in batch else batch["pair_index"].reshape(-1, 1)).cpu()  # DPO: pairs
        self.rows += [hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in rows]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        rows = [self.rows]
        if dist.is_initialized():
            rows = [None] * dist.get_world_size()
            dist.all_gather_object(rows, self.rows)
        self.rows = []
        loss = trainer.callback_metrics.get("train/loss")
        self.steps.append({"step": trainer.global_step, "rows": sorted(r for rk in rows for r in rk),
                           "loss": None if loss is None else float(loss)})


def main(out_json, out_dir, max_steps, resume=None, num_workers="0", stage="pretrain"):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if stage != "pretrain":
        overrides = replaced(STAGES[stage], f"hardware.num_workers={num_workers}")
        if stage == "dpo":  # the reference log-probs' cache, shared by the straight and the resumed run
            overrides.append(f"stage.ref_cache_dir={os.path.dirname(os.path.abspath(out_dir))}/../refcache")
    else:
        overrides = replaced(TINY_PRETRAIN, "trainer.checkpoint_every_n_steps=3",
                             f"hardware.num_workers={num_workers}", "trainer.val_every_n_steps=null",
                             "data.val_tokens=0",
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
