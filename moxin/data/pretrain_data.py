"""Pretraining data module: sources -> mixture -> dedup -> tokenizer -> packer, in context-length phases.

Phases are Lightning epochs; each yields exactly ``steps * accumulate_grad_batches`` micro-batches on every
rank, and tokens per optimizer step stay the same in every phase (when ``seq_len`` doubles, the rows per
micro-batch halve). Every reader's state is saved in the checkpoint, for an exact resume, on the same or another
process count (moxin/data/reshard.py redistributes the run's first reader layout). Raw files or prepared shards (``prepared=DIR``). Details: docs/modules.md, "data/pretrain_data.py".
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from moxin.config import DataError, DecontaminateConfig, SourceConfig
from moxin.data.bad_records import RecordStats
from moxin.data.base import MoxinDataModule, loader_generator
from moxin.data.documents import validate_source
from moxin.data.mixture import validate_weights
from moxin.data.packed_dataset import PackedDataset, reader_states
from moxin.data.phases import Phase
from moxin.data.prepared import PreparedData
from moxin.data.reshard import ReshardedDataset, layout_of
from moxin.data.resume import ConsumedStateLoader

__all__ = ["PretrainDataModule"]


class PretrainDataModule(MoxinDataModule):
    """Packed pretraining batches in context-length phases, resumable mid-phase.

    Args:
        sources: list of :class:`SourceConfig` (or dicts with its keys).
        phases: list of :class:`Phase` (or dicts). Every phase's mixture names sources of ``sources``.
        tokenizer: the run's tokenizer object (picklable; ``encode(text, bos, eos)``, ``bos_id``, ``eos_id``);
            moxin/assemble.py hands it in through ``connect``.
        tokens_per_step: global tokens per optimizer step (all ranks, all accumulation micro-steps).
        micro_batch_tokens: tokens per device per micro-step; rows = micro_batch_tokens // seq_len.
        max_seq_len: the model's ``max_seq_len`` (``connect``); a phase beyond it is an error.
        num_workers: dataloader worker processes per rank (tokenization runs there).
        seed: mixture seed.
        dedup: drop exact duplicates (normalised-text hash) inside each reader.
        val_percent: percent of documents held out for validation (by hash); 0 disables validation.
        val_tokens: tokens per rank in the validation set (rounded down to whole micro-batches).
        world_size: data-parallel ranks (``connect``); ``None`` takes it from the trainer (1 without one). Needed
            before the trainer exists for :attr:`accumulate_grad_batches`.
        rank: this process's data-parallel rank; ``None`` takes it from the trainer.
        prepared: a folder written by ``python -m moxin.prepare`` (token shards + manifest) to read instead of the
            raw sources; ``None`` reads the sources themselves (small corpora, the default run).
        decontaminate: :class:`DecontaminateConfig` (or a dict): the sources must come from a ``prepared`` folder
            whose preparation checked them against these evaluation splits with these settings (the check runs
            in ``python -m moxin.prepare``: moxin/data/decontaminate.py); None: no such requirement.
        snapshot_every_n_steps: StatefulDataLoader snapshot interval (restore replays up to n-1 batches).
        validate_sources: check every source (exists, has documents, has the text field) in ``setup``.
        pin_memory: page-locked batches; ``None`` (default) pins where CUDA is available. A pageable batch's copy to
            the GPU first waits for every kernel already queued, so the GPU idles while the next step launches.
    """

    resumes_on_another_world = True  # the first layout's readers, redistributed (moxin/data/reshard.py)

    def __init__(
        self,
        sources: Sequence[SourceConfig | Mapping],
        phases: Sequence[Phase | Mapping],
        tokenizer: Any = None,
        tokens_per_step: int = 4 * 1024 * 1024,
        micro_batch_tokens: int = 16384,
        max_seq_len: int | None = None,
        num_workers: int = 2,
        seed: int = 1234,
        dedup: bool = True,
        val_percent: float = 0.1,
        val_tokens: int = 65536,
        world_size: int | None = None,
        snapshot_every_n_steps: int = 1,
        validate_sources: bool = True,
        pin_memory: bool | None = None,
        rank: int | None = None,
        prepared: str | None = None,
        decontaminate: DecontaminateConfig | Mapping | None = None,
    ):
        super().__init__(seed=seed, tokenizer=tokenizer, world_size=world_size, rank=rank, max_seq_len=max_seq_len)
        self.prepared = PreparedData(prepared) if prepared else None
        self.decontaminate = DecontaminateConfig.from_any(decontaminate)
        self.sources = [SourceConfig.from_any(s) for s in sources or []]
        if self.prepared is not None:
            self.sources = self._prepared_sources()
        self.phases = [Phase.from_any(p) for p in phases]
        self.tokens_per_step = int(tokens_per_step)
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.num_workers = int(num_workers)
        self.dedup = bool(dedup)
        self.val_percent = float(val_percent)
        self.val_tokens = int(val_tokens)
        self.snapshot_every_n_steps = int(snapshot_every_n_steps)
        self.validate_sources = validate_sources
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._validated = False
        self._train_loader = None
        self._train_phase: int | None = None
        # original rank -> worker -> reader state carried into the next loader (the streams this rank reads)
        self._carry: dict[int, dict[int, dict]] = {}
        self._layout: tuple[int, int] | None = None  # (world_size, num_workers) the run's readers started with
        self._resharded = False  # the current loader redistributes another layout's streams
        self._restored: dict | None = None  # datamodule state from a checkpoint
        self._train_phase_restored: int | None = None  # its phase
        self.check_config()

    def _prepared_sources(self) -> list[SourceConfig]:
        """The manifest's sources (in the given order when ``sources`` names some)."""
        have = self.prepared.sources
        names = [s.name for s in self.sources] or list(have)
        missing = [n for n in names if n not in have]
        if missing:
            raise DataError(f"data sources {missing} are not in data.prepared={str(self.prepared.path)!r} (it holds "
                            f"{list(have)}); prepare them, or drop them from data.sources and the mixtures")
        return [SourceConfig.from_any(have[n]["config"]) for n in names]

    # ---- configuration ------------------------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int:
        """tokens_per_step // (micro_batch_tokens * world_size); the same for every phase."""
        return self.tokens_per_step // (self.micro_batch_tokens * self.world_size)

    def micro_rows(self, phase: int | Phase) -> int:
        p = self.phases[phase] if isinstance(phase, int) else phase
        return self.micro_batch_tokens // p.seq_len

    def steps_in_phase(self, phase: int) -> int:
        return self.phases[phase].tokens // self.tokens_per_step

    def steps_per_epoch(self) -> list[int]:
        """Optimizer steps of every epoch (phase)."""
        return [self.steps_in_phase(i) for i in range(len(self.phases))]

    @property
    def num_epochs(self) -> int:
        """Lightning epochs of the run: one per phase (the trainer's max_epochs)."""
        return len(self.phases)

    def epoch_names(self) -> list[str]:
        return [p.name for p in self.phases]

    def planned_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    def phase_for_step(self, global_step: int) -> int:
        """Index of the phase that optimizer step ``global_step`` (0-based) belongs to (last phase past the end)."""
        acc = 0
        for i in range(len(self.phases)):
            acc += self.steps_in_phase(i)
            if global_step < acc:
                return i
        return len(self.phases) - 1

    def batches_per_rank(self, phase: int) -> int:
        """Micro-batches each rank yields in a phase: steps * accumulate_grad_batches."""
        return self.steps_in_phase(phase) * self.accumulate_grad_batches

    def check_config(self) -> None:
        """Raise DataError for any inconsistent setting (runs in __init__ and again once the trainer is known)."""
        if not self.sources:
            raise DataError("data: no sources given; list at least one source (name, path)")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise DataError(f"data: source names must be unique, got {names}")
        if not self.phases:
            raise DataError("data: no phases given; the schedule needs at least one phase (name, seq_len, tokens, mixture)")
        pnames = [p.name for p in self.phases]
        if len(set(pnames)) != len(pnames):
            raise DataError(f"data: phase names must be unique, got {pnames}")
        for key in ("tokens_per_step", "micro_batch_tokens") + (("max_seq_len",) if self.max_seq_len else ()):
            if getattr(self, key) <= 0:
                raise DataError(f"data: {key} must be > 0, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise DataError(f"data: num_workers must be >= 0, got {self.num_workers}")
        if not 0 <= self.val_percent < 100:
            raise DataError(f"data: val_percent must be in [0, 100), got {self.val_percent}")
        ws = self.world_size
        per_micro = self.micro_batch_tokens * ws
        if self.tokens_per_step % per_micro:
            raise DataError(
                f"data: tokens_per_step={self.tokens_per_step} is not a multiple of micro_batch_tokens * world_size "
                f"= {self.micro_batch_tokens} * {ws} = {per_micro}; change tokens_per_step or micro_batch_tokens "
                "so that gradient accumulation is a whole number"
            )
        for p in self.phases:
            where = f"phase {p.name!r}"
            if p.seq_len <= 0:
                raise DataError(f"{where}: seq_len must be > 0, got {p.seq_len}")
            if self.max_seq_len and p.seq_len > self.max_seq_len:
                raise DataError(
                    f"{where}: seq_len {p.seq_len} is beyond the model's max_seq_len {self.max_seq_len}; "
                    "lower the phase's seq_len or use a model config with a larger max_seq_len"
                )
            if self.micro_batch_tokens % p.seq_len:
                raise DataError(
                    f"{where}: micro_batch_tokens={self.micro_batch_tokens} is not a multiple of seq_len={p.seq_len}; "
                    "choose micro_batch_tokens as a multiple of every phase's seq_len"
                )
            if p.tokens < self.tokens_per_step:
                raise DataError(
                    f"{where}: token budget {p.tokens} is less than one optimizer step ({self.tokens_per_step} "
                    "tokens_per_step); raise the phase's tokens or lower tokens_per_step"
                )
            validate_weights(p.mixture, names, where)

    # ---- Lightning hooks ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.check_config()
        self.check_trainer()
        used = {n for p in self.phases for n, w in p.mixture.items() if float(w) > 0}
        self._check_prepared()
        if self.validate_sources and not self._validated:
            for s in self.sources:
                if s.name in used:
                    validate_source(s)
            self._validated = True

    def _check_prepared(self) -> None:
        """Prepared data: the run's tokenizer and every shard of the used sources (always, whatever
        validate_sources says: it is cheap, and ids of another tokenizer would train silently); with
        ``decontaminate``, a preparation that checked the sources with those settings."""
        if self.decontaminate is not None and not self._validated:
            want = self.decontaminate.settings()
            have = None if self.prepared is None else (self.prepared.manifest.get("decontamination") or {}).get(
                "settings")
            if have != want:
                where = ("the sources are read raw" if self.prepared is None else
                         f"data.prepared={str(self.prepared.path)!r} was prepared with decontamination {have}")
                raise DataError(f"data.decontaminate is {want}, but {where}: benchmark training splits would be "
                                "trained on unchecked. Run `python -m moxin.prepare data=<this data config> out=DIR` "
                                "(it writes DIR/decontamination.json) and train with data.prepared=DIR, or set "
                                "data.decontaminate=null to train without the check")
        if self.prepared is not None and not self._validated:
            used = {n for p in self.phases for n, w in p.mixture.items() if float(w) > 0}
            self.prepared.check_tokenizer(self.tokenizer)
            self.prepared.check_files(sorted(used))
            self._validated = True

    def check_trainer(self) -> None:
        super().check_trainer()
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            if trainer.max_epochs is not None and trainer.max_epochs != len(self.phases):
                raise DataError(f"trainer.max_epochs={trainer.max_epochs}; set it to the number of phases ({len(self.phases)})")
            if not getattr(trainer, "reload_dataloaders_every_n_epochs", 1):
                raise DataError("set trainer reload_dataloaders_every_n_epochs=1 (one loader per phase)")

    def _current_phase(self) -> int:
        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        if epoch >= len(self.phases):
            raise DataError(f"epoch {epoch} has no phase (phases: {[p.name for p in self.phases]}); max_epochs too large")
        return epoch

    def _harvest(self) -> None:
        """Remember the reader states of the current loader (the carry into the next phase / checkpoint)."""
        if self._train_loader is None or getattr(self._train_loader, "_iterator", None) is None:
            return  # never iterated: the carry is still the states it was built with
        for st in reader_states(self._train_loader.state_dict()):
            self._carry.setdefault(int(st["rank"]), {})[int(st["worker"])] = st

    def build_train_loader(self, phase: int, rank: int | None = None, world_size: int | None = None):
        """The StatefulDataLoader of one phase (rank/world_size default to the trainer's)."""
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        self._check_prepared()
        self._harvest()
        here = (world_size, max(self.num_workers, 1))  # a loader without workers is one reader (worker 0 of 1)
        resharded_state, restoring = False, self._restored is not None
        if restoring:
            readers = {int(r): {int(w): st for w, st in by_w.items()}
                       for r, by_w in self._restored.get("readers", {}).items()}
            if any(self._restored.get("pending_in_step", {}).values()):
                raise DataError("the checkpoint's data state was taken inside an optimizer step; resume from one "
                                "written at a step boundary (every moxin checkpoint is)")
            self._layout = layout_of(readers) or here
            resharded_state = bool(self._restored.get("resharded"))
            self._carry = readers
            self._restored = None
        self._layout = self._layout or here
        # mid-phase from a redistributed state, the phase goes on redistributed (its position is per stream)
        self._resharded = self._layout != here or (resharded_state and phase == self._train_phase_restored)
        make = self._reader_factory(phase)
        if self._resharded:
            n0 = self._layout[0]
            ds = ReshardedDataset(make, layout=self._layout, rank=rank, world_size=world_size,
                                  batches_per_step=self.accumulate_grad_batches * world_size,
                                  steps=self.steps_in_phase(phase), initial=self._carry)
            self._carry = {r: v for r, v in self._carry.items() if r in ds.streams}
            if restoring and rank == 0 and self._layout != here:
                print(f"data: resuming the readers of {n0} processes x {self._layout[1]} workers on {world_size} "
                      "processes: each reads the streams its share of a step touches, without dataloader workers "
                      "(moxin/data/reshard.py)", file=sys.stderr, flush=True)
        else:
            mine = self._carry.get(rank, {})
            self._carry = {rank: dict(mine)}
            ds = make(rank, None, mine)
        loader = ConsumedStateLoader(
            ds,
            batch_size=None,
            num_workers=0 if self._resharded else self.num_workers,
            snapshot_every_n_steps=self.snapshot_every_n_steps,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            generator=loader_generator(self.seed),
            ignore_restored_state=self._resharded or resharded_state,  # a redistributed loader's state is no use
        )
        self._train_loader, self._train_phase = loader, phase
        return loader

    def _reader_factory(self, phase: int):
        """make(rank, worker, initial) -> the PackedDataset of the readers of original rank ``rank`` in ``phase``
        (one reader when ``worker`` is given: moxin/data/reshard.py runs each in its own dataset)."""
        world0 = self._layout[0]
        per_stream = self.steps_in_phase(phase) * (self.tokens_per_step // (self.micro_batch_tokens * world0))

        def make(rank: int, worker: int | None, initial: Mapping[int, dict]) -> PackedDataset:
            states = dict(initial) if worker is None else {w: st for w, st in initial.items() if w == worker}
            return PackedDataset(
                self.sources,
                self.phases[phase],
                self.tokenizer,
                micro_rows=self.micro_rows(phase),
                num_batches=per_stream,
                rank=rank,
                world_size=world0,
                seed=self.seed,
                dedup=self.dedup and self.prepared is None,
                val_percent=self.val_percent,
                initial_states=states,
                prepared=self.prepared,
            )
        return make

    def train_dataloader(self):
        return self.build_train_loader(self._current_phase())

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # called by Lightning for the batch that is about to be trained on (not for prefetched ones)
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and self._train_loader is not None:
            self._train_loader.consumed += 1
        return batch

    def val_dataloader(self):
        if self.val_percent <= 0 or self.val_tokens <= 0:
            return []
        phase = self.phases[self._current_phase() if getattr(self, "trainer", None) is not None else 0]
        rows = self.micro_rows(phase)
        n = self.val_tokens // (rows * phase.seq_len)
        if n == 0:
            raise DataError(f"data: val_tokens={self.val_tokens} is less than one micro-batch "
                            f"({rows * phase.seq_len} tokens in phase {phase.name!r}); raise val_tokens or set it to 0")
        ds = PackedDataset(
            self.sources, phase, self.tokenizer, micro_rows=rows, num_batches=n, rank=self.rank,
            world_size=self.world_size, seed=self.seed, dedup=self.dedup and self.prepared is None,
            val_percent=self.val_percent, split="val", prepared=self.prepared,
        )
        return DataLoader(ds, batch_size=None, num_workers=0, generator=loader_generator(self.seed))

    # ---- checkpoint state (Lightning saves it under checkpoint["datamodule"]... via state_dict) -------------
    def state_dict(self) -> dict:
        self._harvest()
        mine = {int(r): {int(w): st for w, st in by_w.items()} for r, by_w in self._carry.items()}
        # a redistributed loader's readers are a whole step ahead of a step's first batches (reshard.py)
        pending = int(self._resharded and self._train_loader is not None
                      and self._train_loader.consumed % self.accumulate_grad_batches != 0)
        gathered = [(self.rank, mine, pending)]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, mine, pending))
        readers: dict[int, dict] = {}
        for _, by_rank, _ in gathered:  # a stream read by several ranks (more ranks than it had) is the same on each
            for r, by_w in by_rank.items():
                readers.setdefault(r, by_w)
        return {"readers": readers, "phase": self._train_phase, "resharded": self._resharded,
                "pending_in_step": {r: p for r, _, p in gathered}}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state
        self._train_phase_restored = state.get("phase")
        self._carry = {}

    # ---- report -------------------------------------------------------------------------------------------
    def data_report(self) -> dict:
        """Counts of this rank's readers so far (cumulative over phases): per source records, bad records
        (with the first ``file:line`` examples), empty texts, dedup seen / dropped, documents held out for
        validation, tokens read; with prepared data, the manifest's totals (its per-source counts are in
        ``manifest.json``)."""
        self._harvest()
        per_source: dict[str, dict] = {}
        totals = {"tokens": 0, "val_held_out": 0, "batches_this_phase": 0}
        for st in (st for by_w in self._carry.values() for st in by_w.values()):
            totals["tokens"] += int(st["tokens"])
            totals["val_held_out"] += int(st["val_skipped"])
            totals["batches_this_phase"] += int(st["batches"])
            dd = (st.get("dedup") or {}).get("counts", {})
            for n, s in st["sources"].items():
                agg = per_source.setdefault(n, {"stats": RecordStats(), "dedup_seen": 0, "dedup_dropped": 0,
                                                "passes": 0})
                agg["stats"].merge(RecordStats.from_dict(s["stats"]))
                started = s["pos"] not in (0, [0, 0]) or s["pass"]
                agg["passes"] = max(agg["passes"], int(s["pass"]) + (1 if started else 0))
                if n in dd:
                    agg["dedup_seen"] += int(dd[n]["seen"])
                    agg["dedup_dropped"] += int(dd[n]["dropped"])
        phase = self._train_phase
        if self.prepared is not None:  # records, bad ones and duplicates were counted once, by the prepare step
            totals["prepared"] = {"path": str(self.prepared.path), **self.prepared.manifest.get("totals", {})}
        return {
            "rank": self.rank,
            "phase": None if phase is None else self.phases[phase].name,
            "sources": {n: {**agg.pop("stats").to_dict(), **agg} for n, agg in per_source.items()},
            **totals,
        }
