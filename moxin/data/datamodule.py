"""Pretraining data module: sources -> mixture -> dedup -> tokenizer -> packer, in context-length phases.

Phases are Lightning epochs. Run the trainer with ``max_epochs=len(phases)``,
``reload_dataloaders_every_n_epochs=1`` and ``accumulate_grad_batches=dm.accumulate_grad_batches``;
``train_dataloader()`` builds the loader of phase ``trainer.current_epoch``. Each phase's loader yields
exactly ``steps * accumulate_grad_batches`` micro-batches of ``micro_batch_tokens // seq_len`` rows on every
rank, then ends (so DDP ranks never wait on each other and the epoch ends at the phase boundary). Tokens per
optimizer step, ``micro_batch_tokens * accumulate * world_size = tokens_per_step``, are the same in every phase:
when ``seq_len`` doubles, the rows per micro-batch halve.

Readers: every (rank, dataloader worker) pair is one shard of every source (record index mod
``world_size * num_workers``). Each reader tokenizes in its worker process and yields ready micro-batches.

Exact resume: the loader is a ``torchdata`` ``StatefulDataLoader``; Lightning's fit loop saves its
``state_dict()`` in the checkpoint (``loops.fit_loop.state_dict.combined_loader``) and loads it into the
rebuilt loader on restart. The dataset's own state (mixture RNG, dedup hashes, packer buffer, per-source
positions and passes, counts, micro-batches yielded) restores each worker exactly. Because Lightning writes the
checkpoint from rank 0 only, :meth:`PretrainDataModule.state_dict` also gathers every rank's reader states
(saved in the checkpoint's ``datamodule`` entry) and each rank substitutes its own on load.
At a phase boundary the new phase's readers continue from the previous phase's final reader states (source
positions, dedup set, packer buffer, counts), with the new mixture and sequence length.

Validation: documents whose hash falls under ``val_percent`` (``hash % 10000 < val_percent * 100``) are held out
of training; the val loader packs the first ``val_tokens`` tokens' worth of them (current phase ``seq_len``,
per rank) and yields the same rows every time.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from moxin.data.dedup import DedupFilter, text_hash
from moxin.data.mixture import Mixture, validate_weights
from moxin.data.packing import Packer
from moxin.data.common import RankedDataModule
from moxin.data.sources import DataError, plain, SourceConfig, SourceStats, iter_records, validate_source

__all__ = ["Phase", "PackedDataset", "PretrainDataModule", "resolve_tokenizer"]

log = logging.getLogger(__name__)
_MARK = "moxin_packed"


@dataclass
class Phase:
    """One context-length phase.

    Args:
        name: shown in logs and checkpoints (``ctx2k``, ``ctx4k``, ``anneal`` ...).
        seq_len: tokens per packed row in this phase (<= the model's ``max_seq_len``; must divide
            ``micro_batch_tokens``).
        tokens: token budget of the phase; steps = tokens // tokens_per_step (the remainder is not trained).
        mixture: source name -> weight (per document; normalised; 0 leaves a source out).
    """

    name: str
    seq_len: int
    tokens: int
    mixture: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_any(cls, obj: Any) -> "Phase":
        if isinstance(obj, Phase):
            return obj
        obj = plain(obj)
        if not isinstance(obj, Mapping):
            raise DataError(f"phase must be a mapping with keys name, seq_len, tokens, mixture; got {obj!r}")
        unknown = set(obj) - set(cls.__dataclass_fields__)
        if unknown:
            raise DataError(f"phase {obj.get('name', '?')!r}: unknown key(s) {sorted(unknown)}; "
                            "allowed: name, seq_len, tokens, mixture")
        missing = {"name", "seq_len", "tokens"} - set(obj)
        if missing:
            raise DataError(f"phase {obj.get('name', '?')!r}: missing key(s) {sorted(missing)}")
        return cls(str(obj["name"]), int(obj["seq_len"]), int(float(obj["tokens"])), dict(obj.get("mixture") or {}))


def resolve_tokenizer(spec: Any):
    """A tokenizer object (anything with encode/bos_id/eos_id) or a spec for ``moxin.tokenizer.load_tokenizer``."""
    if not isinstance(spec, (str, os.PathLike)) and hasattr(spec, "encode"):  # str has .encode too
        return spec
    from moxin.tokenizer import load_tokenizer

    return load_tokenizer(spec)


def _find_states(obj: Any, out: list) -> list:
    """All reader states (dicts marked ``moxin_packed``) inside a StatefulDataLoader state, any nesting."""
    if isinstance(obj, dict):
        if obj.get(_MARK):
            out.append(obj)
        else:
            for v in obj.values():
                _find_states(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _find_states(v, out)
    return out


class PackedDataset(IterableDataset):
    """The micro-batches of one phase on one rank (split across dataloader workers).

    Yields ``{"input_ids", "labels", "positions"}`` of shape ``(micro_rows, seq_len)``; exactly
    ``num_batches`` of them over all workers of this rank. ``split="val"`` reads only held-out documents,
    one pass, no wrap-around (it may end early when the held-out set is small).
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        phase: Phase,
        tokenizer: Any,
        *,
        micro_rows: int,
        num_batches: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        dedup: bool = True,
        val_percent: float = 0.0,
        split: str = "train",
        initial_states: Mapping[int, dict] | None = None,
    ):
        self.sources = {s.name: s for s in sources}
        self.phase = phase
        self.tokenizer = tokenizer
        self.micro_rows = micro_rows
        self.num_batches = num_batches
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.dedup = dedup
        self.val_percent = val_percent
        self.split = split
        self.initial_states = dict(initial_states or {})
        self.weights = validate_weights(phase.mixture, list(self.sources), f"phase {phase.name!r}")
        self._pending: dict | None = None
        self._live: dict | None = None
        self._tok = None

    # ---- state ------------------------------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def _fresh_state(self, worker: int, num_workers: int) -> dict:
        return {
            _MARK: 1,
            "phase": self.phase.name,
            "split": self.split,
            "rank": self.rank,
            "world_size": self.world_size,
            "worker": worker,
            "num_workers": num_workers,
            "batches": 0,
            "mixture": None,
            "dedup": None,
            "packer": None,
            "sources": {
                n: {"pos": 0, "pass": 0, "kept_in_pass": 0, "stats": SourceStats().to_dict()} for n in self.sources
            },
            "val_skipped": 0,
            "train_skipped": 0,
            "tokens": 0,
        }

    def state_dict(self) -> dict:
        if self._live is not None:
            return self._snapshot()
        if self._pending is not None:
            return self._pending
        w, nw = self._worker()
        if get_worker_info() is None and self.initial_states.get(0, {}).get("num_workers", 1) != 1:
            return dict(self.initial_states[0])
        return self._start_state(w, nw)

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def _start_state(self, worker: int, num_workers: int) -> dict:
        """The state a fresh iteration starts from: loaded, else carried from the previous phase, else new."""
        mine = self.initial_states.get(worker)
        state = self._pending
        if state is not None and state.get("rank") != self.rank and mine is not None:
            state = mine  # Lightning restored rank 0's loader state; use this rank's own (from the datamodule)
        if state is None:
            state = mine
        if state is None:
            return self._fresh_state(worker, num_workers)
        if state.get("num_workers") != num_workers or state.get("world_size") != self.world_size:
            raise DataError(
                f"data state was saved with world_size={state.get('world_size')}, num_workers="
                f"{state.get('num_workers')}; this run has world_size={self.world_size}, num_workers={num_workers}. "
                "Resume with the same devices and data.num_workers (the readers' shards depend on both)."
            )
        if state.get("worker") != worker:
            raise DataError(f"data state of worker {state.get('worker')} given to worker {worker}")
        state = copy.deepcopy(state)
        if state["phase"] != self.phase.name or state.get("split") != self.split:
            # carry across a phase boundary: keep positions, dedup, packer buffer and counts; new mixture
            state["phase"], state["split"], state["batches"], state["mixture"] = self.phase.name, self.split, 0, None
        state["rank"] = self.rank
        return state

    def _snapshot(self) -> dict:
        st = dict(self._live)
        st["mixture"] = self._mixture.state_dict()
        st["dedup"] = self._dedup.state_dict()
        st["packer"] = self._packer.state_dict()
        st["sources"] = {
            n: {**v, "stats": self._stats[n].to_dict()} for n, v in self._live["sources"].items()
        }
        return st

    # ---- iteration ----------------------------------------------------------------------------------------
    def _is_val(self, h: int) -> bool:
        return (h % 10000) < self.val_percent * 100

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = self._worker()
        state = self._start_state(worker, num_workers)
        self._pending = None
        if self._tok is None:
            self._tok = resolve_tokenizer(self.tokenizer)
        tok = self._tok
        shard, nshards = self.rank * num_workers + worker, self.world_size * num_workers
        my_batches = self.num_batches // num_workers + (1 if worker < self.num_batches % num_workers else 0)

        key = f"{self.seed}/{self.phase.name}/{shard}/{nshards}/{self.split}".encode()
        self._mixture = Mixture(self.weights, seed=int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))
        if state["mixture"] is not None:
            self._mixture.load_state_dict(state["mixture"])
        self._dedup = DedupFilter(list(self.sources))
        if state["dedup"] is not None:
            self._dedup.load_state_dict(state["dedup"])
        self._packer = Packer(self.phase.seq_len, tok.bos_id, tok.eos_id)
        if state["packer"] is not None:
            self._packer.load_state_dict(state["packer"])
        self._stats = {n: SourceStats.from_dict(v["stats"]) for n, v in state["sources"].items()}
        self._live = state
        srcs = state["sources"]
        readers: dict[str, Iterator] = {}
        exhausted: set[str] = set()

        def reader(name):
            if name not in readers:
                readers[name] = iter_records(self.sources[name], shard, nshards, srcs[name]["pos"], self._stats[name])
            return readers[name]

        def next_doc(name):
            while True:
                try:
                    return next(reader(name))
                except StopIteration:
                    readers.pop(name, None)
                    s = srcs[name]
                    if self.split == "val" and s["kept_in_pass"] == 0:
                        exhausted.add(name)  # no held-out document of this source in this shard
                        return None
                    # validation cycles over its held-out documents like training does, so every rank yields
                    # exactly the same number of batches (FSDP forwards are collective: a rank that stopped
                    # early would hang the others)
                    if self.split != "val" and s["kept_in_pass"] == 0:
                        raise DataError(
                            f"data source {name!r}: a full pass over reader shard {shard}/{nshards} "
                            f"(rank {self.rank}, worker {worker}) gave no training document (records read: "
                            f"{self._stats[name].records}; all empty, bad, duplicates or held out for validation, "
                            f"or the source has fewer documents than world_size*num_workers={nshards}). "
                            "Add data, lower num_workers, or drop the source from the mixture."
                        ) from None
                    s["pass"], s["pos"], s["kept_in_pass"] = s["pass"] + 1, 0, 0

        rows: list[dict[str, torch.Tensor]] = []
        while state["batches"] < my_batches:
            row = self._packer.pop_row()
            if row is not None:
                rows.append(row)
                if len(rows) == self.micro_rows:
                    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
                    rows = []
                    state["batches"] += 1
                    yield batch
                continue
            if self.split == "val" and len(exhausted) == len(self._mixture.names):
                raise DataError(
                    f"validation on rank {self.rank}: no held-out document in any source of phase "
                    f"{self.phase.name!r} for this shard; raise data.val_percent, or set data.val_percent=0 "
                    "to train without validation")
            name = self._mixture.choose()
            if name in exhausted:
                continue
            got = next_doc(name)
            if got is None:
                continue
            pos, text = got
            srcs[name]["pos"] = pos
            if self.val_percent > 0 or self.dedup:
                h = text_hash(text)
                if self.val_percent > 0 and self._is_val(h) != (self.split == "val"):
                    state["val_skipped" if self.split == "train" else "train_skipped"] += 1
                    continue
                if self.dedup and not self._dedup.keep(h, name, srcs[name]["pass"]):
                    continue
            srcs[name]["kept_in_pass"] += 1
            ids = tok.encode(text, bos=False, eos=False)
            state["tokens"] += len(ids)
            self._packer.add(ids)


