"""Run DPOStage (frozen reference: a second model, sharded like the policy under FSDP2) on fixed preference pairs
with 1 process or 2 FSDP2 processes (torchrun; gloo on the CPU, NCCL on GPUs) and write the per-step losses and a
weight checksum to JSON, and every optimizer step's gradients (with the first step's written out by hand,
tests/helpers/wiring_reference.py) to OUT.grads.pt. Used by tests/test_distributed.py (CPU) and tests/test_gpu.py
(two GPUs).

Every optimizer step consumes the same 6 global pairs g0..g5 whatever the world size, in two micro-batches of
unequal sizes (accumulation 2): two processes take g0-g2 as (g0, g1), (g2) and g3-g5 as (g3), (g4, g5); one process
takes micro-batches that straddle the ranks' pairs, (g0, g3) and (g1, g2, g4, g5). Only an exact normalisation by
the step's pairs across accumulation and ranks gives the same gradients in both layouts. Clipping is off; the
reference is moved away from the starting policy and the loss smoothed (label_smoothing 0.1), so chosen and
rejected swapped changes the gradients too.

    torchrun --nproc_per_node N tests/helpers/dpo_equivalence.py OUT.json [cpu|gpu] [tp]

With ``tp`` the processes form tensor-parallel pairs (FSDP2 over the pairs), and each pair takes one rank's pairs.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from moxin.config import ModelConfig, OptimConfig
from moxin.distributed import weights_checksum
from moxin.model import Transformer
from moxin.stages.dpo import DPOStage
from wiring_reference import GradRecorder, dpo_loss, reference_grads  # this script's folder is on sys.path

PAIRS, T, STEPS = 6, 24, 3
BETA, SMOOTHING = 0.5, 0.1
# a step's micro-batches (indices into its 6 pairs): one process, and each rank of two
MICRO = {1: [[0, 3], [1, 2, 4, 5]], 2: [[[0, 1], [2]], [[3], [4, 5]]]}


def pairs():
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(PAIRS * STEPS):
        item = {"pair_index": torch.tensor(i)}
        for side, n in (("chosen", 5 + i % 7), ("rejected", 3 + (i * 3) % 9)):  # answers of different lengths
            ids = torch.randint(3, 512, (T,), generator=g)
            labels = torch.full((T,), -100)
            labels[T - 1 - n:T - 1] = ids[T - n:]
            item |= {f"{side}_input_ids": ids, f"{side}_labels": labels, f"{side}_positions": torch.arange(T)}
        out.append(item)
    return out


def main(out_path, accelerator="cpu", layout="fsdp2"):
    tp = 2 if layout == "tp" else 1
    world = int(os.environ.get("WORLD_SIZE", "1")) // tp  # data-parallel ranks: Lightning's rank = dp * tp + tp rank
    rank = int(os.environ.get("RANK", "0")) // tp
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                      sliding_window=8, max_seq_len=64)
    stage = DPOStage(cfg, OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", betas=(0.9, 0.99),
                                      grad_clip=None),
                     loss_type="dpo", beta=BETA, label_smoothing=SMOOTHING, reference="frozen",
                     validate_at_start=False, total_steps=STEPS)
    # build the policy and the frozen reference here, on the CPU RNG: Lightning would build them inside its
    # strategy's init context (on the GPU with one device, on the CPU under ModelParallelStrategy), which draws
    # a different random init for 1 and 2 processes
    stage.configure_model()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the reference apart from the starting policy (as after SFT), the same on every rank
        for p in stage.ref_model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    plain, plain_ref = Transformer(cfg), Transformer(cfg)
    plain.load_state_dict(stage.model.state_dict())
    plain_ref.load_state_dict(stage.ref_model.state_dict())
    data = pairs()
    want = reference_grads(plain, dpo_loss(plain, plain_ref, data[:PAIRS], "dpo", BETA, SMOOTHING))
    micro = MICRO[1] if world == 1 else MICRO[2][rank]
    accum = len(micro)
    mine, batches = [], []
    for s in range(STEPS):
        for mb in micro:
            batches.append(list(range(len(mine), len(mine) + len(mb))))
            mine += [data[s * PAIRS + i] for i in mb]
    grads = GradRecorder()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accum == 0:
                losses.append(float(trainer.callback_metrics["train/loss"]))

    if world * tp == 1:
        strat = "auto"
    else:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=tp)
    trainer = L.Trainer(accelerator=accelerator, devices=world * tp, strategy=strat, max_steps=STEPS, logger=False,
                        accumulate_grad_batches=accum, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record(), grads], use_distributed_sampler=False,
                        num_sanity_val_steps=0, precision="32-true")
    trainer.fit(stage, DataLoader(mine, batch_sampler=batches))
    ref_sharded = all(hasattr(p, "to_local") for p in stage.ref_model.parameters())

    out = {"losses": losses, "checksum": weights_checksum(stage.model),
           "ref_checksum": weights_checksum(stage.ref_model), "ref_sharded": ref_sharded, "world": world}
    if trainer.is_global_zero:
        with open(out_path, "w") as f:
            json.dump(out, f)
        torch.save({"steps": grads.grads, "reference": {k: v.double() for k, v in want.items()}},
                   f"{out_path}.grads.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
