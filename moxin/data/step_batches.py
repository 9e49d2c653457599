"""Exact optimizer steps over a map-style post-training set (SFT conversations, DPO pairs): the batch sampler,
and :class:`StepDataModule`, the data module both stages share.

A step consumes exactly ``batch_size`` items over all ranks (Tülu counts its batch in sequences); each epoch is
a seeded permutation cut into global steps, the items past the last full step left for that epoch, so
``total_steps = num_epochs * (N // batch_size)`` exactly; a resumed run continues at the same batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from moxin.config import DataError, SourceConfig, plain
from moxin.data.base import MoxinDataModule, loader_generator
from moxin.data.reader import as_source
from moxin.data.resume import rescale_sampler_position

__all__ = ["StepBatchSampler", "StepDataModule"]


class StepBatchSampler:
    """Yields lists of item indices: the micro-batches of one rank for one epoch.

    ``shuffle=True`` (training): a permutation seeded by ``seed + epoch`` (identical on every rank) is cut into
    ``n // batch_size`` global steps; step ``s`` holds ``accum * world`` micro-batches of ``micro`` items, and
    rank ``r`` takes the ``r``-th of each accumulation slot. The tail ``n % batch_size`` is not used this epoch.
    ``shuffle=False`` (validation, reference log-probs): every item once, in order, round-robin over ranks,
    every rank the same number of micro-batches (the last ones may be short or empty).
    """

    def __init__(self, n: int, micro: int, world: int, rank: int, *, batch_size: int | None = None, seed: int = 0,
                 epoch: int = 0, shuffle: bool = True):
        self.n, self.micro, self.world, self.rank = n, micro, world, rank
        self.batch_size, self.seed, self.epoch, self.shuffle = batch_size, seed, epoch, shuffle

    def _batches(self) -> list[list[int]]:
        if self.shuffle:
            accum = self.batch_size // (self.micro * self.world)
            steps = self.n // self.batch_size
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g)[: steps * self.batch_size]
            mine = perm.view(steps, accum, self.world, self.micro)[:, :, self.rank]
            return mine.reshape(-1, self.micro).tolist()
        mine = list(range(self.rank, self.n, self.world))
        per_rank = -(-self.n // self.world)
        nb = max(1, -(-per_rank // self.micro))
        return [mine[i * self.micro:(i + 1) * self.micro] for i in range(nb)]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        if self.shuffle:
            return (self.n // self.batch_size) * (self.batch_size // (self.micro * self.world))
        return max(1, -(-(-(-self.n // self.world)) // self.micro))



class StepDataModule(MoxinDataModule):
    """Train / held-out sets loaded once (records read, checked and counted before training) and batched in exact
    steps of ``batch_size`` items. Subclasses say how a set is loaded (:meth:`load_set`) and collated
    (:meth:`collate`), and what an item is called (``item``, for messages).

    Args:
        train: the training source: a path / hub name, or a mapping with ``path`` (and ``split``, ``hub_config``,
            ``data_files``, ``format`` as in :class:`SourceConfig`); where the stage allows it
            (``multi_source``), a list of them, every item of each used (open-instruct's ``dataset_mixer_list``
            with weight 1.0 each), shuffled together.
        val: held-out items (same form); None: no validation.
        max_length: tokens per item (at most the model's ``max_seq_len``).
        batch_size: items per optimizer step over all ranks; a multiple of ``micro_batch_size * world_size``.
        micro_batch_size: items per rank per micro-step.
        num_epochs: passes over the data, each a new seeded shuffle.
        pad_to_multiple_of: right-pad rows to a multiple of this.
        max_bad_records / max_bad_fraction: stop when more records than this are unusable.
    """

    item = "items"
    multi_source = False  # whether ``train`` may list several sources
    #: every global step holds the same items on any process count: the loader's position is rescaled
    resumes_on_another_world = True

    def __init__(self, train: Any, val: Any, *, max_length: int, batch_size: int, micro_batch_size: int,
                 num_epochs: int, num_workers: int, pad_to_multiple_of: int, max_bad_records: int,
                 max_bad_fraction: float, seed: int, tokenizer: Any, world_size: int | None, rank: int | None,
                 max_seq_len: int | None):
        super().__init__(seed=seed, tokenizer=tokenizer, world_size=world_size, rank=rank, max_seq_len=max_seq_len)
        listed = plain(train)
        if isinstance(listed, list):
            if not self.multi_source or not listed:
                raise DataError(f"data.train: {'an empty list' if not listed else 'a list of sources'} is not "
                                f"supported by {type(self).__name__}; give one source (a path, hub name or mapping)")
            self.train_sources = [as_source(src, f"train{i}") for i, src in enumerate(listed)]
            names = [src.name for src in self.train_sources]
            if len(set(names)) != len(names):
                raise DataError(f"data.train: source names must differ, got {names}; give each a distinct name:")
        else:
            self.train_sources = [as_source(train, "train")]
        self.train_source = self.train_sources[0]
        self.val_source = as_source(val, "val") if val else None
        self.max_length, self.batch_size, self.micro_batch_size = int(max_length), int(batch_size), int(micro_batch_size)
        self.num_epochs, self.num_workers = int(num_epochs), int(num_workers)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.max_bad_records, self.max_bad_fraction = int(max_bad_records), float(max_bad_fraction)
        self._train = self._val = None
        self._report: dict = {}
        self.check_config()

    def check_config(self) -> None:
        if self.max_seq_len is not None and self.max_length > int(self.max_seq_len):
            raise DataError(f"data.max_length={self.max_length} is beyond the model's max_seq_len={self.max_seq_len}; "
                            "lower data.max_length or use a model config with a longer max_seq_len")
        for key in ("max_length", "batch_size", "micro_batch_size", "num_epochs"):
            if getattr(self, key) <= 0:
                raise DataError(f"data.{key} must be > 0, got {getattr(self, key)}")
        per = self.micro_batch_size * self.world_size
        if self.batch_size % per:
            raise DataError(f"data.batch_size={self.batch_size} is not a multiple of micro_batch_size * world_size = "
                            f"{self.micro_batch_size} * {self.world_size} = {per}; change batch_size or micro_batch_size")

    # ---- what a subclass provides ---------------------------------------------------------------------------
    def load_set(self, source: SourceConfig) -> tuple[torch.utils.data.Dataset, dict]:
        """The map-style set of a source and its report (counts for ``data_report``)."""
        raise NotImplementedError

    def collate(self):
        """The (picklable) collate function of a micro-batch."""
        raise NotImplementedError

    # ---- the plan --------------------------------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)

    def steps_per_epoch(self) -> list[int]:
        """Optimizer steps of every epoch: ``N // batch_size`` each (the same items count every epoch)."""
        return [len(self.train_set) // self.batch_size] * self.num_epochs

    # ---- data ------------------------------------------------------------------------------------------------
    @property
    def train_set(self):
        if self._train is None:
            if len(self.train_sources) == 1:
                self._train, self._report["train"] = self.load_set(self.train_source)
            else:
                loaded = [self.load_set(src) for src in self.train_sources]
                self._train = torch.utils.data.ConcatDataset([ds for ds, _ in loaded])
                self._report["train"] = {"sources": {src.name: {**rep, "items": len(ds)}
                                                     for src, (ds, rep) in zip(self.train_sources, loaded)}}
            n = len(self._train)
            if n < self.batch_size:
                names = ", ".join(repr(src.name) for src in self.train_sources)
                raise DataError(f"data set {names}: {n} usable {self.item}, fewer than one "
                                f"optimizer step (batch_size={self.batch_size}); lower batch_size or add data")
            self._report["train"]["dropped_per_epoch"] = n % self.batch_size
        return self._train

    @property
    def val_set(self):
        if self._val is None and self.val_source is not None:
            self._val, self._report["val"] = self.load_set(self.val_source)
        return self._val

    def setup(self, stage: str | None = None) -> None:
        _ = self.train_set, self.val_set
        self.check_trainer()

    def train_dataloader(self):
        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        sampler = StepBatchSampler(len(self.train_set), self.micro_batch_size, self.world_size, self.rank,
                                   batch_size=self.batch_size, seed=self.seed, epoch=epoch, shuffle=True)
        return StatefulDataLoader(self.train_set, batch_sampler=sampler, collate_fn=self.collate(),
                                  num_workers=self.num_workers, persistent_workers=False,
                                  generator=loader_generator(self.seed),
                                  pin_memory=torch.cuda.is_available())  # as PretrainDataModule's pin_memory

    def rescale_loader_state(self, state: dict, saved_accumulate: int, accumulate: int) -> None:
        """The training loader's saved position (a checkpoint of another process count) in this layout's batches."""
        rescale_sampler_position(state, saved_accumulate, accumulate)

    def ordered_loader(self, ds) -> torch.utils.data.DataLoader:
        """Every item of ``ds`` once, in order, round-robin over ranks (the same batch count on every rank)."""
        sampler = StepBatchSampler(len(ds), self.micro_batch_size, self.world_size, self.rank, shuffle=False)
        return torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=self.collate(), num_workers=0,
                                           generator=loader_generator(self.seed))

    def val_dataloader(self):
        return [] if self.val_set is None else self.ordered_loader(self.val_set)

    def data_report(self) -> dict:
        return dict(self._report)
