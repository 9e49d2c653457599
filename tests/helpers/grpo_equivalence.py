"""Run GRPOStage's update on one fixed rollout with 1 CPU process or 2 DDP processes (torchrun, gloo) and write
the logged losses and a weight checksum to JSON, and the gradients of every optimizer step (with the first step's
written out by hand, tests/helpers/wiring_reference.py) to OUT.grads.pt. Used by tests/test_distributed.py.

The rollout (no generation; the stage's `rollout` is replaced): 4 prompts x 4 completions of 1 to 8 tokens, one
group with equal rewards (filtered), completions cut at the budget (masked). Two processes take prompts 0-1 and
2-3; one process takes all four. Micro-batches of 3 sequences, drawn at random from the rank's kept sequences, so
the one-process micro-batches straddle the ranks' rows and every micro-batch holds its own number of tokens. Two
PPO epochs over one minibatch (two optimizer steps, the second off-policy), token aggregation, clipping off. Only
a loss normalised by the minibatch's tokens on all ranks, times the world size against DDP's average, gives the
same gradients in both layouts.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from moxin.config import GRPOConfig, OptimConfig, ParallelConfig
from moxin.distributed import weights_checksum
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage
from moxin.tokenizer import load_tokenizer
from wiring_reference import GradRecorder, grpo_loss, reference_grads  # this script's folder is on sys.path

G, LENGTHS = 4, ([1, 4, 8, 2], [5, 8, 3, 6], [2, 8, 7, 1], [6, 3, 8, 4])
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.25, 0.0, 1.0, 1.0, 0.0]
STATS = {"gen_s": 0.0, "score_s": 0.0, "score_busy_s": 0.0, "verifier_errors": 0, "verifier_timeouts": 0,
         "no_answer": 0}


def completions():
    """(prompts, completion tokens, finished) of the 16 sequences, the G of a prompt contiguous."""
    g = torch.Generator().manual_seed(3)
    prompts, tokens, finished = [], [], []
    for p, lengths in enumerate(LENGTHS):
        prompt = torch.randint(3, 512, (3 + p,), generator=g).tolist()
        for n in lengths:
            prompts.append(prompt)
            tokens.append(torch.randint(3, 512, (n,), generator=g).tolist())
            finished.append(n < 8)
    return prompts, tokens, finished


def rollout(stage, rows: slice):
    prompts, tokens, finished = completions()
    ro = stage.build_rollout(prompts[rows], tokens[rows], finished[rows], torch.tensor(REWARDS[rows]))
    ro.stats.update(STATS, gen_tokens=sum(map(len, tokens[rows])))
    return ro


def stage_on_rollout(world: int, rank: int, lr: float = 1e-2, parallel: ParallelConfig | None = None):
    """(the GRPO stage, seeded, its update's rollout: this rank's share of the fixed one): micro-batches of 3, two
    PPO epochs, token aggregation, clipping off; its `rollout` replaced by that share."""
    torch.manual_seed(0)
    cfg = GRPOConfig(group_size=G, temperature=0.7, max_new_tokens=8, mask_truncated=True, verifier="exact",
                     verifier_workers=0, log_completions=0, micro_batch_size=3, ppo_epochs=2)
    stage = GRPOStage(load_preset("tiny", attn_backend="sdpa"), grpo=cfg, tokenizer=load_tokenizer("mistral"), seed=5,
                      parallel=parallel, total_steps=2,
                      optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant", weight_decay=0.0, grad_clip=None))
    stage.configure_model()
    per = len(REWARDS) // world
    mine = rollout(stage, slice(rank * per, (rank + 1) * per))
    stage.rollout = lambda batch, step: mine  # the update alone: the rollout is given
    return stage, mine


def main(out_path):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    stage, mine = stage_on_rollout(world, rank)
    cfg = stage.cfg
    whole = rollout(stage, slice(None))
    k = whole.keep
    plain = Transformer(stage.model_cfg)
    plain.load_state_dict(stage.model.state_dict())
    want = reference_grads(plain, grpo_loss(plain, None, whole.input_ids[k], whole.positions[k], whole.labels[k],
                                            whole.mask[k], whole.advantages[k], "token", cfg.temperature))
    grads = GradRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[grads])
    trainer.fit(stage, DataLoader([{"prompt": "unused"}], batch_size=1))
    checksum = weights_checksum(stage.model)
    if trainer.is_global_zero:
        h = stage.history[0]
        with open(out_path, "w") as f:
            json.dump({"losses": [h["train/loss"]], "pg_loss": h["grpo/pg_loss"], "loss_tokens": h["grpo/loss_tokens"],
                       "checksum": checksum, "kept": int(mine.keep.sum()), "world": world}, f)
        torch.save({"steps": grads.grads, "reference": {n: v.double() for n, v in want.items()}},
                   f"{out_path}.grads.pt")


if __name__ == "__main__":
    main(sys.argv[1])
