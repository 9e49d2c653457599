"""SFT data: Tülu-form conversations -> chat template -> packed rows with an assistant-only loss mask.

Records are ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` (the form of
``allenai/tulu-3-sft-mixture``), read from a local jsonl / parquet file, folder or glob, or a Hugging Face hub
dataset name (``datasets.load_dataset(path, split=...)``, memory-mapped Arrow, needs the network once).

Every conversation is rendered by :func:`moxin.tokenizer.render_chat`, the one Tülu template shared with DPO,
generation and GRPO prompts. Labels are the template's loss mask, shifted: the loss falls on every assistant
turn's content and its closing eos, nowhere else.

Validation of records (before any training step): a record that is not an object, lacks the messages field,
has an unknown role / non-string content (:func:`validate_conversation`) or has no assistant turn is *bad*: it
is counted, the first few are reported with ``file:line``, and the run stops with :class:`DataError` past
``max_bad_records`` or ``max_bad_fraction``. A data set without a single usable conversation is an error.

Truncation policy (``max_length`` tokens per conversation, the Tülu ``max_seq_length``): a conversation longer
than ``max_length`` keeps its leading *whole turns*: it is cut right after the last assistant eos that fits, so
no assistant answer is cut in the middle. When not even the first assistant answer fits, the conversation is cut
at ``max_length`` tokens (the answer's beginning is still trained, as open-instruct does); when the prompt alone
is longer, the conversation keeps no target token (it adds nothing to the loss). Every truncation is counted in
the batch (``num_truncated``) and logged by the SFT stage as ``sft/truncated``; ``data_report()`` gives the share
of too-long conversations measured on a probe of the data set before training.

Batching: an optimizer step consumes exactly ``batch_size`` conversations over all ranks (Tülu counts its
effective batch of 128 in sequences, not tokens). Each rank takes ``micro_batch_size`` conversations per
micro-step and packs them first-fit into rows of ``max_length`` tokens; positions restart at 0 at each
conversation, which is the model's document mask, so packed conversations never see each other. Rows are
right-padded (label -100, positions continuing) to the longest row rounded up to ``pad_to_multiple_of``
(set it to ``max_length`` for fixed shapes). The loss is normalised by the assistant tokens of the whole
optimizer step on all ranks (MoxinStage), so every target token weighs the same.

Epochs are Lightning epochs (the trainer's ``max_epochs = num_epochs``); each epoch is a new seeded permutation
(``seed + epoch``), the same on every rank, cut into global steps and split by rank. Conversations past the
last full step of an epoch are not trained in that epoch (at most ``batch_size - 1``; counted as
``dropped_per_epoch``). ``total_steps = num_epochs * (N // batch_size)`` exactly. The train loader is a
``torchdata`` ``StatefulDataLoader`` over a map-style dataset, so a resumed run continues at the same batch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from moxin.data.common import RankedDataModule
from moxin.data.sources import DataError, SourceConfig, is_hub_name, iter_lines, open_hub_dataset, resolve_files
from moxin.losses import IGNORE_INDEX
from moxin.tokenizer.chat import ChatTokens, render_chat, validate_conversation

__all__ = [
    "RecordStats", "read_records", "load_hub_dataset", "truncate_chat", "pack_rows", "StepBatchSampler",
    "ChatDataset", "ChatSFTDataModule", "collate_sft",
]

log = logging.getLogger(__name__)
_BAD_EXAMPLES = 5


# ----------------------------------------------------------------------------------------------------------
# reading records (dicts) from jsonl / parquet / hub, with bad-record accounting


@dataclass
class RecordStats:
    """Counts of one data set: records read, bad ones (with the first ``file:line: reason``), kept."""

    records: int = 0
    bad: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)

    def add_bad(self, where: str, reason: str, kind: str) -> None:
        self.bad += 1
        self.reasons[kind] = self.reasons.get(kind, 0) + 1
        if len(self.bad_examples) < _BAD_EXAMPLES:
            self.bad_examples.append(f"{where}: {reason}")

    def check(self, name: str, max_bad_records: int, max_bad_fraction: float, final: bool = False) -> None:
        too_many = self.bad > max_bad_records
        too_frac = (final or self.records >= 100) and self.records and self.bad > max_bad_fraction * self.records
        if too_many or too_frac:
            raise DataError(
                f"data set {name!r}: {self.bad} bad records out of {self.records} read ({self.reasons}; limits: "
                f"max_bad_records={max_bad_records}, max_bad_fraction={max_bad_fraction}); first ones: "
                f"{self.bad_examples}. Fix or remove those records, or raise the limits in the data config."
            )

    def to_dict(self) -> dict:
        return {"records": self.records, "bad": self.bad, "kept": self.kept, "bad_by_kind": dict(self.reasons),
                "bad_examples": list(self.bad_examples)}


def load_hub_dataset(source: SourceConfig):
    """The whole hub dataset as memory-mapped Arrow (conversations are counted and rendered up front)."""
    return open_hub_dataset(source, streaming=False)


def read_records(source: SourceConfig) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` for every record of a local source (``record`` is a dict, or a string
    describing why the line is not one). Hub sources are read with :func:`load_hub_dataset` instead."""
    for path, fmt in resolve_files(source):
        if fmt == "jsonl":
            for lineno, line in iter_lines(path, source.max_record_bytes):
                if not isinstance(line, str):  # invalid UTF-8 or longer than max_record_bytes
                    yield f"{path}:{lineno}", line.reason
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    rec = f"malformed JSON ({e.msg} at column {e.colno})"
                if not isinstance(rec, (dict, str)):
                    rec = f"record is a {type(rec).__name__}, not an object"
                yield f"{path}:{lineno}", rec
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            row = 0
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    yield f"{path}:row {row}", rec
        else:
            raise DataError(f"data set {source.name!r}: {path} is {fmt}; conversations come as jsonl or parquet")


