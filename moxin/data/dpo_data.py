"""DPO data: preference pairs -> two rendered conversations (chosen, rejected) with the final answer as target.

Takes the Tülu 3 preference form (message lists) and a text form (``prompt, chosen, rejected``). Bad pairs are
counted by kind. A pair with a side longer than ``max_length`` is, by ``too_long``: ``drop``ped (the answer is
never compared on a prefix nobody judged), or ``truncate``d as open-instruct's DPO does (each side cut to its
first ``max_length`` tokens; a pair is dropped only when a side has no target token left). Both are counted.
All pairs are rendered once before training, for an exact step count and the digest the reference log-prob
cache is keyed by. Details: docs/modules.md, "data/dpo_data.py".
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import torch

from moxin.config import DataError, SourceConfig
from moxin.constants import IGNORE_INDEX
from moxin.data.extract import Extracted, extract_all, pair_from_record, pair_problem
from moxin.data.reader import source_identity
from moxin.data.step_batches import StepDataModule
from moxin.tokenizer.chat import ChatTokens, render_chat

__all__ = ["render_answer", "truncate_chat", "PreferenceDataset", "collate_pairs", "PreferenceDataModule",
           "LENGTH_POLICIES"]

log = logging.getLogger(__name__)
# data.too_long -> the policy recorded in the data report and the reference cache key
LENGTH_POLICIES = {
    "drop": "drop pairs with a side longer than max_length; final assistant turn is the target",
    "truncate": "cut each side to its first max_length tokens; drop pairs with a side left without target tokens; "
                "final assistant turn is the target",
}


def render_answer(messages: list, tokenizer) -> ChatTokens:
    """Render a conversation; keep the loss mask on the final assistant turn (content + eos) only."""
    chat = render_chat(messages, tokenizer)
    mask = list(chat.loss_mask)
    end = len(mask)
    while end > 0 and not mask[end - 1]:
        end -= 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ChatTokens(chat.input_ids, [start <= i < end for i in range(len(mask))])


def truncate_chat(chat: ChatTokens, max_length: int) -> ChatTokens:
    """The first ``max_length`` tokens and their loss mask: open-instruct's right truncation of a rendered side
    (``apply_chat_template(..., truncation=True, max_length=max_seq_length)``); a cut answer keeps no eos."""
    if len(chat) <= max_length:
        return chat
    return ChatTokens(chat.input_ids[:max_length], list(chat.loss_mask[:max_length]))


class PreferenceDataset(torch.utils.data.Dataset):
    """Map-style over the kept pairs; item ``i`` renders pair ``keep[i]`` of the checked pairs (lazily, in loader
    workers), each side cut to ``truncate_to`` tokens when given."""

    def __init__(self, items: Extracted, keep: list[int], tokenizer, truncate_to: int | None = None):
        self.items, self.keep, self.tokenizer, self.truncate_to = items, keep, tokenizer, truncate_to

    def render(self, j: int) -> tuple[ChatTokens, ChatTokens]:
        """Chosen and rejected of loaded pair ``j``, rendered (and truncated when ``truncate_to`` is set)."""
        chosen, rejected = self.pair(j)
        c, r = render_answer(chosen, self.tokenizer), render_answer(rejected, self.tokenizer)
        if self.truncate_to is not None:
            c, r = truncate_chat(c, self.truncate_to), truncate_chat(r, self.truncate_to)
        return c, r

    def __len__(self) -> int:
        return len(self.keep)

    def pair(self, j: int):
        """Pair ``j`` of the loaded (validated) list, before the length filter."""
        return self.items[j]

    def __getitem__(self, i: int) -> dict:
        c, r = self.render(self.keep[i])
        return {"chosen_ids": c.input_ids, "chosen_labels": c.shifted_labels(),
                "rejected_ids": r.input_ids, "rejected_labels": r.shifted_labels(), "pair_index": i}


@dataclass
class collate_pairs:
    """Right-pad chosen and rejected rows of a micro-batch to one length (multiple of ``pad_to_multiple_of``)."""

    pad_id: int
    pad_to_multiple_of: int = 64
    max_length: int | None = None

    def __call__(self, items: list[dict]) -> dict:
        longest = max((len(it[k]) for it in items for k in ("chosen_ids", "rejected_ids")), default=1)
        m = max(1, self.pad_to_multiple_of)
        T = -(-longest // m) * m
        if self.max_length:
            T = max(longest, min(T, self.max_length))
        out = {"pair_index": torch.tensor([it["pair_index"] for it in items], dtype=torch.long)}
        for side in ("chosen", "rejected"):
            ids = torch.full((len(items), T), self.pad_id, dtype=torch.long)
            labels = torch.full((len(items), T), IGNORE_INDEX, dtype=torch.long)
            for b, it in enumerate(items):
                n = len(it[f"{side}_ids"])
                ids[b, :n] = torch.tensor(it[f"{side}_ids"])
                labels[b, :n] = torch.tensor(it[f"{side}_labels"])
            out[f"{side}_input_ids"] = ids
            out[f"{side}_labels"] = labels
            out[f"{side}_positions"] = torch.arange(T).expand(len(items), T).clone()  # padding continues positions
        return out


class PreferenceDataModule(StepDataModule):
    """DPO pairs (module docstring). Arguments as :class:`StepDataModule`, counted in pairs; plus:

    Args:
        tokenizer: the run's tokenizer object (``connect``).
        max_length: tokens per side (Tülu 3 / Moxin DPO: 2048).
        too_long: a pair with a longer side is ``drop``ped, or each side ``truncate``d to ``max_length`` tokens
            (open-instruct's DPO; the pair is dropped only if a side keeps no target token). Counted either way.
        batch_size: pairs per optimizer step over all ranks (Tülu 3 / Moxin: 128).
        micro_batch_size: pairs per rank per micro-step (2 x this many rows go through the model).
        num_epochs: Moxin / Tülu 3 DPO: 1.
        prompt_field / chosen_field / rejected_field: record fields.
    """

    item = "pairs"

    def __init__(self, train: Any, val: Any = None, tokenizer: Any = None, max_length: int = 2048,
                 batch_size: int = 128, micro_batch_size: int = 1, num_epochs: int = 1, num_workers: int = 1,
                 prompt_field: str = "prompt", chosen_field: str = "chosen", rejected_field: str = "rejected",
                 pad_to_multiple_of: int = 64, max_bad_records: int = 1000, max_bad_fraction: float = 0.01,
                 max_seq_len: int | None = None, world_size: int | None = None, seed: int = 1234,
                 rank: int | None = None, too_long: str = "drop"):
        if too_long not in LENGTH_POLICIES:
            raise ValueError(f"data.too_long={too_long!r}: expected one of {sorted(LENGTH_POLICIES)} (drop: pairs with "
                             f"a side over max_length are dropped; truncate: each side is cut as open-instruct does)")
        self.too_long = too_long
        super().__init__(train, val, max_length=max_length, batch_size=batch_size, micro_batch_size=micro_batch_size,
                         num_epochs=num_epochs, num_workers=num_workers, pad_to_multiple_of=pad_to_multiple_of,
                         max_bad_records=max_bad_records, max_bad_fraction=max_bad_fraction, seed=seed,
                         tokenizer=tokenizer, world_size=world_size, rank=rank, max_seq_len=max_seq_len)
        self.getter = pair_from_record(prompt_field, chosen_field, rejected_field)
        self._digests: dict[str, str] = {}

    def load_set(self, source: SourceConfig) -> tuple[PreferenceDataset, dict]:
        items = extract_all(source, self.getter, pair_problem, max_bad_records=self.max_bad_records,
                            max_bad_fraction=self.max_bad_fraction)
        truncate = self.too_long == "truncate"
        ds = PreferenceDataset(items, [], self.tokenizer, truncate_to=self.max_length if truncate else None)
        digest = hashlib.sha256()
        too_long, truncated, dropped, examples = 0, 0, 0, []
        for j in range(len(items)):
            chosen, rejected = ds.pair(j)
            c, r = render_answer(chosen, self.tokenizer), render_answer(rejected, self.tokenizer)
            if max(len(c), len(r)) > self.max_length:
                too_long += 1
                if truncate:
                    c, r = truncate_chat(c, self.max_length), truncate_chat(r, self.max_length)
                keep = truncate and c.num_target_tokens > 0 and r.num_target_tokens > 0
                truncated += keep
                dropped += not keep
                if len(examples) < 5:
                    examples.append(f"pair {j}: chosen {len(c)} / rejected {len(r)} tokens"
                                    + (" (no target left)" if truncate and not keep else ""))
                if not keep:
                    continue
            ds.keep.append(j)
            for t in (c, r):
                digest.update(torch.tensor(t.input_ids, dtype=torch.int32).numpy().tobytes())
                digest.update(bytes(t.loss_mask))
        if too_long:
            log.warning("data set %r: %d of %d pairs have a side longer than max_length=%d: %d truncated, %d dropped "
                        "(data.too_long=%s; %s)", source.name, too_long, len(items), self.max_length, truncated,
                        dropped, self.too_long, examples)
        if not ds.keep:
            why = "leave no target token within" if truncate else "are longer than"
            raise DataError(f"data set {source.name!r}: all {len(items)} valid pairs {why} "
                            f"max_length={self.max_length} ({examples}); raise data.max_length")
        self._digests[source.name] = digest.hexdigest()
        report = {"source": source.path, **items.stats.to_dict(), "too_long": too_long, "truncated": truncated,
                  "dropped_too_long": dropped, "too_long_examples": examples, "used": len(ds.keep),
                  "length_policy": LENGTH_POLICIES[self.too_long]}
        return ds, report

    def collate(self):
        return collate_pairs(self.tokenizer.pad_id, self.pad_to_multiple_of, self.max_length)

    # ---- what the reference log-prob cache needs ------------------------------------------------------------
    def split_set(self, split: str) -> PreferenceDataset | None:
        return self.train_set if split == "train" else self.val_set

    def reference_dataloader(self, split: str):
        """Every pair of ``split`` once, in order, split round-robin over ranks (same batch count everywhere)."""
        return self.ordered_loader(self.split_set(split))

    def reference_identity(self, split: str) -> dict:
        """Everything about the data that changes reference log-probs (part of the cache key)."""
        ds = self.split_set(split)
        source = self.train_source if split == "train" else self.val_source
        tok = self.tokenizer
        return {
            "split": split,
            "source": source_identity(source),
            "fields": [self.getter.prompt_field, self.getter.chosen_field, self.getter.rejected_field],
            "tokens_sha256": self._digests[source.name],
            "n_pairs": len(ds),
            "tokenizer": {"name": getattr(tok, "name", type(tok).__name__), "vocab_size": getattr(tok, "vocab_size", None),
                          "bos": tok.bos_id, "eos": tok.eos_id},
            "max_length": self.max_length,
            "length_policy": LENGTH_POLICIES[self.too_long],
        }
