"""What every moxin data module shares: its data-parallel world size and rank, known before the trainer exists
(run.py passes `world_size` so accumulation can be planned) and from the trainer afterwards."""

from __future__ import annotations

import lightning as L


class RankedDataModule(L.LightningDataModule):
    _world_size: int | None = None
    _rank: int | None = None

    @property
    def world_size(self) -> int:
        if self._world_size is not None:
            return int(self._world_size)
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return int(self._rank)
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_rank) if trainer is not None else 0