def source_identity(source: SourceConfig) -> dict:
    """What identifies the data of a source: sha256 of each local file, or the hub name / config / split."""
    if is_hub_name(source):
        return {"hub": source.path, "config": source.hub_config, "split": source.split, "data_files": source.data_files}
    files = []
    for path, _ in resolve_files(source):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files.append({"path": os.path.abspath(path), "sha256": h.hexdigest()})
    return {"files": files}


def as_source(obj: Any, default_name: str) -> SourceConfig:
    if isinstance(obj, str):
        obj = {"name": default_name, "path": obj}
    if isinstance(obj, Mapping) and "name" not in obj:
        obj = {"name": default_name, **obj}
    return SourceConfig.from_any(dict(obj) if isinstance(obj, Mapping) else obj)


# ----------------------------------------------------------------------------------------------------------
# rendering, truncation, packing


def truncate_chat(chat: ChatTokens, max_length: int, eos_id: int) -> tuple[ChatTokens, bool]:
    """Apply the truncation policy (module docstring); returns ``(chat, truncated)``."""
    n = len(chat)
    if n <= max_length:
        return chat, False
    ids, mask = chat.input_ids, chat.loss_mask
    cut = max_length  # fallback: hard cut inside the first assistant answer (or inside the prompt)
    for i in range(max_length - 1, -1, -1):
        if mask[i] and ids[i] == eos_id:  # the eos closing an assistant turn that fits entirely
            cut = i + 1
            break
    return ChatTokens(input_ids=ids[:cut], loss_mask=mask[:cut]), True


