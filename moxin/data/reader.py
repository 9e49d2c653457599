"""One reader for every source kind: local jsonl (also ``.gz``), parquet, text files, folders and globs of them,
and Hugging Face hub datasets.

:func:`read_records` yields ``(location, record)``: ``file:line`` (or a hub row) and a dict, a str, or a
:class:`Bad` saying why the record is unusable. Bytes are decoded strictly (a replaced character would change
the training text). Readers shard by record index, or by file for a streamed hub dataset, and resume at a
position: docs/modules.md, "data/reader.py".
"""

from __future__ import annotations

import glob as _glob
import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from moxin.config import DataError, SourceConfig, plain

__all__ = ["Bad", "as_source", "is_hub_name", "resolve_files",
           "open_hub_dataset", "iter_lines", "read_records", "read_positioned", "hub_files_of_reader",
           "open_hub_file", "source_identity"]

_EXT_FORMAT = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}
_HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def as_source(obj: Any, default_name: str) -> SourceConfig:
    """A path / hub name, or a mapping without ``name``, as a SourceConfig named ``default_name``."""
    obj = plain(obj)
    if isinstance(obj, str):
        obj = {"name": default_name, "path": obj}
    if isinstance(obj, Mapping) and "name" not in obj:
        obj = {"name": default_name, **obj}
    return SourceConfig.from_any(dict(obj) if isinstance(obj, Mapping) else obj)


@dataclass(frozen=True)
class Bad:
    """An unusable record: why (``reason``, shown with its location) and a short ``kind`` for the counts."""

    reason: str
    kind: str = "malformed"


def is_hub_name(source: SourceConfig) -> bool:
    if source.format is not None:
        return source.format == "hub"
    p = source.path
    if os.path.exists(p) or _glob.has_magic(p):
        return False
    return bool(_HUB_RE.match(p)) and Path(p).suffix.lower() not in _EXT_FORMAT and not p.startswith(".")


def _ext_format(path: str) -> str | None:
    low = path.lower()
    for ext in sorted(_EXT_FORMAT, key=len, reverse=True):
        if low.endswith(ext):
            return _EXT_FORMAT[ext]
    return None


def resolve_files(source: SourceConfig) -> list[tuple[str, str]]:
    """The local files of a source as sorted ``(path, format)`` pairs; raises DataError if there are none."""
    p = source.path
    if _glob.has_magic(p):
        candidates = sorted(f for f in _glob.glob(p, recursive=True) if os.path.isfile(f))
        if not candidates:
            raise DataError(f"data source {source.name!r}: no files match {p!r}; fix the path/glob in the data config")
    elif os.path.isdir(p):
        pats = source.data_files or "**/*"
        pats = [pats] if isinstance(pats, str) else list(pats)
        candidates = sorted(
            {f for pat in pats for f in _glob.glob(os.path.join(p, pat), recursive=True) if os.path.isfile(f)}
        )
    elif os.path.isfile(p):
        candidates = [p]
    else:
        raise DataError(
            f"data source {source.name!r}: path {p!r} does not exist (cwd {os.getcwd()}); "
            "fix `path` (a local file, folder or glob) or give a Hugging Face dataset name like 'org/name'"
        )
    out = []
    for f in candidates:
        fmt = source.format or _ext_format(f)
        if fmt is None:
            if os.path.isfile(p):
                raise DataError(
                    f"data source {source.name!r}: cannot tell the format of {f!r} from its extension; "
                    f"use one of {sorted(set(_EXT_FORMAT))} or set format: jsonl|parquet|txt"
                )
            continue  # files of other kinds inside a folder are ignored
        out.append((f, fmt))
    if not out:
        raise DataError(
            f"data source {source.name!r}: folder {p!r} holds no jsonl/json/parquet/txt files"
            f"{' matching ' + repr(source.data_files) if source.data_files else ''}; the corpus is empty"
        )
    return out


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


def open_hub_dataset(source: SourceConfig, streaming: bool):
    """``datasets.load_dataset(path, hub_config, split, data_files)``: streamed (pretraining corpora) or
    memory-mapped Arrow (SFT / preference / prompt / eval sets that are counted up front); a DataError names the
    source and what to do when it cannot be opened."""
    try:
        import datasets  # on first use: slow to import, and only hub sources need it

        return datasets.load_dataset(source.path, source.hub_config, split=source.split, streaming=streaming,
                                     data_files=source.data_files)
    except Exception as e:  # network, unknown name, gated dataset ...
        raise DataError(
            f"data source {source.name!r}: cannot open Hugging Face dataset {source.path!r} "
            f"(config {source.hub_config!r}, split {source.split!r}): {type(e).__name__}: {e}. "
            "Check the name, the network / HF token, or point `path` at local jsonl / parquet files."
        ) from e


