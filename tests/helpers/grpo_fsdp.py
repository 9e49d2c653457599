"""GRPO under FSDP2 with 2 processes (torchrun), two rollout steps. Writes rank 0's JSON to OUT.

- Ranks that keep different numbers of sequences: rank 1's rewards are all equal (every group filtered), rank 0's
  vary. Off-policy updates (2 epochs x 2 minibatches) and a KL reference make every forward collective: old
  log-probs, policy, reference (before the old-log-prob forwards were kept in step this hung).
- Rollouts: at every step each rank decodes its prompts twice from the same weights and generator seed, through
  the sharded model in lockstep (`sharded_rollout: lockstep`) and through the gathered copy (`gather`, whose
  rollout the update trains on). Recorded: every rank's prompts, both paths' tokens, what generate was handed
  (copy or policy, lockstep), whether the copy's memory was freed afterwards; the policy's full weights at each
  rollout go to OUT.step<N>.pt for the one-process reference.
Used by tests/test_grpo_rollout_fsdp.py (gloo), and by tests/test_gpu.py on 2 GPUs (NCCL, decode compiled):

    torchrun --nproc_per_node 2 tests/helpers/grpo_fsdp.py OUT.json [cpu|gpu]
"""

import json
import os
import sys

import torch
import torch.distributed as dist

import moxin.rewards as rewards_pkg
import moxin.stages.grpo as grpo_mod
from moxin.config.grpo import ShardedRollout
from moxin.data.grpo_data import PromptDataModule
from moxin.rewards import RewardResult
# this script's folder is on sys.path when torchrun runs it
from tiny_grpo import FSDP_GRPO, fsdp2_trainer, tiny_grpo_stage


class RankSkewVerifier:
    """Parity of the completion's length on rank 0, a constant 0 on the other ranks."""

    def __call__(self, completion: str, reference: str) -> RewardResult:
        if int(os.environ.get("RANK", "0")) == 0:
            return RewardResult(float(len(completion) % 2), "correct" if len(completion) % 2 else "wrong")
        return RewardResult(0.0, "wrong")


def recording_rollouts(stage, out_path: str, steps: list):
    """`stage.rollout` replaced: both paths recorded (module docstring), the gathered rollout returned."""
    calls, real_generate, real_rollout = [], grpo_mod.generate, stage.rollout
    grpo_mod.generate = lambda m, *a, **kw: calls.append((m, kw)) or real_generate(m, *a, **kw)

    def rollout(batch, step):
        weights = {n: p.full_tensor() for n, p in stage.model.named_parameters()}  # collective: every rank
        if dist.get_rank() == 0:
            torch.save({n: w.cpu() for n, w in weights.items()}, f"{out_path}.step{step}.pt")
        rec = {"prompts": [r["prompt_ids"] for r in batch]}
        for mode in (ShardedRollout.LOCKSTEP, ShardedRollout.GATHER):
            stage.cfg.sharded_rollout = mode
            calls.clear()
            ro = real_rollout(batch, step)
            rec[mode.value] = {"input_ids": ro.input_ids.tolist(), "lengths": ro.lengths.tolist(),
                               "policy": [m is stage.model for m, _ in calls],
                               "lockstep": [kw["lockstep"] for _, kw in calls],
                               "decode": [str(kw["decode"]) for _, kw in calls],
                               "refresh_s": ro.stats["refresh_s"]}
        rec["copy_freed"] = not grpo_mod.copy_allocated(stage.__dict__["_rollout_copy"])
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rec)
        steps.append(ranks)
        return ro

    stage.rollout = rollout


def main(out_path, accelerator="cpu"):
    rewards_pkg.VERIFIERS["rankskew"] = RankSkewVerifier
    stage, tok = tiny_grpo_stage("rankskew", **FSDP_GRPO)
    dm = PromptDataModule(source="arithmetic", prompts_per_step=4, steps=2, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, world_size=2)
    steps = []
    recording_rollouts(stage, out_path, steps)
    trainer = fsdp2_trainer(accelerator)
    trainer.fit(stage, datamodule=dm)
    if trainer.is_global_zero:
        ref_sharded = all(hasattr(p, "to_local") for p in stage.ref_model.parameters())
        with open(out_path, "w") as f:
            json.dump({"history": stage.history, "ref_sharded": ref_sharded, "steps": trainer.global_step,
                       "rollouts": steps}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
