"""Resume on another process count: the data stream of the layout a run started with, redistributed.

Details: docs/modules.md, "data/reshard.py".
"""

from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch
from torch.utils.data import IterableDataset

from moxin.config import DataError
from moxin.data.packed_dataset import PackedDataset

__all__ = ["ReshardedDataset", "layout_of", "streams_of"]

_MARK = "moxin_resharded"


def layout_of(readers: Mapping) -> tuple[int, int] | None:
    """(world_size, num_workers) of the readers in a saved data state ({rank: {worker: state}}); None if empty."""
    for by_worker in readers.values():
        for st in by_worker.values():
            return int(st["world_size"]), int(st["num_workers"])
    return None


def streams_of(rank: int, world_size: int, batches_per_step: int, accumulate0: int) -> list[int]:
    """The original rank streams rank ``rank`` of ``world_size`` reads: those its range of each step touches."""
    a1 = batches_per_step // world_size
    return sorted({g // accumulate0 for g in range(rank * a1, (rank + 1) * a1)})


class ReshardedDataset(IterableDataset):
    """One rank's micro-batches of a phase when the run's layout differs from its first one (see the module).

    ``make_reader(stream_rank, worker, initial_states)`` builds a ``PackedDataset`` of the original rank for this
    phase (``num_batches`` = the phase's steps * a0), one per reader (a reader's live state is the dataset's).
    Iterated in the loader's own process (no workers)."""

    def __init__(self, make_reader: Callable[[int, int, dict], PackedDataset], *, layout: tuple[int, int], rank: int,
                 world_size: int, batches_per_step: int, steps: int, initial: Mapping[int, Mapping[int, dict]]):
        self.world0, self.workers0 = layout
        self.rank, self.world_size = rank, world_size
        self.G, self.steps = batches_per_step, steps
        self.a0, self.a1 = batches_per_step // self.world0, batches_per_step // world_size
        self.lo, self.hi = rank * self.a1, (rank + 1) * self.a1
        self.streams = streams_of(rank, world_size, batches_per_step, self.a0)
        self.readers = {(r, w): make_reader(r, w, dict(initial.get(r, {}))) for r in self.streams
                        for w in range(self.workers0)}

    def state_dict(self) -> dict:
        return {_MARK: 1,
                "readers": {r: {w: self.readers[r, w].reader_state(w, self.workers0) for w in range(self.workers0)}
                            for r in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        """Lightning's restored loader state is not used: the data module hands every rank its streams' states."""

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        nw = self.workers0
        # from where the readers start, not where an earlier iterator left them (Lightning may iterate twice)
        counts = {r: sum(int(self.readers[r, w].start_state(w, nw)["batches"]) for w in range(nw))
                  for r in self.streams}
        iters = {(r, w): ds.iter_reader(w, nw) for (r, w), ds in self.readers.items()}
        if len(set(counts.values())) > 1 or next(iter(counts.values())) % self.a0:
            raise DataError(f"data state inside an optimizer step (batches per stream {counts}, {self.a0} a step); "
                            "resume from a checkpoint written at a step boundary (every moxin checkpoint is)")
        for s in range(next(iter(counts.values())) // self.a0, self.steps):
            kept = []
            for r in self.streams:  # the whole step of every stream read, in g order
                for i in range(self.a0):
                    batch = next(iters[r, (s * self.a0 + i) % nw])
                    if self.lo <= r * self.a0 + i < self.hi:
                        kept.append(batch)
            yield from kept
