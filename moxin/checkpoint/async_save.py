"""Asynchronous distributed checkpoints (``trainer.async_checkpoint=true`` with ``hardware.strategy=fsdp2``).

`AsyncCheckpointStrategy` is Lightning's ModelParallelStrategy whose distributed-checkpoint save goes through
`torch.distributed.checkpoint.async_save`: the shards are copied to host memory (the step waits for that copy only)
and a background thread writes them while training goes on, over a gloo process group of its own (torchtitan's
way: the writer's collectives never interleave with the training's, and NCCL runs need a CPU backend for it).
The folder has the same layout as a synchronous save: shards, ``.metadata`` (written last, by rank 0, once every
rank's shards are written), ``meta.pt``.

The checkpoint policy (`policy.py`) publishes such a checkpoint (rename, ``last``, retention) only once the write
has finished: rank 0 alone at a step boundary where its write is done (rank 0 coordinates the save, so its write
finishing means every rank's has), or every rank waiting for it before the next save, at a phase end, at the end
of fit and after a signal-driven stop.
"""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint import async_save

from moxin.checkpoint.files import DCP_META


class AsyncCheckpointStrategy(ModelParallelStrategy):
    """ModelParallelStrategy (distributed checkpoints) whose saves are written in the background; at most one is in
    flight (a save waits for the previous one first). `pending` is its future until someone waits on it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pending: Future | None = None
        self.pending_path: Path | None = None
        self._save_group = None

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if storage_options is not None or not self._save_distributed_checkpoint:  # Lightning's own save (or message)
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        self.wait_checkpoint()
        path = Path(self.broadcast(filepath))  # rank 0's path on every rank, as Lightning's save does
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        if self._save_group is None:  # collective: every rank saves, so every rank gets here
            self._save_group = dist.new_group(backend="gloo")
        self.pending = async_save(state, checkpoint_id=path, process_group=self._save_group)
        self.pending_path = path
        if self.global_rank == 0:  # the loops, data and RNG state: small, written now
            torch.save(checkpoint, path / DCP_META)

    def checkpoint_written(self) -> bool:
        """True when no save is in flight on this rank (none started, or its write has finished)."""
        return self.pending is None or self.pending.done()

    def wait_checkpoint(self) -> None:
        """Block until this rank's save in flight (if any) is written; re-raise its error."""
        if self.pending is None:
            return
        pending, self.pending, self.pending_path = self.pending, None, None
        pending.result()
