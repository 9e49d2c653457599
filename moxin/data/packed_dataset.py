"""The packed micro-batches of one pretraining phase on one rank: sources -> mixture -> dedup / held-out split
-> tokenizer -> packer.

Every (rank, dataloader worker) pair is one reader, a shard of every source, tokenizing in its worker. Its state
(mixture RNG, dedup hashes, packer buffer, source positions, counts) restores it exactly, and the next phase
continues from it. Held-out documents are chosen by text hash. Details: docs/modules.md, "data/packed_dataset.py".
"""

from __future__ import annotations

import copy
import hashlib
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from moxin.config import DataError, SourceConfig
from moxin.data.bad_records import RecordStats
from moxin.data.dedup import DedupFilter, text_hash
from moxin.data.documents import iter_records
from moxin.data.mixture import Mixture, validate_weights
from moxin.data.packing import Packer
from moxin.data.phases import Phase
from moxin.data.prepared import PreparedData

__all__ = ["PackedDataset", "reader_states"]

_MARK = "moxin_packed"


def reader_states(obj: Any, out: list | None = None) -> list:
    """All reader states (dicts marked ``moxin_packed``) inside a StatefulDataLoader state, any nesting."""
    out = [] if out is None else out
    if isinstance(obj, dict):
        if obj.get(_MARK):
            out.append(obj)
        else:
            for v in obj.values():
                reader_states(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            reader_states(v, out)
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
        prepared: PreparedData | None = None,
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
        self.prepared = prepared
        self.origin = "raw" if prepared is None else f"prepared:{prepared.identity}"
        self.weights = validate_weights(phase.mixture, list(self.sources), f"phase {phase.name!r}")
        self._pending: dict | None = None
        self._live: dict | None = None

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
                n: {"pos": 0, "pass": 0, "kept_in_pass": 0, "stats": RecordStats().to_dict()} for n in self.sources
            },
            "val_skipped": 0,
            "train_skipped": 0,
            "tokens": 0,
            "origin": self.origin,
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
        if state.get("origin", "raw") != self.origin:
            raise DataError(
                f"data state was saved reading {state.get('origin', 'raw')!r}, this run reads {self.origin!r} "
                "(raw sources, or a prepared folder by its manifest hash); positions of one mean nothing in the "
                "other. Resume with the data the run was started with (data.prepared as it was)."
            )
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

    def reader_state(self, worker: int, num_workers: int) -> dict:
        """The state of reader (rank, ``worker`` of ``num_workers``) now: live while iterating, else where it
        starts (for a caller that runs the reader in its own process: moxin/data/reshard.py)."""
        return self._snapshot() if self._live is not None else self.start_state(worker, num_workers)

    def start_state(self, worker: int, num_workers: int) -> dict:
        """Where a new iteration of reader (rank, ``worker``) starts, whatever an earlier iterator read."""
        return self._start_state(worker, num_workers)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_reader(*self._worker())

    def iter_reader(self, worker: int, num_workers: int) -> Iterator[dict[str, torch.Tensor]]:
        """The micro-batches of reader (this rank, ``worker`` of ``num_workers``) in this phase."""
        state = self._start_state(worker, num_workers)
        self._pending = None
        tok = self.tokenizer
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
        self._stats = {n: RecordStats.from_dict(v["stats"]) for n, v in state["sources"].items()}
        self._live = state
        srcs = state["sources"]
        readers: dict[str, Iterator] = {}
        exhausted: set[str] = set()

        def reader(name):
            if name not in readers:
                if self.prepared is not None:
                    readers[name] = self.prepared.iter_docs(name, shard, nshards, srcs[name]["pos"])
                else:
                    readers[name] = ((pos, None, text) for pos, text in iter_records(
                        self.sources[name], shard, nshards, srcs[name]["pos"], self._stats[name]))
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
                            f"(rank {self.rank}, worker {worker}) gave no training document ("
                            + (f"records read: {self._stats[name].records}" if self.prepared is None else
                               f"data.prepared holds {self.prepared.num_docs(name)} documents of it")
                            + "; all empty, bad, duplicates or held out for validation, "
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
            pos, h, doc = got  # doc: the text (raw) or its token ids (prepared, hash h)
            srcs[name]["pos"] = pos
            if self.val_percent > 0 or self.dedup:
                h = text_hash(doc) if h is None else h
                if self.val_percent > 0 and self._is_val(h) != (self.split == "val"):
                    state["val_skipped" if self.split == "train" else "train_skipped"] += 1
                    continue
                if self.dedup and not self._dedup.keep(h, name, srcs[name]["pass"]):
                    continue
            srcs[name]["kept_in_pass"] += 1
            ids = tok.encode(doc, bos=False, eos=False) if isinstance(doc, str) else doc.tolist()
            state["tokens"] += len(ids)
            self._packer.add(ids)
