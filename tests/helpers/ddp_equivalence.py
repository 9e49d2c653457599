"""Run PretrainStage on fixed rows with 1, 2 or 4 CPU processes (launched by torchrun; DDP, FSDP2, HSDP, or tensor
parallelism over pairs of ranks with FSDP2 over the pairs, "tp", or HSDP over them, "tp_hsdp") and write the per-step
losses and a weight checksum to a JSON file, and the gradients of every optimizer step (with the gradients of the
first step's loss written out by hand, tests/helpers/wiring_reference.py) to OUT.grads.pt. Used by
tests/test_distributed.py.

Every optimizer step consumes the same 8 global rows g0..g7 whatever the world size, in two micro-batches
(accumulation 2): two processes take g0-g3 and g4-g7, as micro-batches of 2 rows (four take two rows each, one
row a micro-batch); one process takes micro-batches
that straddle the two ranks' rows, (g0, g1, g4, g5) and (g2, g3, g6, g7). Label masks differ per row (4 to 31
targets), so micro-batches hold different numbers of target tokens: only an exact token normalisation across
accumulation and ranks gives the same gradients in both layouts (a per-micro-batch mean, or a normalisation
missing the world size, does not). Gradient clipping is off, so the gradients reach the optimizer unchanged.
Under "tp" the two ranks of a tensor-parallel pair read the same rows: the layout above holds for the pairs.

    torchrun --nproc_per_node N tests/helpers/ddp_equivalence.py OUT.json [ddp|fsdp2|hsdp|tp|tp_hsdp] [DTYPE] [LR]

DTYPE (float32) is the default dtype the model is built in (float64 shows whether a layout's math is exact), LR
(1e-2) Adam's learning rate.
"""

import json
import os
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moxin.config import OptimConfig, ParallelConfig
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.stages import PretrainStage
from wiring_reference import GradRecorder, lm_loss, reference_grads  # this script's folder is on sys.path

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


# the order in which one process takes a step's 8 rows: micro-batches (g0, g1, g4, g5), (g2, g3, g6, g7)
ONE_PROCESS_ORDER = [0, 1, 4, 5, 2, 3, 6, 7]


class Rows(Dataset):
    def __init__(self, rows, world, rank, per_rank):
        # step s covers global rows [s*8, (s+1)*8); rank r of N takes its contiguous 8/N of each step, one process
        # takes them all in the straddling order
        self.items = []
        for s in range(STEPS):
            chunk = rows[s * GLOBAL_ROWS:(s + 1) * GLOBAL_ROWS]
            if world == 1:
                self.items += [chunk[i] for i in ONE_PROCESS_ORDER]
            else:
                self.items += chunk[rank * per_rank:(rank + 1) * per_rank]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _checksum(model):
    # FSDP2 parameters are DTensor shards: gather them (a collective: every rank calls it)
    return sum(float((p.full_tensor() if hasattr(p, "full_tensor") else p).double().sum()) for p in model.parameters())


def use_dtype(dtype: str) -> None:
    """Build models in `dtype` from here on; in float64 the model's .float() casts stay float64 (the loss head's
    fp32 buffers remain)."""
    torch.set_default_dtype(getattr(torch, dtype))
    if dtype == "float64":
        as_fp32 = torch.Tensor.float
        torch.Tensor.float = lambda t, *a, **k: t if t.dtype == torch.float64 else as_fp32(t, *a, **k)


def main(out_path, strategy="ddp", dtype="float32", lr="1e-2"):
    use_dtype(dtype)
    tp = 2 if strategy in ("tp", "tp_hsdp") else 1
    # the data-parallel layout (Lightning's (data_parallel, tensor_parallel) mesh: rank = dp rank * tp + tp rank)
    world = int(os.environ.get("WORLD_SIZE", "1")) // tp
    rank = int(os.environ.get("RANK", "0")) // tp
    torch.manual_seed(0)
    per_rank = GLOBAL_ROWS // world
    accum = 2
    micro = per_rank // accum
    # hsdp: FSDP2 over a (replicate 2, shard world/2) mesh
    parallel = ParallelConfig(replicate=2 if strategy in ("hsdp", "tp_hsdp") and world > 1 else 1)
    stage = PretrainStage(load_preset("tiny"), OptimConfig(lr=float(lr), warmup_steps=0, schedule="constant",
                                                                  grad_clip=None), parallel=parallel,
                          total_steps=STEPS)
    losses = []
    stage.configure_model()
    init_checksum = sum(float(p.double().sum()) for p in stage.model.parameters())
    plain = Transformer(stage.model_cfg)
    plain.load_state_dict(stage.model.state_dict())
    want = reference_grads(plain, lm_loss(plain, make_rows()[:GLOBAL_ROWS]))  # the first step's, by hand
    grads = GradRecorder()

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accum == 0:
                losses.append(float(trainer.callback_metrics["train/loss"]))

    loader = DataLoader(Rows(make_rows(), world, rank, per_rank), batch_size=micro, shuffle=False)
    if world * tp == 1:
        strat = "auto"
    elif strategy in ("fsdp2", "hsdp", "tp", "tp_hsdp"):  # the path of hardware=fsdp: FSDP2 through ModelParallelStrategy
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=tp)
    else:
        strat = "ddp"
    trainer = L.Trainer(accelerator="cpu", devices=world * tp, strategy=strat,
                        max_steps=STEPS, accumulate_grad_batches=accum, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record(), grads],
                        use_distributed_sampler=False)
    trainer.fit(stage, loader)
    checksum = _checksum(stage.model)
    placements = [str(p.placements) for p in stage.model.parameters() if hasattr(p, "placements")][:1]
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().clone()
               for n, p in stage.model.named_parameters()}
    if trainer.is_global_zero:
        with open(out_path, "w") as f:
            json.dump({"losses": losses, "checksum": checksum, "init_checksum": init_checksum, "world": world,
                       "placements": placements}, f)
        torch.save(weights, f"{out_path}.weights.pt")
        torch.save({"steps": grads.grads, "reference": {k: v.double() for k, v in want.items()}},
                   f"{out_path}.grads.pt")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
