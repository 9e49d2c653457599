"""Pack documents into fixed-length rows whose positions restart at every document.

Each document enters the stream as ``bos + tokens + eos``; a row takes ``seq_len + 1`` tokens (inputs
``row[:-1]``, labels ``row[1:]``) and the next row starts at its last token, so every token is predicted once.
A document split across rows restarts its positions at 0 in the next row; the label that would predict the next
document's bos from an eos is masked. The carry-over buffer is the packer's state. Worked example:
docs/modules.md, "data/packing.py".

`first_fit` and `pack_sequences` pack whole sequences instead (GRPO's update: no sequence is ever split), and
`unpack` brings per-token values of the packed rows back to the sequences' own layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from moxin.constants import IGNORE_INDEX

__all__ = ["PackedRows", "Packer", "first_fit", "pack_sequences", "row_positions", "row_width_grid", "unpack"]


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


def row_width_grid(n: int) -> int:
    """The smallest width >= `n` on a grid of four steps an octave (multiples of 128 up to 512, then m x 2^k for
    m in 4..7: ..., 4096, 5120, 6144, 7168, 8192, ...): packed rows rounded up to it waste under a quarter of a row,
    and rollouts whose longest sequences differ by a few percent share a width (one compiled shape)."""
    if n <= 512:
        return max(128, -(-n // 128) * 128)
    step = 1 << (n.bit_length() - 3)
    return -(-n // step) * step


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices whose lengths add up to at most `capacity` each: longest first, each into the first bin
    with room (first-fit decreasing, within 11/9 of the fewest bins). Items of length 0 take no room but still get
    a bin (the first with room, like any other), so every index appears exactly once."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {capacity}: raise the row "
                             "width (stage.grpo.pack_tokens) or shorten the sequences")
        for b, r in enumerate(room):
            if n <= r:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclass
class PackedRows:
    """Sequences packed whole into rows. rows: the (R, T) tensors by name, with `positions` restarting at 0 for
    every sequence (the model's document rule) and the rows' padding at their ends; index: (n, W) long, the flat
    position ``row * T + column`` in the rows of sequence i's token t (W the longest sequence), ``R * T`` past a
    sequence's end (see `unpack`); bins: the sequences of each row, in row order."""

    rows: dict[str, torch.Tensor]
    index: torch.Tensor
    bins: list[list[int]]


def pack_sequences(seqs: dict[str, torch.Tensor], lengths: torch.Tensor, bins: list[list[int]],
                   pad: dict[str, float | int], width: int | None = None) -> PackedRows:
    """Pack n right-padded sequences (each tensor of `seqs` (n, L); sequence i's tokens are ``[:lengths[i]]``)
    into one row per bin (`first_fit`'s), every row `width` long (None: as long as the fullest; never shorter).
    `pad`: each tensor's padding value.
    ``positions`` are made here: 0.. within each sequence, and a row's padding continues its last sequence's
    positions (it comes after that sequence's tokens, which a causal mask never lets attend to it)."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    n = int(lengths.shape[0])
    if sorted(i for b in bins for i in b) != list(range(n)):
        raise ValueError(f"bins must hold each of the {n} sequences exactly once, got {bins}")
    used = [int(sum(int(lengths[i]) for i in b)) for b in bins]
    R, T = len(bins), max(max(used, default=0), width or 0, 1)
    W = max(1, int(lengths.max()) if n else 1)
    rows = {k: torch.full((R, T), pad[k], dtype=v.dtype) for k, v in seqs.items()}
    positions = torch.empty(R, T, dtype=torch.long)
    index = torch.full((n, W), R * T, dtype=torch.long)
    for r, b in enumerate(bins):
        col = 0
        for i in b:
            m = int(lengths[i])
            for k, v in seqs.items():
                rows[k][r, col:col + m] = v[i, :m]
            positions[r, col:col + m] = torch.arange(m)
            index[i, :m] = r * T + col + torch.arange(m)
            col += m
        start = col - int(lengths[b[-1]]) if b else 0
        positions[r, col:] = torch.arange(col - start, T - start)
    rows["positions"] = positions
    return PackedRows(rows=rows, index=index, bins=bins)


def unpack(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-token values of packed rows (R, T) in the sequences' layout (n, W) (`PackedRows.index`): 0 past each
    sequence's end, as in right-padded rows. Differentiable (a gather: the gradient goes back to the rows)."""
    flat = torch.cat([values.reshape(-1), values.new_zeros(1)])
    return flat[index]
