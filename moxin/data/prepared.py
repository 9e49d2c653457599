"""Prepared pretraining data: token shards with a document index and a manifest (written by ``moxin.prepare``),
and the reader that gives each (rank, loader worker) its own contiguous range of documents.

A document is found by a bisection over the shards' document counts and read with one ``pread``; a reader's
position is the number of its documents consumed, so resuming is a seek; the stored text hashes give the raw
path's validation split. The folder layout: docs/modules.md, "data/prepared.py".
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from moxin.config import DataError

__all__ = ["MANIFEST", "FORMAT_VERSION", "INDEX_DTYPE", "token_dtype", "tokenizer_fingerprint", "file_sha256",
           "reader_range", "PreparedData"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
#: One row per document: start and length (tokens) in its .bin, and its 63-bit text hash.
INDEX_DTYPE = np.dtype([("start", "<i8"), ("len", "<i8"), ("hash", "<i8")])
_INDEX_CHUNK = 4096  # index rows read at once


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (Mistral's 32,000), else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def tokenizer_fingerprint(tok: Any) -> dict:
    """What identifies a tokenizer's encoding: sha256 of its serialized content (the backend's JSON or the
    SentencePiece proto, special ids; not the path it was loaded from), with its name and special ids."""
    state = tok.__getstate__() if hasattr(tok, "__getstate__") else {}
    state = dict(state or {})
    name = state.pop("name", getattr(tok, "name", type(tok).__name__))
    content = pickle.dumps((type(tok).__qualname__, sorted((k, repr(v)) for k, v in state.items())), protocol=4)
    vocab = getattr(tok, "vocab_size", None)
    return {"name": str(name), "sha256": hashlib.sha256(content).hexdigest(), "vocab_size": vocab,
            "bos_id": getattr(tok, "bos_id", None), "eos_id": getattr(tok, "eos_id", None)}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def reader_range(n_docs: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Documents ``[lo, hi)`` of a source owned by reader ``shard`` of ``num_shards`` (contiguous, balanced)."""
    return n_docs * shard // num_shards, n_docs * (shard + 1) // num_shards


