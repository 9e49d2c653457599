"""GRPO under FSDP2 with 2 gloo processes (torchrun) where the ranks keep different numbers of sequences: rank 1's
rewards are all equal (every group filtered), rank 0's vary. Off-policy updates (2 epochs x 2 minibatches) and a
KL reference make every forward collective: old log-probs, policy, reference. Writes rank 0's history to JSON.
Used by tests/test_grpo.py; before the old-log-prob forwards were kept in step this hung."""

import json
import os
import sys


import moxin.rewards as rewards_pkg
from moxin.data.grpo_data import PromptDataModule
from moxin.rewards import RewardResult
from tiny_grpo import fsdp2_cpu_trainer, tiny_grpo_stage  # this script's folder is on sys.path when torchrun runs it


class RankSkewVerifier:
    """Parity of the completion's length on rank 0, a constant 0 on the other ranks."""

    def __call__(self, completion: str, reference: str) -> RewardResult:
        if int(os.environ.get("RANK", "0")) == 0:
            return RewardResult(float(len(completion) % 2), "correct" if len(completion) % 2 else "wrong")
        return RewardResult(0.0, "wrong")


def main(out_path):
    rewards_pkg.VERIFIERS["rankskew"] = RankSkewVerifier
    stage, tok = tiny_grpo_stage("rankskew", max_new_tokens=6, micro_batch_size=2, ppo_epochs=2, num_minibatches=2,
                                 kl_coef=0.1)
    dm = PromptDataModule(source="arithmetic", prompts_per_step=4, steps=2, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, world_size=2)
    trainer = fsdp2_cpu_trainer()
    trainer.fit(stage, datamodule=dm)
    if trainer.is_global_zero:
        ref_sharded = all(hasattr(p, "to_local") for p in stage.ref_model.parameters())
        with open(out_path, "w") as f:
            json.dump({"history": stage.history, "ref_sharded": ref_sharded, "steps": trainer.global_step}, f)


if __name__ == "__main__":
    main(sys.argv[1])
