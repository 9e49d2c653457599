"""GRPO rollouts under FSDP2 with 2 gloo processes (torchrun): at every rollout step each rank decodes its prompts
twice from the same weights and generator seed, through the gathered copy (`sharded_rollout: gather`) and through
the sharded model in lockstep (`lockstep`), then trains on the gathered rollout. Writes to OUT (JSON, rank 0) every
rank's prompts and both token lists per step, what generate was handed (copy or policy, lockstep), whether the
copy's memory was freed after the rollout, and the history; the policy's full weights at each rollout to
OUT.step<N>.pt, for the one-process reference (tests/test_grpo_rollout_fsdp.py)."""

import json
import sys

import torch
import torch.distributed as dist

import moxin.rewards as rewards_pkg
import moxin.stages.grpo as grpo_mod
from moxin.config.grpo import ShardedRollout
from moxin.data.grpo_data import PromptDataModule
# this script's folder is on sys.path when torchrun runs it
from tiny_grpo import ParityVerifier, fsdp2_cpu_trainer, tiny_grpo_stage


def main(out_path):
    rewards_pkg.VERIFIERS["parity"] = ParityVerifier
    stage, tok = tiny_grpo_stage("parity", max_new_tokens=8, micro_batch_size=4)
    dm = PromptDataModule(source="arithmetic", prompts_per_step=4, steps=2, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, world_size=2)
    calls, real_generate, real_rollout = [], grpo_mod.generate, stage.rollout
    grpo_mod.generate = lambda m, *a, **kw: calls.append((m, kw)) or real_generate(m, *a, **kw)
    steps = []

    def rollout(batch, step):
        weights = {n: p.full_tensor() for n, p in stage.model.named_parameters()}  # collective: every rank
        if dist.get_rank() == 0:
            torch.save(weights, f"{out_path}.step{step}.pt")
        rec = {"prompts": [r["prompt_ids"] for r in batch]}
        for mode in (ShardedRollout.LOCKSTEP, ShardedRollout.GATHER):
            stage.cfg.sharded_rollout = mode
            calls.clear()
            ro = real_rollout(batch, step)
            rec[mode.value] = {"input_ids": ro.input_ids.tolist(), "lengths": ro.lengths.tolist(),
                               "policy": [m is stage.model for m, _ in calls],
                               "lockstep": [kw["lockstep"] for _, kw in calls],
                               "refresh_s": ro.stats["refresh_s"]}
        copy = stage.__dict__["_rollout_copy"]
        rec["copy_freed"] = not grpo_mod.copy_allocated(copy)
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rec)
        steps.append(ranks)
        return ro

    stage.rollout = rollout
    trainer = fsdp2_cpu_trainer()
    trainer.fit(stage, datamodule=dm)
    if trainer.is_global_zero:
        with open(out_path, "w") as f:
            json.dump({"steps": steps, "history": stage.history}, f)


if __name__ == "__main__":
    main(sys.argv[1])