def pack_rows(items: Sequence[dict], row_len: int, pad_id: int, pad_to_multiple_of: int = 1) -> dict[str, torch.Tensor]:
    """First-fit pack ``{"input_ids", "labels"}`` lists (each <= ``row_len``) into rows.

    Returns ``input_ids``, ``labels`` (-100 at padding) and ``positions`` (0 at each item's start, continuing
    through the right padding), each ``(rows, T)`` with ``T`` the longest row rounded up to
    ``pad_to_multiple_of`` (capped at ``row_len``). No items: one all-padding row (no targets).
    """
    rows: list[list[dict]] = []
    fill: list[int] = []
    for it in items:
        n = len(it["input_ids"])
        if n > row_len:
            raise ValueError(f"item of {n} tokens does not fit a row of {row_len}; truncate before packing")
        for r, used in enumerate(fill):
            if used + n <= row_len:
                rows[r].append(it)
                fill[r] += n
                break
        else:
            rows.append([it])
            fill.append(n)
    if not rows:
        rows, fill = [[]], [0]
    m = max(1, pad_to_multiple_of)
    T = min(row_len, max(m, -(-max(fill) // m) * m))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for it in row:
            n = len(it["input_ids"])
            ids[r, t:t + n] = torch.tensor(it["input_ids"], dtype=torch.long)
            labels[r, t:t + n] = torch.tensor(it["labels"], dtype=torch.long)
            pos[r, t:t + n] = torch.arange(n)
            t += n
        if t < T:  # right padding continues the last document's positions (architecture.md contract)
            start = int(pos[r, t - 1]) + 1 if t > 0 else 0
            pos[r, t:] = torch.arange(start, start + T - t)
    return {"input_ids": ids, "labels": labels, "positions": pos}


# ----------------------------------------------------------------------------------------------------------
# step-exact, rank-split, per-epoch shuffled batch sampler


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


# ----------------------------------------------------------------------------------------------------------
# the SFT data set and data module


class ChatDataset(torch.utils.data.Dataset):
    """Map-style: item ``i`` is the rendered, truncated conversation ``i`` (tokenized lazily, in the loader's
    worker processes). ``store`` is a list of message lists, or a hub dataset plus the kept row indices."""

    def __init__(self, store, rows: list[int] | None, tokenizer, max_length: int, messages_field: str = "messages"):
        self.store, self.rows, self.tokenizer = store, rows, tokenizer
        self.max_length, self.messages_field = max_length, messages_field

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.store)

    def messages(self, i: int) -> list:
        if self.rows is None:
            return self.store[i]
        return self.store[int(self.rows[i])][self.messages_field]

    def __getitem__(self, i: int) -> dict:
        chat = render_chat(self.messages(i), self.tokenizer, conversation_index=i)
        chat, truncated = truncate_chat(chat, self.max_length, self.tokenizer.eos_id)
        return {"input_ids": chat.input_ids, "labels": chat.shifted_labels(), "truncated": truncated}


@dataclass
class collate_sft:
    """Collate function (picklable): pack the micro-batch's conversations into rows."""

    row_len: int
    pad_id: int
    pad_to_multiple_of: int = 64

    def __call__(self, items: list[dict]) -> dict:
        batch = pack_rows(items, self.row_len, self.pad_id, self.pad_to_multiple_of)
        batch["num_conversations"] = torch.tensor(len(items))
        batch["num_truncated"] = torch.tensor(sum(bool(it["truncated"]) for it in items))
        return batch


def conversation_problem(messages: Any, index: int | None = None) -> tuple[str, str] | None:
    """``(kind, description)`` of what makes a conversation unusable for SFT, or None."""
    problem = validate_conversation(messages, index)
    if problem is not None:
        kind = "unknown_role" if "unknown role" in problem else "invalid"
        return kind, problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant", "no assistant turn (nothing to train on)"
    order = role_order_problem(messages)
    if order is not None:
        return "role_order", order
    return None


def role_order_problem(messages: list) -> str | None:
    """What is out of order in a conversation's roles, or None: an optional system message first, then user
    and assistant turns alternating, starting with a user. Anything else (two users in a row, an assistant
    first, a system message in the middle) renders a prompt the model never sees at inference and teaches
    it to answer itself."""
    roles = [m["role"] for m in messages]
    start = 1 if roles and roles[0] == "system" else 0
    for j, role in enumerate(roles[start:], start):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if role != want:
            return (f"message {j} has role {role!r} where {want!r} is expected (roles: {roles[:8]}"
                    f"{'...' if len(roles) > 8 else ''}); expected an optional system message, then user / "
                    "assistant turns alternating")
    return None


def load_conversations(source: SourceConfig, messages_field: str, max_bad_records: int, max_bad_fraction: float,
                       check: Callable[[Any, int], tuple[str, str] | None] = conversation_problem,
                       get: Callable[[dict], Any] | None = None):
    """Read and validate every record. Returns ``(store, rows, stats)``: for local sources ``store`` is the list
    of kept values and ``rows`` None; for hub sources ``store`` is the Arrow dataset and ``rows`` the kept row
    indices. ``get`` extracts the value to keep from a record (default: ``record[messages_field]``)."""
    custom_get = get is not None
    get = get or (lambda rec: rec[messages_field])
    stats = RecordStats()
    kept: list = []
    rows: list[int] | None = None
    if is_hub_name(source):
        store = load_hub_dataset(source)
        if not custom_get and messages_field not in store.column_names:
            raise DataError(f"data set {source.name!r}: no column {messages_field!r} (columns: {store.column_names})")
        rows = []
        recs = ((f"{source.path}[{source.split}] row {i}", i, rec) for i, rec in enumerate(store))
    else:
        store = kept
        recs = ((loc, None, rec) for loc, rec in read_records(source))
    for loc, row, rec in recs:
        stats.records += 1
        if isinstance(rec, str):
            kind = ("invalid_utf8" if rec.startswith("invalid UTF-8") else "oversized"
                    if " longer than max_record_bytes" in rec else "malformed")
            stats.add_bad(loc, rec, kind)
        else:
            try:
                value = get(rec)
            except KeyError as e:
                stats.add_bad(loc, f"missing field {e} (fields: {sorted(rec)[:10]})", "missing_field")
                value = None
            if value is not None:
                problem = check(value, stats.records - 1)
                if problem is not None:
                    stats.add_bad(loc, problem[1], problem[0])
                else:
                    stats.kept += 1
                    if rows is not None:
                        rows.append(row)
                    else:
                        kept.append(value)
        stats.check(source.name, max_bad_records, max_bad_fraction)
    stats.check(source.name, max_bad_records, max_bad_fraction, final=True)
    if stats.kept == 0:
        raise DataError(f"data set {source.name!r} ({source.path}): none of its {stats.records} records is usable "
                        f"({stats.reasons}; first: {stats.bad_examples}); the run would train on nothing")
    if stats.bad:
        log.warning("data set %r: %d bad records skipped out of %d (%s); first: %s", source.name, stats.bad,
                    stats.records, stats.reasons, stats.bad_examples)
    return store, rows, stats


class ChatSFTDataModule(RankedDataModule):
    """SFT on Tülu-form conversations (module docstring for the policies).

    Args:
        train: the training source: a path / hub name, or a mapping with ``path`` (and ``split``, ``hub_config``,
            ``data_files``, ``format`` as in :class:`SourceConfig`).
        val: held-out conversations (same form) for ``val/loss``; None: no validation.
        tokenizer: ``"mistral"``, a tokenizer.json path, or a tokenizer object.
        max_length: tokens per conversation and per packed row (Tülu 3 / Moxin: 4096). At most the model's
            ``max_seq_len``. Longer conversations are truncated at whole turns (module docstring).
        batch_size: conversations per optimizer step over all ranks (Tülu 3 / Moxin: 128). Must be a multiple
            of ``micro_batch_size * world_size``.
        micro_batch_size: conversations per rank per micro-step (packed into as few rows as they fit).
        num_epochs: passes over the data (Moxin: 2); each a new seeded shuffle.
        messages_field: the record field holding the message list.
        pad_to_multiple_of: right-pad rows to a multiple of this (``max_length`` gives fixed shapes).
        max_bad_records / max_bad_fraction: stop when more records than this are unusable.
        length_probe: conversations tokenized before training to report the share longer than ``max_length``.
    """

    def __init__(self, train: Any, val: Any = None, tokenizer: Any = "mistral", max_length: int = 4096,
                 batch_size: int = 128, micro_batch_size: int = 8, num_epochs: int = 2, num_workers: int = 1,
                 messages_field: str = "messages", pad_to_multiple_of: int = 64, max_bad_records: int = 1000,
                 max_bad_fraction: float = 0.01, length_probe: int = 2000, max_seq_len: int | None = None,
                 world_size: int | None = None, seed: int = 1234, rank: int | None = None):
        super().__init__()
        self.train_source = as_source(train, "train")
        self.val_source = as_source(val, "val") if val else None
        self.tokenizer_spec = tokenizer
        self.max_length, self.batch_size, self.micro_batch_size = int(max_length), int(batch_size), int(micro_batch_size)
        self.num_epochs, self.num_workers, self.messages_field = int(num_epochs), int(num_workers), messages_field
        self.pad_to_multiple_of, self.length_probe = int(pad_to_multiple_of), int(length_probe)
        self.max_bad_records, self.max_bad_fraction = int(max_bad_records), float(max_bad_fraction)
        self._world_size, self.seed, self._rank = world_size, int(seed), rank
        self._tokenizer = None
        self._train = self._val = None
        self._report: dict = {}
        if max_seq_len is not None and self.max_length > int(max_seq_len):
            raise DataError(f"data.max_length={self.max_length} is beyond the model's max_seq_len={max_seq_len}; "
                            "lower data.max_length or use a model config with a longer max_seq_len")
        for key in ("max_length", "batch_size", "micro_batch_size", "num_epochs"):
            if getattr(self, key) <= 0:
                raise DataError(f"data.{key} must be > 0, got {getattr(self, key)}")
        per = self.micro_batch_size * self.world_size
        if self.batch_size % per:
            raise DataError(f"data.batch_size={self.batch_size} is not a multiple of micro_batch_size * world_size = "
                            f"{self.micro_batch_size} * {self.world_size} = {per}; change batch_size or micro_batch_size")

    # ---- configuration -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from moxin.data.datamodule import resolve_tokenizer

            self._tokenizer = resolve_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def accumulate_grad_batches(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)

    def steps_per_epoch(self) -> list[int]:
        """Optimizer steps of every epoch: ``N // batch_size`` each (the same conversations count every epoch)."""
        return [len(self.train_set) // self.batch_size] * self.num_epochs

    @property
    def total_steps(self) -> int:
        return sum(self.steps_per_epoch())

    # ---- data ----------------------------------------------------------------------------------------------
    def _load(self, source: SourceConfig) -> tuple[ChatDataset, dict]:
        store, rows, stats = load_conversations(source, self.messages_field, self.max_bad_records,
                                                self.max_bad_fraction)
        ds = ChatDataset(store, rows, self.tokenizer, self.max_length, self.messages_field)
        report = {"source": source.path, **stats.to_dict()}
        probe = min(len(ds), self.length_probe)
        if probe:
            n_long = sum(len(render_chat(ds.messages(i), self.tokenizer)) > self.max_length for i in range(probe))
            report["length_probe"] = {"conversations": probe, "longer_than_max_length": n_long,
                                      "policy": "truncate at whole turns (assistant eos); hard cut if none fits"}
            if n_long:
                log.warning("data set %r: %d of the first %d conversations are longer than max_length=%d and will "
                            "be truncated at whole turns", source.name, n_long, probe, self.max_length)
        return ds, report

    @property
    def train_set(self) -> ChatDataset:
        if self._train is None:
            self._train, self._report["train"] = self._load(self.train_source)
            n = len(self._train)
            if n < self.batch_size:
                raise DataError(f"data set {self.train_source.name!r}: {n} usable conversations, fewer than one "
                                f"optimizer step (batch_size={self.batch_size}); lower batch_size or add data")
            self._report["train"]["dropped_per_epoch"] = n % self.batch_size
        return self._train

    @property
    def val_set(self) -> ChatDataset | None:
        if self._val is None and self.val_source is not None:
            self._val, self._report["val"] = self._load(self.val_source)
        return self._val

    def setup(self, stage: str | None = None) -> None:
        _ = self.train_set, self.val_set
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            acc = getattr(trainer, "accumulate_grad_batches", None)
            if acc is not None and acc != self.accumulate_grad_batches:
                raise DataError(f"trainer.accumulate_grad_batches={acc} but the data module needs "
                                f"{self.accumulate_grad_batches}; pass accumulate_grad_batches=datamodule.accumulate_grad_batches")

    def _collate(self):
        return collate_sft(self.max_length, self.tokenizer.pad_id, self.pad_to_multiple_of)

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        trainer = getattr(self, "trainer", None)
        epoch = int(trainer.current_epoch) if trainer is not None else 0
        sampler = StepBatchSampler(len(self.train_set), self.micro_batch_size, self.world_size, self.rank,
                                   batch_size=self.batch_size, seed=self.seed, epoch=epoch, shuffle=True)
        return StatefulDataLoader(self.train_set, batch_sampler=sampler, collate_fn=self._collate(),
                                  num_workers=self.num_workers, persistent_workers=False)

    def val_dataloader(self):
        if self.val_set is None:
            return []
        sampler = StepBatchSampler(len(self.val_set), self.micro_batch_size, self.world_size, self.rank, shuffle=False)
        return torch.utils.data.DataLoader(self.val_set, batch_sampler=sampler, collate_fn=self._collate(),
                                           num_workers=0)

    def data_report(self) -> dict:
        return dict(self._report)
