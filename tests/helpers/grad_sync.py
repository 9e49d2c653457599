"""Train PretrainStage under FSDP2 or HSDP on CPU processes (torchrun, gloo) once per ``hardware.parallel``
setting named on the command line, from the same initial weights on the same rows (tests/helpers/ddp_equivalence.py's
8 global rows a step), and record for each its per-step losses, final weights and the gradient collectives FSDP2
issued: a counting wrapper around torch.distributed's all-reduce and reduce-scatter notes the group (the mesh's
replicate or shard dimension), dtype and size of every call made on a mesh group. Used by tests/test_distributed.py.

    torchrun --nproc_per_node N tests/helpers/grad_sync.py OUT.pt LAYOUT ACCUM SETTING [SETTING ...]

LAYOUT: fsdp2 (one shard group of N) or hsdp (replicate 2 x shard N/2). ACCUM: micro-batches per optimizer step
(the N ranks' 8/N rows a step split into ACCUM micro-batches; one epoch over the 4 steps' rows, so an ACCUM that
does not divide a rank's rows ends the epoch on a partial window: 2 processes, ACCUM 3, 16 micro-batches of one
row, 6 optimizer steps). SETTING: GRADIENT_SYNC:REDUCE_DTYPE:DTYPE:LR[:ACCUM], e.g.
auto:bfloat16:float32:3e-4 (DTYPE: the model's, float32 or float64; LR: Adam's; ACCUM: this setting's own). Rank 0 writes
{setting: {"losses", "weights", "calls"}} to OUT.pt, calls a list of (op, mesh dimension, dtype, numel).
"""

import os
import sys
import threading

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader

from ddp_equivalence import GLOBAL_ROWS, STEPS, Rows, make_rows, use_dtype  # this script's folder is on sys.path
from moxin.config import OptimConfig, ParallelConfig
from moxin.presets import load_preset
from moxin.stages import PretrainStage


class CollectiveLog:
    """Wraps dist.all_reduce and dist's reduce-scatter (reduce_scatter_single, or reduce_scatter_tensor on older
    torch) to note every call that names a process group; a call made from inside another wrapped one counts once."""

    def __init__(self):
        self.calls: list[tuple[str, tuple, torch.dtype, int]] = []  # (op, the group's ranks, dtype, numel)
        self._inside = threading.local()
        for name, tensor_arg in (("all_reduce", 0), ("reduce_scatter_single", 1), ("reduce_scatter_tensor", 1)):
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(getattr(dist, name), name.split("_single")[0].split("_tensor")[0],
                                               tensor_arg))

    def _wrap(self, fn, op, tensor_arg):
        def counted(*args, **kwargs):
            group = kwargs.get("group")
            if group is not None and not getattr(self._inside, "on", False):
                t = args[tensor_arg] if len(args) > tensor_arg else kwargs.get("input", kwargs.get("tensor"))
                self.calls.append((op, tuple(dist.get_process_group_ranks(group)), t.dtype, t.numel()))
            self._inside.on = True
            try:
                return fn(*args, **kwargs)
            finally:
                self._inside.on = False
        return counted


def mesh_dims(model, calls: list) -> list[tuple[str, str, str, int]]:
    """`CollectiveLog` calls with the name of the dimension of `model`'s FSDP2 mesh their group is ("other" for
    none), told apart by their ranks: a later fit's new mesh of the same layout may hand back the first one's
    group objects."""
    mesh = next(model.parameters()).device_mesh
    names = {tuple(dist.get_process_group_ranks(mesh.get_group(d))): d for d in mesh.mesh_dim_names}
    return [(op, names.get(g, "other"), str(dt), n) for op, g, dt, n in calls]


def fit(setting: str, layout: str, world: int, rank: int, accum: int, log: CollectiveLog) -> dict:
    sync, reduce_dtype, dtype, lr, *own = setting.split(":")
    accum = int(own[0]) if own else accum
    torch.set_default_dtype(getattr(torch, dtype))
    torch.manual_seed(0)
    parallel = ParallelConfig(replicate=2 if layout == "hsdp" else 1, gradient_sync=sync, reduce_dtype=reduce_dtype)
    stage = PretrainStage(load_preset("tiny"), OptimConfig(lr=float(lr), warmup_steps=0, schedule="constant",
                                                           grad_clip=None), parallel=parallel, total_steps=STEPS)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accum == 0:
                losses.append(float(trainer.callback_metrics["train/loss"]))

    per_rank = GLOBAL_ROWS // world
    loader = DataLoader(Rows(make_rows(), world, rank, per_rank), batch_size=per_rank // accum, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=world, max_epochs=1, accumulate_grad_batches=accum,
                        strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()], use_distributed_sampler=False)
    log.calls.clear()
    trainer.fit(stage, loader)
    calls = mesh_dims(stage.model, log.calls)
    weights = {n: p.full_tensor().detach().double().clone() for n, p in stage.model.named_parameters()}
    return {"losses": losses, "weights": weights, "calls": calls}


def main(out_path, layout, accum, *settings):
    use_dtype("float64")  # .float() keeps a float64 tensor float64 (no fp32 model holds one)
    log = CollectiveLog()
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results = {s: fit(s, layout, world, rank, int(accum), log) for s in settings}
    if dist.get_rank() == 0:
        torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
