"""``MoxinDataModule``: what ``moxin.run``, the stages, the callbacks and the banner rely on, declared once.

Every data module derives from it. Hydra instantiates one from ``conf/data/*.yaml``; moxin/assemble.py hands in what
a config cannot know through :meth:`connect` (the tokenizer, world size, ``max_seq_len``) and reads the plan
from it: ``accumulate_grad_batches``, ``num_epochs``, ``total_steps``, the banner's names and tokens and the
``summary.json`` counts. Details: docs/modules.md, "data/base.py".
"""

from __future__ import annotations

import lightning as L
import torch

from moxin.config import DataError

__all__ = ["MoxinDataModule", "loader_generator"]


def loader_generator(seed: int = 0) -> torch.Generator:
    """A data loader's own generator, which its iterators draw their base seed from (workers seed from it). Without
    one, torch's DataLoader draws that seed from the global generator at every ``iter()``, so building a loader (a
    validation pass, a resumed run's loaders) moved the generator state that checkpoints record: a run killed and
    resumed from a checkpoint that a validation pass followed ended with another state than the straight run's
    (tests/test_fsdp_checkpoints_and_kill_loops.py, 2 of 5,056 entries)."""
    return torch.Generator().manual_seed(int(seed))


class MoxinDataModule(L.LightningDataModule):
    #: Lightning epochs of the run (the trainer's max_epochs); subclasses set it or compute it.
    num_epochs: int = 1
    #: whether a checkpoint written by another process count resumes exactly: pretraining's readers are
    #: redistributed (moxin/data/reshard.py), a step sampler's position rescaled (``rescale_loader_state``)
    resumes_on_another_world: bool = False

    def __init__(self, *, seed: int = 1234, tokenizer=None, world_size: int | None = None, rank: int | None = None,
                 max_seq_len: int | None = None):
        super().__init__()
        self.seed = int(seed)
        self._tokenizer = tokenizer
        self._world_size = world_size
        self._rank = rank
        self.max_seq_len = max_seq_len

    def connect(self, tokenizer, world_size: int | None = None, rank: int | None = None,
                max_seq_len: int | None = None) -> None:
        """Hand in the runtime objects: the run's tokenizer (one object for the whole run; it pickles to loader
        workers), the data-parallel world size (before the trainer exists, so accumulation can be planned), this
        process's rank (None: the trainer's, once attached) and the model's ``max_seq_len``. Re-checks the
        config against them."""
        self._tokenizer = tokenizer
        if world_size is not None:
            self._world_size = int(world_size)
        if rank is not None:
            self._rank = int(rank)
        if max_seq_len is not None:
            self.max_seq_len = int(max_seq_len)
        self.check_config()

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise DataError(f"{type(self).__name__} has no tokenizer: hand it in with connect(tokenizer, ...) "
                            "(moxin/assemble.py does) or pass tokenizer=")
        return self._tokenizer

    @property
    def world_size(self) -> int:
        return self._given_or_trainer(self._world_size, "world_size", 1)

    @property
    def rank(self) -> int:
        """This process's data-parallel rank: the trainer's global rank, or, under tensor parallelism, its rank on
        the data dimension (Lightning's sampler rank), so a tensor-parallel group's ranks read the same rows."""
        trainer = getattr(self, "trainer", None)
        if self._rank is None and trainer is not None and getattr(trainer.strategy, "_device_mesh", None) is not None:
            return int(trainer.strategy.distributed_sampler_kwargs["rank"])
        return self._given_or_trainer(self._rank, "global_rank", 0)

    def _given_or_trainer(self, given: int | None, attr: str, default: int) -> int:
        if given is not None:
            return int(given)
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, attr)) if trainer is not None else default

    def check_config(self) -> None:
        """Raise DataError for a setting that cannot work (runs at construction and again in :meth:`connect`)."""

    # ---- the plan the trainer is built from ------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int:
        raise NotImplementedError

    def steps_per_epoch(self) -> list[int]:
        """Optimizer steps of every epoch."""
        raise NotImplementedError

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch())

    def epoch_names(self) -> list[str]:
        """One name per epoch, for the banner and the progress display."""
        if self.num_epochs == 1:
            return ["all"]
        return [f"epoch {i + 1}" for i in range(self.num_epochs)]

    def planned_tokens(self) -> int | None:
        """Training tokens of the whole run when the plan fixes them (pretraining phases), else None."""
        return None

    def data_report(self) -> dict:
        """Counts for summary.json: records read, bad records with their first locations, what was kept."""
        return {}

    # ---- Lightning -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.check_trainer()

    def check_trainer(self) -> None:
        """The trainer must have been built from the plan (moxin.run does)."""
        trainer = getattr(self, "trainer", None)
        acc = getattr(trainer, "accumulate_grad_batches", None) if trainer is not None else None
        if acc is not None and acc != self.accumulate_grad_batches:
            raise DataError(f"trainer.accumulate_grad_batches={acc} but the data module needs "
                            f"{self.accumulate_grad_batches}; pass accumulate_grad_batches=datamodule.accumulate_grad_batches")