def _consumed_state_loader_cls():
    from torchdata.stateful_dataloader import StatefulDataLoader

    class ConsumedStateLoader(StatefulDataLoader):
        """A StatefulDataLoader whose `state_dict()` describes the batches the MODEL has consumed.

        Lightning's fetcher runs one batch ahead of the training step (to know which batch is the last), so
        the plain loader state at checkpoint time already counts a batch that was never trained on, and a
        resumed run would skip it. We record the loader state after every yielded batch and answer with the
        one matching `consumed`, which the data module advances as each batch reaches the training step."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._states: dict[int, dict] = {}
            self._yielded = 0
            self.consumed = 0

        def __iter__(self):
            it = super().__iter__()
            self._yielded = self.consumed = 0
            self._states = {0: super().state_dict()}
            return self._track(it)

        def _track(self, it):
            for batch in it:
                self._yielded += 1
                self._states[self._yielded] = super().state_dict()
                self._states.pop(self._yielded - 4, None)  # the fetcher is never more than a batch or two ahead
                yield batch

        def state_dict(self):
            if self._yielded and self.consumed in self._states:
                return self._states[self.consumed]
            return super().state_dict()

    return ConsumedStateLoader


class PretrainDataModule(RankedDataModule):
    """Packed pretraining batches in context-length phases, resumable mid-phase.

    Args:
        sources: list of :class:`SourceConfig` (or dicts with its keys).
        phases: list of :class:`Phase` (or dicts). Every phase's mixture names sources of ``sources``.
        tokenizer: a spec for ``moxin.tokenizer.load_tokenizer`` (``"mistral"``, a tokenizer.json path) or a
            tokenizer object (picklable; ``encode(text, bos, eos)``, ``bos_id``, ``eos_id``).
        tokens_per_step: global tokens per optimizer step (all ranks, all accumulation micro-steps).
        micro_batch_tokens: tokens per device per micro-step; rows = micro_batch_tokens // seq_len.
        max_seq_len: the model's ``max_seq_len``; a phase beyond it is an error.
        num_workers: dataloader worker processes per rank (tokenization runs there).
        seed: mixture seed.
        dedup: drop exact duplicates (normalised-text hash) inside each reader.
        val_percent: percent of documents held out for validation (by hash); 0 disables validation.
        val_tokens: tokens per rank in the validation set (rounded down to whole micro-batches).
        world_size: data-parallel ranks; ``None`` takes it from the trainer (1 without one). Needed before the
            trainer exists for :attr:`accumulate_grad_batches`.
        snapshot_every_n_steps: StatefulDataLoader snapshot interval (restore replays up to n-1 batches).
        validate_sources: check every source (exists, has documents, has the text field) in ``setup``.
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig | Mapping],
        phases: Sequence[Phase | Mapping],
        tokenizer: Any = "mistral",
        tokens_per_step: int = 4 * 1024 * 1024,
        micro_batch_tokens: int = 16384,
        max_seq_len: int = 32768,
        num_workers: int = 2,
        seed: int = 1234,
        dedup: bool = True,
        val_percent: float = 0.1,
        val_tokens: int = 65536,
        world_size: int | None = None,
        snapshot_every_n_steps: int = 1,
        validate_sources: bool = True,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.sources = [SourceConfig.from_any(s) for s in sources]
        self.phases = [Phase.from_any(p) for p in phases]
        self.tokenizer = tokenizer
        self.tokens_per_step = int(tokens_per_step)
        self.micro_batch_tokens = int(micro_batch_tokens)
        self.max_seq_len = int(max_seq_len)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.dedup = bool(dedup)
        self.val_percent = float(val_percent)
        self.val_tokens = int(val_tokens)
        self._world_size = world_size
        self.snapshot_every_n_steps = int(snapshot_every_n_steps)
        self.validate_sources = validate_sources
        self.pin_memory = pin_memory
        self._validated = False
        self._train_loader = None
        self._train_phase: int | None = None
        self._carry: dict[int, dict] = {}  # worker -> state carried into the next loader (this rank)
        self._restored: dict | None = None  # datamodule state from a checkpoint
        self.check_config()

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

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in_phase(i) for i in range(len(self.phases)))

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
        for key in ("tokens_per_step", "micro_batch_tokens", "max_seq_len"):
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
            if p.seq_len > self.max_seq_len:
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
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            acc = getattr(trainer, "accumulate_grad_batches", None)
            if acc is not None and acc != self.accumulate_grad_batches:
                raise DataError(
                    f"trainer.accumulate_grad_batches={acc} but the data module needs {self.accumulate_grad_batches} "
                    f"(tokens_per_step {self.tokens_per_step} / (micro_batch_tokens {self.micro_batch_tokens} * "
                    f"world_size {self.world_size})); pass accumulate_grad_batches=datamodule.accumulate_grad_batches"
                )
            if trainer.max_epochs is not None and trainer.max_epochs != len(self.phases):
                raise DataError(f"trainer.max_epochs={trainer.max_epochs}; set it to the number of phases ({len(self.phases)})")
            if not getattr(trainer, "reload_dataloaders_every_n_epochs", 1):
                raise DataError("set trainer reload_dataloaders_every_n_epochs=1 (one loader per phase)")
        if self.validate_sources and not self._validated:
            used = {n for p in self.phases for n, w in p.mixture.items() if float(w) > 0}
            for s in self.sources:
                if s.name in used:
                    validate_source(s)
            self._validated = True

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
        for st in _find_states(self._train_loader.state_dict(), []):
            self._carry[int(st["worker"])] = st

    def build_train_loader(self, phase: int, rank: int | None = None, world_size: int | None = None):
        """The StatefulDataLoader of one phase (rank/world_size default to the trainer's)."""
        StatefulDataLoader = _consumed_state_loader_cls()
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        self._harvest()
        initial = dict(self._carry)
        if self._restored is not None:
            by_rank = self._restored.get("readers", {})
            mine = by_rank.get(rank, by_rank.get(str(rank)))
            if mine:
                initial = {int(w): s for w, s in mine.items()}
            self._restored = None
        self._carry = dict(initial)
        ds = PackedDataset(
            self.sources,
            self.phases[phase],
            self.tokenizer,
            micro_rows=self.micro_rows(phase),
            num_batches=self.batches_per_rank(phase),
            rank=rank,
            world_size=world_size,
            seed=self.seed,
            dedup=self.dedup,
            val_percent=self.val_percent,
            initial_states=initial,
        )
        loader = StatefulDataLoader(
            ds,
            batch_size=None,
            num_workers=self.num_workers,
            snapshot_every_n_steps=self.snapshot_every_n_steps,
            pin_memory=self.pin_memory,
            persistent_workers=False,
        )
        self._train_loader, self._train_phase = loader, phase
        return loader

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
            world_size=self.world_size, seed=self.seed, dedup=self.dedup, val_percent=self.val_percent, split="val",
        )
        return DataLoader(ds, batch_size=None, num_workers=0)

    # ---- checkpoint state (Lightning saves it under checkpoint["datamodule"]... via state_dict) -------------
    def state_dict(self) -> dict:
        self._harvest()
        mine = {int(w): s for w, s in self._carry.items()}
        readers = {self.rank: mine}
        if torch.distributed.is_available() and torch.distributed.is_initialized() and self.world_size > 1:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (self.rank, mine))
            readers = {r: s for r, s in gathered}
        return {"readers": readers, "phase": self._train_phase}

    def load_state_dict(self, state: dict) -> None:
        self._restored = state
        self._carry = {}

    # ---- report -------------------------------------------------------------------------------------------
    def data_report(self) -> dict:
        """Counts of this rank's readers so far (cumulative over phases): per source records, bad records
        (with the first ``file:line`` examples), empty texts, dedup seen / dropped, documents held out for
        validation, tokens read."""
        self._harvest()
        per_source: dict[str, dict] = {}
        totals = {"tokens": 0, "val_held_out": 0, "batches_this_phase": 0}
        for st in self._carry.values():
            totals["tokens"] += int(st["tokens"])
            totals["val_held_out"] += int(st["val_skipped"])
            totals["batches_this_phase"] += int(st["batches"])
            dd = (st.get("dedup") or {}).get("counts", {})
            for n, s in st["sources"].items():
                agg = per_source.setdefault(
                    n, {"records": 0, "bad": 0, "empty": 0, "bad_examples": [], "dedup_seen": 0,
                        "dedup_dropped": 0, "passes": 0}
                )
                ss = SourceStats.from_dict(s["stats"])
                cur = SourceStats(agg["records"], agg["bad"], agg["empty"], agg["bad_examples"])
                cur.merge(ss)
                agg.update(records=cur.records, bad=cur.bad, empty=cur.empty, bad_examples=cur.bad_examples)
                agg["passes"] = max(agg["passes"], int(s["pass"]) + (1 if s["pos"] or s["pass"] else 0))
                if n in dd:
                    agg["dedup_seen"] += int(dd[n]["seen"])
                    agg["dedup_dropped"] += int(dd[n]["dropped"])
        phase = self._train_phase
        return {
            "rank": self.rank,
            "phase": None if phase is None else self.phases[phase].name,
            "sources": per_source,
            **totals,
        }