class PreparedData:
    """A prepared folder, opened for reading (picklable: files are opened lazily in each loader worker).

    ``bytes_read`` counts the bytes this process read from shard and index files (the benchmark reports it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            hint = (" (the parts are there: run the merge, `python -m moxin.prepare ... prepare.merge=true`)"
                    if (self.path / "parts").is_dir() else "")
            raise DataError(f"data.prepared={str(path)!r}: no {MANIFEST} in that folder{hint}; prepare the corpus with "
                            "`python -m moxin.prepare data=<data config> out=DIR` and point data.prepared at DIR")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{mpath}: unreadable manifest ({e}); prepare the corpus again") from e
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{mpath}: format_version {self.manifest.get('format_version')!r}, this moxin reads "
                            f"{FORMAT_VERSION}; prepare the corpus again with this version")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.sources = self.manifest["sources"]
        self._cum = {n: np.cumsum([0] + [sh["docs"] for sh in s["shards"]]).tolist() for n, s in self.sources.items()}
        self._fds: dict[str, int] = {}
        self.bytes_read = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    @property
    def source_names(self) -> list[str]:
        return list(self.sources)

    @property
    def identity(self) -> str:
        """sha256 of the manifest: what a reader state is tied to (a re-prepared folder is another dataset)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]

    def num_docs(self, name: str) -> int:
        return self._cum[name][-1]

    # ---- checks -------------------------------------------------------------------------------------------
    def check_tokenizer(self, tok: Any) -> None:
        """Refuse data tokenized with another tokenizer than the run's, naming both and the fix."""
        want, have = self.manifest["tokenizer"], tokenizer_fingerprint(tok)
        if want["sha256"] != have["sha256"]:
            raise DataError(
                f"data.prepared={str(self.path)!r} was tokenized with {want['name']!r} (sha256 {want['sha256'][:12]}), "
                f"but this run's tokenizer is {have['name']!r} (sha256 {have['sha256'][:12]}); token ids would not "
                f"match the model's vocabulary. Set tokenizer={want['name']} (the one the data were prepared with), or "
                "prepare the corpus again with this run's tokenizer (`python -m moxin.prepare tokenizer=...`)")
        vocab = have.get("vocab_size")
        if vocab is not None and vocab > np.iinfo(self.dtype).max + 1:
            raise DataError(f"{self.path / MANIFEST}: tokens stored as {self.dtype} cannot hold a vocabulary of "
                            f"{vocab}; prepare the corpus again with this tokenizer")

    def check_files(self, names: list[str] | None = None) -> None:
        """Every shard and index file of the named sources is there with the size the manifest gives."""
        for n in names if names is not None else self.source_names:
            if n not in self.sources:
                raise DataError(f"data source {n!r} is not in data.prepared={str(self.path)!r} (it holds "
                                f"{self.source_names}); prepare it, or drop it from the mixture")
            for sh in self.sources[n]["shards"]:
                for key in ("bin", "idx"):
                    f = self.path / sh[key]
                    size = f.stat().st_size if f.is_file() else None
                    if size is None:
                        raise DataError(f"data.prepared: shard file {f} is missing (listed in {self.path / MANIFEST}, "
                                        f"source {n!r}); copy it back or prepare the corpus again")
                    if size != sh[f"{key}_bytes"]:
                        raise DataError(f"data.prepared: shard file {f} has {size} bytes, the manifest says "
                                        f"{sh[f'{key}_bytes']}; it is truncated or from another preparation: copy it "
                                        "again or prepare the corpus again")

    def verify_checksums(self) -> int:
        """Recompute the sha256 of every shard and index file (reads them all); a DataError names those that
        differ from the manifest. Returns the number of files checked."""
        self.check_files()
        bad, n = [], 0
        for name, src in self.sources.items():
            for sh in src["shards"]:
                for key in ("bin", "idx"):
                    n += 1
                    if file_sha256(self.path / sh[key]) != sh[f"{key}_sha256"]:
                        bad.append(str(self.path / sh[key]))
        if bad:
            raise DataError(f"data.prepared: {len(bad)} file(s) differ from {self.path / MANIFEST}: {bad[:5]}; copy "
                            "them again or prepare the corpus again")
        return n

    # ---- reading ------------------------------------------------------------------------------------------
    def _pread(self, rel: str, nbytes: int, offset: int) -> bytes:
        fd = self._fds.get(rel)
        if fd is None:
            try:
                fd = self._fds[rel] = os.open(self.path / rel, os.O_RDONLY)
            except FileNotFoundError:
                raise DataError(f"data.prepared: shard file {self.path / rel} is missing; copy it back or prepare "
                                "the corpus again") from None
        out = os.pread(fd, nbytes, offset)
        if len(out) != nbytes:
            raise DataError(f"data.prepared: {self.path / rel} ends at byte {offset + len(out)}, expected "
                            f"{offset + nbytes}; the file is truncated: prepare the corpus again")
        self.bytes_read += nbytes
        return out

    def iter_docs(self, name: str, shard: int, num_shards: int,
                  start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(position, hash, token ids)`` of reader ``shard``'s documents of a source from position ``start`` on;
        the position continues right after the document."""
        lo, hi = reader_range(self.num_docs(name), shard, num_shards)
        shards, cum = self.sources[name]["shards"], self._cum[name]
        d = lo + int(start)
        while d < hi:
            k = bisect.bisect_right(cum, d) - 1
            sh = shards[k]
            first = d - cum[k]
            n = min(_INDEX_CHUNK, cum[k + 1] - d, hi - d)
            rows = np.frombuffer(self._pread(sh["idx"], n * INDEX_DTYPE.itemsize, first * INDEX_DTYPE.itemsize),
                                 dtype=INDEX_DTYPE)
            for row in rows:
                ln = int(row["len"])
                size = self.dtype.itemsize
                ids = np.frombuffer(self._pread(sh["bin"], ln * size, int(row["start"]) * size), dtype=self.dtype)
                d += 1
                yield d - lo, int(row["hash"]), ids

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
