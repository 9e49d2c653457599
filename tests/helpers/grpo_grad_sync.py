"""GRPO's update (its own micro-batch loop, manual optimisation) under HSDP 2 x 1 on 2 CPU processes (torchrun,
gloo), once per ``hardware.parallel.gradient_sync`` named on the command line, from the same initial weights on
tests/helpers/grpo_equivalence.py's fixed rollout (micro-batches of 3 of each rank's kept sequences, two PPO
epochs: two optimizer steps of several micro-batches each), fp32 at the recipe's lr. Rank 0 writes {setting: {"weights", "calls", "loss"}}
to OUT.pt (calls as tests/helpers/grad_sync.py counts them). Used by tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/helpers/grpo_grad_sync.py OUT.pt SETTING [SETTING ...]
"""

import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

# this script's folder is on sys.path
from grad_sync import CollectiveLog, mesh_dims
from grpo_equivalence import stage_on_rollout
from moxin.config import ParallelConfig


def fit(sync: str, world: int, rank: int, log: CollectiveLog) -> dict:
    stage, _ = stage_on_rollout(world, rank, lr=3e-4, parallel=ParallelConfig(replicate=2, gradient_sync=sync))
    trainer = L.Trainer(accelerator="cpu", devices=world, max_steps=2,
                        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
    log.calls.clear()
    trainer.fit(stage, DataLoader([{"prompt": "unused"}], batch_size=1))
    calls = mesh_dims(stage.model, log.calls)
    weights = {n: p.full_tensor().detach().double().clone() for n, p in stage.model.named_parameters()}
    return {"weights": weights, "calls": calls, "loss": stage.history[0]["train/loss"]}


def main(out_path, *settings):
    log = CollectiveLog()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results = {s: fit(s, world, rank, log) for s in settings}
    if dist.get_rank() == 0:
        torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