# ---- local files -------------------------------------------------------------------------------------------------
def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _too_long(n: int, cap: int | None, what: str = "record") -> Bad | None:
    if cap and n > cap:
        return Bad(f"{what} of {n:,} bytes is longer than max_record_bytes={cap:,}", "oversized")
    return None


def iter_lines(path: str, max_bytes: int | None) -> Iterator[tuple[int, str | Bad]]:
    """``(line number, text)`` of every non-blank line, or a :class:`Bad` for a line that is not valid UTF-8 or is
    longer than ``max_bytes`` (read past in chunks, never held whole)."""
    cap = max_bytes if max_bytes and max_bytes > 0 else None
    with _open_binary(path) as fh:
        lineno = 0
        while True:
            raw = fh.readline(cap + 2) if cap else fh.readline()
            if not raw:
                return
            lineno += 1
            if cap and len(raw.rstrip(b"\r\n")) > cap:
                n = len(raw)
                while not raw.endswith(b"\n"):
                    raw = fh.readline(1 << 20)
                    if not raw:
                        break
                    n += len(raw)
                yield lineno, _too_long(n, cap)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, Bad(f"invalid UTF-8 at byte {e.start} of the line ({e.reason})", "invalid_utf8")
                continue
            if text.strip():
                yield lineno, text


def _json_record(line: str) -> Any:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        return Bad(f"malformed JSON ({e.msg} at column {e.colno})")
    return rec if isinstance(rec, dict) else Bad(f"record is a {type(rec).__name__}, not an object")


def _text_file(path: str, cap: int | None) -> str | Bad:
    """A whole text file as one record (its size checked before reading, unless compressed)."""
    if not path.lower().endswith(".gz"):
        bad = _too_long(os.path.getsize(path), cap, "file")
        if bad:
            return bad
    with _open_binary(path) as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return Bad(f"invalid UTF-8 at byte {e.start} ({e.reason})", "invalid_utf8")


