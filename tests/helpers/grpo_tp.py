"""GRPO under tensor parallelism 2 (2 gloo processes, one data-parallel rank: Lightning's ModelParallelStrategy), or
the same run on one process: one rollout step of 2 arithmetic prompts x 4 completions of the tiny model, a reward
that varies on a random model (the parity of the completion's length), off-policy updates (2 PPO epochs x 2
minibatches) against a KL reference, the greedy held-out reward before the step and after it. Under TP the
rollout decodes twice from the same weights and generator: through the sharded policy in lockstep and through the
gathered copy (the rollout it trains on); the held-out reward before the step decodes in lockstep, the one after
from the copy. Writes rank 0's history, every rollout's tokens as JSON, the final weights
(gathered) to OUT.weights.pt.

    torchrun --nproc_per_node 2 tests/helpers/grpo_tp.py OUT.json     # TP=2
    torchrun --nproc_per_node 1 tests/helpers/grpo_tp.py OUT.json     # the one-process reference
"""

import json
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

import moxin.rewards as rewards_pkg
from moxin.config.grpo import ShardedRollout
from moxin.data.grpo_data import PromptDataModule
# this script's folder is on sys.path when torchrun runs it
from tiny_grpo import FSDP_GRPO, ParityVerifier, tiny_grpo_stage


def recording_rollouts(stage, record: list):
    """`stage.rollout` replaced: under TP both decode paths, the gathered one returned; each step's tokens kept."""
    real = stage.rollout
    tp = int(os.environ.get("WORLD_SIZE", "1")) > 1

    def rollout(batch, step):
        rec = {}
        for mode in (ShardedRollout.LOCKSTEP, ShardedRollout.GATHER) if tp else (None,):
            if mode is not None:
                stage.cfg.sharded_rollout = mode
            ro = real(batch, step)
            rec[mode.value if mode else "one"] = ro.input_ids.tolist()
        record.append(rec)
        return ro

    stage.rollout = rollout


def main(out_path):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rewards_pkg.VERIFIERS["parity"] = ParityVerifier
    stage, tok = tiny_grpo_stage("parity", **FSDP_GRPO, heldout_every=1, heldout_prompts=4,
                                 sharded_rollout="lockstep")
    dm = PromptDataModule(source="arithmetic", prompts_per_step=2, steps=1, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, world_size=1, task={"pool": 4})
    record = []
    recording_rollouts(stage, record)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2) if world > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strategy, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False)
    trainer.fit(stage, datamodule=dm)
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in stage.model.named_parameters()}
    placements = [str(p.placements) for p in stage.model.parameters() if hasattr(p, "placements")][:1]
    if world == 1 or dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"history": stage.history, "rollouts": record, "steps": trainer.global_step,
                       "placements": placements}, f)
        torch.save(weights, f"{out_path}.weights.pt")


if __name__ == "__main__":
    main(sys.argv[1])
