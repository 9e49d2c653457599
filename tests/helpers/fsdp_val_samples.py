"""Train PretrainStage two steps, validate, and generate phase-end samples with 1 process or with 2 FSDP2
processes (gloo, launched by torchrun); write what rank 0 and rank 1 logged to JSON. Used by
tests/test_distributed.py: the held-out loss N processes log must equal the single-process value on the same
held-out rows, on every rank, and sample generations must run under FSDP2 (lockstep decode) and match.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from moxin.callbacks import SampleGenerations
from moxin.config import ModelConfig, OptimConfig
from moxin.stages import PretrainStage
from moxin.tokenizer import load_tokenizer

T, TRAIN_ROWS, VAL_ROWS, STEPS = 32, 4, 6, 2


def rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 32000, (T + 1,), generator=g)
        labels = ids[1:].clone()
        labels[3 + (i * 5) % (T - 3):] = -100  # different target-token counts per row
        out.append({"input_ids": ids[:-1], "labels": labels, "positions": torch.arange(T)})
    return out


def main(out_path):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                      sliding_window=16, max_seq_len=256)
    stage = PretrainStage(cfg, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant"), total_steps=STEPS)
    train = rows(TRAIN_ROWS * STEPS, 1)
    # step s: global rows [4s, 4s+4); rank r takes its contiguous share, as one micro-batch
    per = TRAIN_ROWS // world
    mine = [r for s in range(STEPS) for r in train[s * TRAIN_ROWS:(s + 1) * TRAIN_ROWS][rank * per:(rank + 1) * per]]
    val = rows(VAL_ROWS, 2)[rank::world]  # the held-out rows are split across ranks
    samples = SampleGenerations(["The history of the", "def main():"], max_new_tokens=6,
                                tokenizer=load_tokenizer("mistral"))
    if world == 1:
        strat = "auto"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy=strat, max_steps=STEPS, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[samples], use_distributed_sampler=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(stage, DataLoader(mine, batch_size=per))
    trainer.limit_val_batches = 1.0
    trainer.validate(stage, DataLoader(val, batch_size=2), verbose=False)
    out = {"val_loss": float(trainer.callback_metrics["val/loss"]), "samples": samples.history, "world": world}
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1])