def _local_records(source: SourceConfig, keep, columns: list[str] | None,
                   formats: tuple[str, ...]) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` of the records whose index over all files satisfies ``keep(i)``; the others are not
    parsed."""
    i = 0
    for path, fmt in resolve_files(source):
        if fmt not in formats:
            raise DataError(f"data source {source.name!r}: {path} is {fmt}; these records come as "
                            f"{' or '.join(formats)}")
        if fmt == "jsonl":
            for lineno, line in iter_lines(path, source.max_record_bytes):
                if keep(i):
                    yield f"{path}:{lineno}", line if isinstance(line, Bad) else _json_record(line)
                i += 1
        elif fmt == "parquet":
            import pyarrow.parquet as pq  # on first use: only parquet sources need it

            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            for col in columns or []:
                if col not in names:
                    raise DataError(f"data source {source.name!r}: parquet file {path} has no column {col!r} "
                                    f"(columns: {names}); set text_field to one of them")
            row = 0
            for batch in pf.iter_batches(columns=columns, batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    if keep(i):
                        yield f"{path}:row {row}", rec
                    i += 1
        elif fmt == "txt" and source.txt_unit == "file":
            if keep(i):
                yield path, _text_file(path, source.max_record_bytes)
            i += 1
        elif fmt == "txt" and source.txt_unit == "line":
            for lineno, line in iter_lines(path, source.max_record_bytes):
                if keep(i):
                    yield f"{path}:{lineno}", line if isinstance(line, Bad) else line.rstrip("\n")
                i += 1
        else:
            raise DataError(f"data source {source.name!r}: txt_unit must be 'file' or 'line', not {source.txt_unit!r}")


# ---- every kind ------------------------------------------------------------------------------------------------
def read_records(source: SourceConfig, *, shard: int = 0, num_shards: int = 1, start: Any = 0,
                 columns: list[str] | None = None, formats: tuple[str, ...] = ("jsonl", "parquet", "txt"),
                 dataset: Any = None) -> Iterator[tuple[str, Any]]:
    """``(location, record)`` of every record of one shard of a source (module docstring).

    Args:
        shard, num_shards, start: this reader's shard and its first record (pretraining; see the module
            docstring and :func:`read_positioned`).
        columns: parquet columns to read (the others are never decoded); a file without one is an error.
        formats: the local formats these records may come in; a file of another is an error naming it.
        dataset: a hub dataset the caller opened memory-mapped (``open_hub_dataset(source, streaming=False)``, kept
            as the store of a post-training set); its rows are read in order. Without it a hub source is streamed.
    """
    if dataset is not None:
        for i, rec in enumerate(dataset, 1):
            yield f"{source.path}[{source.split}] row {i}", rec
        return
    for _, loc, rec in read_positioned(source, shard=shard, num_shards=num_shards, start=start, columns=columns,
                                       formats=formats):
        yield loc, rec


def hub_files_of_reader(n_files: int, shard: int, num_shards: int) -> list[int]:
    """The files (shards, in ``datasets``' words) of a streamed hub dataset that reader ``shard`` streams."""
    return list(range(shard, n_files, num_shards))


def open_hub_file(ds: Any, index: int) -> Any:
    """File ``index`` of a streamed hub dataset as a dataset of its own (``IterableDataset.shard`` by file)."""
    return ds.shard(num_shards=ds.n_shards, index=index, contiguous=True)


def read_positioned(source: SourceConfig, *, shard: int = 0, num_shards: int = 1, start: Any = 0,
                    columns: list[str] | None = None, formats: tuple[str, ...] = ("jsonl", "parquet", "txt"),
                    ) -> Iterator[tuple[Any, str, Any]]:
    """``(position, location, record)`` of one reader shard of a source; ``position`` is the ``start`` that
    continues right after the record: an int (records of the shard consumed), or ``[file, record]`` for a hub
    dataset read by file (module docstring). ``start=0`` is the beginning for every kind."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in [0, {num_shards})")
    if is_hub_name(source):
        ds = open_hub_dataset(source, streaming=True)
        if hasattr(ds, "shard") and ds.n_shards >= num_shards:  # older datasets have no IterableDataset.shard
            yield from _hub_by_file(source, ds, shard, num_shards, start)
            return
        if not isinstance(start, int):
            raise DataError(f"data source {source.name!r}: the saved position {start!r} is by file, but the dataset "
                            f"now has {ds.n_shards} files for {num_shards} readers; resume with the data and "
                            "devices the run was started with")
        if num_shards > 1:
            from datasets.distributed import split_dataset_by_node  # hub sources only (see open_hub_dataset)

            ds = split_dataset_by_node(ds, rank=shard, world_size=num_shards)
        if start:
            ds = ds.skip(start)
        for k, rec in enumerate(ds, start + 1):
            yield k, f"{source.path}[{source.split}] shard {shard}/{num_shards} record {k}", rec
        return
    if not isinstance(start, int):
        raise DataError(f"data source {source.name!r}: the saved position {start!r} belongs to a hub dataset, not "
                        f"the local files at {source.path!r}; resume with the data the run was started with")
    first = shard + start * num_shards  # index (over all files) of the first record to parse
    for k, (loc, rec) in enumerate(
            _local_records(source, lambda i: i >= first and i % num_shards == shard, columns, formats), start + 1):
        yield k, loc, rec


def _hub_by_file(source: SourceConfig, ds: Any, shard: int, num_shards: int, start: Any) -> Iterator[tuple]:
    """A streamed hub dataset's files of one reader, from position ``[file, record]`` on."""
    if isinstance(start, int):
        if start:
            raise DataError(f"data source {source.name!r}: the saved position {start} counts records of a 1-of-"
                            f"{num_shards} split, but this dataset is now read by file ({ds.n_shards} files); "
                            "resume with the datasets version the run was started with")
        start = [0, 0]
    j0, skip = int(start[0]), int(start[1])
    files = hub_files_of_reader(ds.n_shards, shard, num_shards)
    for j in range(j0, len(files)):
        part = open_hub_file(ds, files[j])
        first = skip if j == j0 else 0
        if first:
            part = part.skip(first)
        it = iter(enumerate(part, first + 1))
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)  # one record ahead: the last record of a file resumes at the next file
            k, rec = cur
            pos = [j, k] if nxt is not None else [j + 1, 0]
            yield pos, f"{source.path}[{source.split}] file {files[j]} record {k}", rec
            cur = nxt
