"""Run PretrainStage on fixed rows with 1 or 2 CPU processes (launched by torchrun) and write the per-step
losses and a weight checksum to a JSON file. Used by tests/test_distributed.py.

Every optimizer step consumes the same 8 global rows whatever the world size: one process takes them as two
micro-batches of 4 (accumulation 2), two processes take 4 each (accumulation 1). Label masks differ per row,
so micro-batches hold different numbers of target tokens: only an exact token normalisation across
accumulation and ranks gives the same loss and weights in both layouts.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moxin.model import ModelConfig
from moxin.stages import OptimConfig, PretrainStage

GLOBAL_ROWS, T, STEPS = 8, 32, 4


def make_rows():
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(GLOBAL_ROWS * STEPS):
        ids = torch.randint(0, 512, (T + 1,), generator=g)
        labels = ids[1:].clone()
        keep = 4 + (i * 7) % (T - 4)  # a different number of target tokens per row
        labels[keep:] = -100
        rows.append({"input_ids": ids[:-1], "labels": labels, "positions": torch.arange(T)})
    return rows


class Rows(Dataset):
    def __init__(self, rows, world, rank, per_rank):
        # step s covers global rows [s*8, (s+1)*8); rank r takes its contiguous half/whole of each step
        self.items = []
        for s in range(STEPS):
            chunk = rows[s * GLOBAL_ROWS:(s + 1) * GLOBAL_ROWS]
            self.items += chunk[rank * per_rank:(rank + 1) * per_rank]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _checksum(model):
    # FSDP2 parameters are DTensor shards: gather them (a collective: every rank calls it)
    return sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum()) for p in model.parameters())


def main(out_path, strategy="ddp"):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    per_rank = GLOBAL_ROWS // world
    accum = 2 if world == 1 else 1
    micro = per_rank // accum
    stage = PretrainStage(ModelConfig.preset("tiny"), OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"),
                          total_steps=STEPS)
    losses = []
    stage.configure_model()
    init_checksum = sum(float(p.double().sum()) for p in stage.model.parameters())

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accum == 0:
                losses.append(float(trainer.callback_metrics["train/loss"]))

    loader = DataLoader(Rows(make_rows(), world, rank, per_rank), batch_size=micro, shuffle=False)
    if world == 1:
        strat = "auto"
    elif strategy == "fsdp2":  # the path of hardware=fsdp: per-block FSDP2 through ModelParallelStrategy
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    else:
        strat = "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strat,
                        max_steps=STEPS, accumulate_grad_batches=accum, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()],
                        use_distributed_sampler=False)
    trainer.fit(stage, loader)
    checksum = _checksum(stage.model)
    if trainer.is_global_zero:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "checksum": checksum, "init_checksum": init_checksum, "world": world}, f)


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
