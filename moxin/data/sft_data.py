"""SFT data: Tülu-form conversations -> chat template -> packed rows with an assistant-only loss mask.

Records are ``{"messages": [...]}`` (``allenai/tulu-3-sft-mixture``, ``open-r1/OpenR1-Math-220k``) or ShareGPT
``{"system": ..., "conversations": [{"from", "value"}]}`` (``open-thoughts/OpenThoughts-114k``, converted at read
time) from local files or the hub, rendered by the one chat template (:func:`moxin.tokenizer.render_chat`). Bad
records are counted and reported, and stop the run past the limits; an over-long conversation keeps its leading whole turns; an optimizer step takes
exactly ``batch_size`` conversations over all ranks. The rules in full: docs/modules.md, "data/sft_data.py".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from moxin.config import SourceConfig
from moxin.constants import IGNORE_INDEX
from moxin.data.extract import Extracted, conversation_problem, extract_all, messages_from_record
from moxin.data.step_batches import StepDataModule
from moxin.tokenizer.chat import ChatTokens, render_chat

__all__ = ["truncate_chat", "pack_rows", "ChatDataset", "collate_sft", "load_conversations", "ChatSFTDataModule"]

log = logging.getLogger(__name__)


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


class ChatDataset(torch.utils.data.Dataset):
    """Map-style: item ``i`` is the rendered, truncated conversation ``i`` (tokenized lazily, in the loader's
    worker processes) of the checked conversations ``items``."""

    def __init__(self, items: Extracted, tokenizer, max_length: int):
        self.items, self.tokenizer, self.max_length = items, tokenizer, max_length

    def __len__(self) -> int:
        return len(self.items)

    def messages(self, i: int) -> list:
        return self.items[i]

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


def load_conversations(source: SourceConfig, messages_field: str, max_bad_records: int,
                       max_bad_fraction: float) -> Extracted:
    """Read and check every conversation of a source (bad ones counted, the run stopped past the limits): the
    ``messages_field`` list, or ShareGPT ``conversations`` converted (:class:`messages_from_record`)."""
    get = messages_from_record(messages_field)
    return extract_all(source, get, conversation_problem, max_bad_records=max_bad_records,
                       max_bad_fraction=max_bad_fraction, hub_column=get.columns)


class ChatSFTDataModule(StepDataModule):
    """SFT on Tülu-form conversations (module docstring for the policies).

    Args (and those of :class:`StepDataModule`, counted in conversations; ``train`` may list several sources):
        tokenizer: the run's tokenizer object (``connect``).
        max_length: tokens per conversation and per packed row (Tülu 3 / Moxin: 4096). At most the model's
            ``max_seq_len``. Longer conversations are truncated at whole turns (module docstring).
        batch_size: conversations per optimizer step over all ranks (Tülu 3 / Moxin: 128).
        micro_batch_size: conversations per rank per micro-step (packed into as few rows as they fit).
        num_epochs: passes over the data (Moxin: 2).
        messages_field: the record field holding the message list.
        pad_to_multiple_of: right-pad rows to a multiple of this (``max_length`` gives fixed shapes).
        length_probe: conversations tokenized before training to report the share longer than ``max_length``.
    """

    item = "conversations"
    multi_source = True

    def __init__(self, train: Any, val: Any = None, tokenizer: Any = None, max_length: int = 4096,
                 batch_size: int = 128, micro_batch_size: int = 8, num_epochs: int = 2, num_workers: int = 1,
                 messages_field: str = "messages", pad_to_multiple_of: int = 64, max_bad_records: int = 1000,
                 max_bad_fraction: float = 0.01, length_probe: int = 2000, max_seq_len: int | None = None,
                 world_size: int | None = None, seed: int = 1234, rank: int | None = None):
        self.messages_field, self.length_probe = messages_field, int(length_probe)
        super().__init__(train, val, max_length=max_length, batch_size=batch_size, micro_batch_size=micro_batch_size,
                         num_epochs=num_epochs, num_workers=num_workers, pad_to_multiple_of=pad_to_multiple_of,
                         max_bad_records=max_bad_records, max_bad_fraction=max_bad_fraction, seed=seed,
                         tokenizer=tokenizer, world_size=world_size, rank=rank, max_seq_len=max_seq_len)

    def load_set(self, source: SourceConfig) -> tuple[ChatDataset, dict]:
        items = load_conversations(source, self.messages_field, self.max_bad_records, self.max_bad_fraction)
        ds = ChatDataset(items, self.tokenizer, self.max_length)
        report = {"source": source.path, **items.stats.to_dict()}
        probe = min(len(ds), self.length_probe)
        if probe:
            n_long = sum(len(render_chat(ds.messages(i), self.tokenizer)) > self.max_length for i in range(probe))
            report["length_probe"] = {"conversations": probe, "longer_than_max_length": n_long,
                                      "policy": "truncate at whole turns (assistant eos); hard cut if none fits"}
            if n_long:
                log.warning("data set %r: %d of the first %d conversations are longer than max_length=%d and will "
                            "be truncated at whole turns", source.name, n_long, probe, self.max_length)
        return ds, report

    def collate(self):
        return collate_sft(self.max_length, self.tokenizer.pad_id, self.pad_to_multiple_of)
