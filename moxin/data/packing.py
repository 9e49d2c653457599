"""Pack documents into fixed-length rows whose positions restart at every document.

Each document enters the stream as ``bos + tokens + eos``; a row takes ``seq_len + 1`` tokens (inputs
``row[:-1]``, labels ``row[1:]``) and the next row starts at its last token, so every token is predicted once.
A document split across rows restarts its positions at 0 in the next row; the label that would predict the next
document's bos from an eos is masked. The carry-over buffer is the packer's state. Worked example:
docs/modules.md, "data/packing.py".
"""

from __future__ import annotations

from typing import Sequence

import torch

from moxin.constants import IGNORE_INDEX

__all__ = ["Packer", "row_positions"]


def row_positions(starts: torch.Tensor) -> torch.Tensor:
    """Positions for a (T,) bool tensor of document starts; position 0 at index 0 and at every start."""
    T = starts.shape[0]
    idx = torch.arange(T)
    s = starts.clone()
    s[0] = True
    last_start = torch.cummax(torch.where(s, idx, torch.zeros_like(idx)), dim=0).values
    return idx - last_start


class Packer:
    """Accumulates documents and emits rows of ``seq_len`` inputs / labels / positions."""

    def __init__(self, seq_len: int, bos_id: int | None, eos_id: int | None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._tokens: list[int] = []
        self._starts: list[bool] = []

    def add(self, tokens: Sequence[int]) -> None:
        """Append one document (bos/eos added here when the ids are not None)."""
        doc = ([self.bos_id] if self.bos_id is not None else []) + list(tokens)
        if self.eos_id is not None:
            doc.append(self.eos_id)
        if not doc:
            return
        self._tokens.extend(doc)
        self._starts.append(True)
        self._starts.extend([False] * (len(doc) - 1))

    def buffered(self) -> int:
        return len(self._tokens)

    def has_row(self) -> bool:
        return len(self._tokens) >= self.seq_len + 1

    def pop_row(self) -> dict[str, torch.Tensor] | None:
        """The next row as ``{"input_ids", "labels", "positions"}`` (each (seq_len,) long), or None."""
        if not self.has_row():
            return None
        n = self.seq_len
        toks = torch.tensor(self._tokens[: n + 1], dtype=torch.long)
        starts = torch.tensor(self._starts[: n + 1], dtype=torch.bool)
        labels = toks[1:].clone()
        labels[starts[1:]] = IGNORE_INDEX
        row = {"input_ids": toks[:-1], "labels": labels, "positions": row_positions(starts[:-1])}
        # keep the last token: it is the first input of the next row (a continuation, unless it starts a doc)
        del self._tokens[:n]
        del self._starts[:n]
        return row

    def state_dict(self) -> dict:
        return {
            "tokens": torch.tensor(self._tokens, dtype=torch.long),
            "starts": torch.tensor(self._starts, dtype=torch.bool),
        }

    def load_state_dict(self, state: dict) -> None:
        self._tokens = state["tokens"].tolist()
        self._starts = state["starts"].tolist()
