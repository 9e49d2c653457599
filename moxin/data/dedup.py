"""Exact-duplicate filter on a hash of normalised text (NFKC, whitespace collapsed, lowercased; 63 bits of
BLAKE2b, so the state is a plain ``LongTensor``).

A document is dropped when another source kept its hash, or the same pass of its own source did: a small source
read again on purpose is repetition, not duplication. One filter per reader, so copies in different shards both
survive (``moxin.prepare`` dedups across everything). Details: docs/modules.md, "data/dedup.py".
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

import torch

__all__ = ["normalize_text", "text_hash", "DedupFilter"]

_WS = re.compile(r"\s+")
_PASS_SHIFT = 16  # value = pass << 16 | source index


def normalize_text(text: str) -> str:
    """NFKC, collapse whitespace, strip, lowercase."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip().lower()


def text_hash(text: str) -> int:
    """63-bit hash of the normalised text (non-negative, fits int64)."""
    digest = hashlib.blake2b(normalize_text(text).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class DedupFilter:
    """Counts ``seen`` / ``dropped`` per source name; ``keep(h, source, pass_)`` decides one document."""

    CHUNK = 65536

    def __init__(self, source_names: list[str]):
        self.source_names = list(source_names)
        self._index = {n: i for i, n in enumerate(self.source_names)}
        self._kept: dict[int, int] = {}
        self._chunk_cache: list[torch.Tensor] = []
        self.seen = {n: 0 for n in self.source_names}
        self.dropped = {n: 0 for n in self.source_names}

    def keep(self, h: int, source: str, pass_: int = 0) -> bool:
        me = (pass_ << _PASS_SHIFT) | self._index[source]
        self.seen[source] += 1
        prev = self._kept.get(h)
        if prev is None:
            self._kept[h] = me
            return True
        prev_src, prev_pass = prev & ((1 << _PASS_SHIFT) - 1), prev >> _PASS_SHIFT
        if prev_src == self._index[source] and prev_pass < pass_:
            self._kept[h] = me  # intentional repetition in a later pass
            self._chunk_cache = []  # a value inside a cached chunk may have changed
            return True
        self.dropped[source] += 1
        return False

    def __len__(self) -> int:
        return len(self._kept)

    def counts(self) -> dict[str, dict[str, int]]:
        return {n: {"seen": self.seen[n], "dropped": self.dropped[n]} for n in self.source_names}

    def state_dict(self) -> dict:
        """Hashes in chunks of CHUNK (insertion order): torchdata's StatefulDataLoader sends only the changed
        leaves of a state between snapshots, so a growing set costs one chunk per snapshot, not the whole set."""
        items = list(self._kept.items())
        n_full = len(items) // self.CHUNK
        if len(self._chunk_cache) > n_full:
            self._chunk_cache = self._chunk_cache[:n_full]
        chunks = {}
        for c in range((len(items) + self.CHUNK - 1) // self.CHUNK):
            if c < len(self._chunk_cache):
                chunks[str(c)] = self._chunk_cache[c]
                continue
            part = items[c * self.CHUNK : (c + 1) * self.CHUNK]
            t = torch.tensor(part, dtype=torch.int64).reshape(-1, 2)
            if len(part) == self.CHUNK:
                self._chunk_cache.append(t)
            chunks[str(c)] = t
        return {"sources": list(self.source_names), "chunks": chunks, "counts": self.counts()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sources"]) != self.source_names:
            raise ValueError(
                f"dedup state was saved for sources {state['sources']}, this run has {self.source_names}; "
                "resume with the same data sources (or start a fresh run)"
            )
        self._kept = {}
        self._chunk_cache = []
        chunks = state["chunks"] or {}
        for c in range(len(chunks)):
            self._kept.update(map(tuple, chunks[str(c)].tolist()))
        for n, c in state["counts"].items():
            self.seen[n], self.dropped[n] = int(c["seen"]), int(c["dropped"])
