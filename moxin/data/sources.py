"""Document sources: local jsonl / parquet / text files and folders, or Hugging Face hub datasets (streaming).

A source is described by a :class:`SourceConfig` and read with :func:`iter_records` / :func:`iter_documents`,
which yield the text of one document at a time. Every reader is *sharded by record index*: with
``num_shards`` readers (one per (rank, dataloader worker) pair), reader ``shard_index`` keeps records
``i`` with ``i % num_shards == shard_index``, so readers never see the same record. ``start`` skips the first
``start`` records *of the shard* (good or bad), which is how a resumed run continues at the same position.

Hub datasets go through ``datasets.load_dataset(path, streaming=True)`` and
``datasets.distributed.split_dataset_by_node`` (file-level split when the number of files divides evenly,
record-level otherwise); their ``start`` uses ``IterableDataset.skip``.

Bad records (a jsonl line that is not valid JSON or not an object, a record whose text field is missing or not
a string) are counted in :class:`SourceStats` with ``file:line`` for the first few, never silently dropped;
past ``max_bad_records`` or ``max_bad_fraction`` (per reader) the run stops with :class:`DataError`.
Empty texts are counted separately (``empty``) and skipped.

:func:`validate_source` runs before any training step: the path exists, at least one document can be read and
the text field exists (the error names file, line and the fields that are there).
"""

from __future__ import annotations

import glob as _glob
import gzip
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "DataError",
    "SourceConfig",
    "SourceStats",
    "iter_records",
    "iter_documents",
    "validate_source",
    "resolve_files",
    "is_hub_name",
]

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
_BAD_EXAMPLES = 5


class DataError(ValueError):
    """A data input that cannot be used. The message names the source, the file/line/key and the fix."""


def plain(obj: Any) -> Any:
    """A Hydra/OmegaConf container as plain dicts and lists (anything else unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return obj


@dataclass
class SourceConfig:
    """One corpus.

    Args:
        name: short key used by mixtures (``Phase.mixture``) and reports.
        path: a local file, folder or glob (jsonl/json lines, parquet, txt; folders are searched recursively),
            or a Hugging Face hub dataset name such as ``cerebras/SlimPajama-627B`` (streamed).
        text_field: the field / column holding the document text (``content`` for the-stack-dedup).
        split: dataset split for hub sources.
        data_files: glob (or list of globs) selecting files inside a folder, or ``data_files`` for
            ``load_dataset`` (e.g. ``"data/python/*.parquet"`` for one language of the-stack-dedup).
        hub_config: the dataset configuration name for ``load_dataset(path, hub_config)``.
        format: ``jsonl`` | ``parquet`` | ``txt`` | ``hub``; ``None`` detects it from the extension / path.
        txt_unit: for text files: ``file`` (one document per file) or ``line`` (one per non-empty line).
        max_bad_records: stop once one reader met more bad records than this.
        max_bad_fraction: stop once bad / records exceeds this (checked after 100 records).
        max_record_bytes: a record (jsonl line, text line or file, parquet / hub text) longer than this is a bad
            record, counted and skipped unparsed: one runaway line (a dumped table, a base64 blob) would
            otherwise be tokenized and packed into thousands of rows. None: no cap.
    """

    name: str
    path: str
    text_field: str = "text"
    split: str = "train"
    data_files: str | list[str] | None = None
    hub_config: str | None = None
    format: str | None = None
    txt_unit: str = "file"
    max_bad_records: int = 1000
    max_bad_fraction: float = 0.01
    max_record_bytes: int | None = 8 * 1024 * 1024

    def __post_init__(self):
        problems = []
        if not isinstance(self.max_bad_records, int) or self.max_bad_records < 0:
            problems.append(f"max_bad_records={self.max_bad_records!r} must be an integer >= 0")
        if not isinstance(self.max_bad_fraction, (int, float)) or not 0 <= self.max_bad_fraction <= 1:
            problems.append(f"max_bad_fraction={self.max_bad_fraction!r} must be in [0, 1]")
        if self.max_record_bytes is not None and (not isinstance(self.max_record_bytes, int)
                                                  or self.max_record_bytes < 1):
            problems.append(f"max_record_bytes={self.max_record_bytes!r} must be an integer >= 1 or null")
        if problems:
            raise DataError(f"data source {self.name!r}: " + "; ".join(problems))

    @classmethod
    def from_any(cls, obj: Any) -> "SourceConfig":
        """Accept a SourceConfig, a dict / DictConfig (Hydra) with the same keys."""
        if isinstance(obj, SourceConfig):
            return obj
        obj = plain(obj)
        if not isinstance(obj, dict):
            raise DataError(f"data source must be a mapping with keys name, path, ...; got {obj!r}")
        known = set(cls.__dataclass_fields__)
        unknown = set(obj) - known
        if unknown:
            raise DataError(
                f"data source {obj.get('name', '?')!r}: unknown key(s) {sorted(unknown)}; allowed: {sorted(known)}"
            )
        if "name" not in obj or "path" not in obj:
            raise DataError(f"data source {obj!r}: 'name' and 'path' are required")
        return cls(**obj)


@dataclass
class SourceStats:
    """Counts for one reader of one source (records include bad ones)."""

    records: int = 0
    bad: int = 0
    empty: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"records": self.records, "bad": self.bad, "empty": self.empty, "bad_examples": list(self.bad_examples)}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceStats":
        return cls(int(d["records"]), int(d["bad"]), int(d["empty"]), list(d["bad_examples"]))

    def merge(self, other: "SourceStats") -> None:
        self.records += other.records
        self.bad += other.bad
        self.empty += other.empty
        room = _BAD_EXAMPLES - len(self.bad_examples)
        if room > 0:
            self.bad_examples.extend(other.bad_examples[:room])


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


# ----------------------------------------------------------------------------------------------------------
# readers: each yields (location, record) where record is a text, or a _Bad(reason)


class _Bad:
    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _get_text(rec: Any, source: SourceConfig):
    if not isinstance(rec, dict):
        return _Bad(f"record is a {type(rec).__name__}, not an object")
    if source.text_field not in rec:
        return _Bad(f"no field {source.text_field!r} (fields: {sorted(rec)[:20]})")
    text = rec[source.text_field]
    if not isinstance(text, str):
        return _Bad(f"field {source.text_field!r} is a {type(text).__name__}, not a string")
    return text


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def iter_lines(path: str, max_bytes: int | None) -> Iterator[tuple[int, str | _Bad]]:
    """``(line number, text)`` of every non-blank line, or a ``_Bad`` for a line that is not valid UTF-8 or is
    longer than ``max_bytes`` (read past in chunks, never held whole). Bytes are decoded strictly: a replaced
    character would silently change the text the model trains on."""
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
                yield lineno, _Bad(f"record of {n:,} bytes is longer than max_record_bytes={cap:,}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _Bad(f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
                continue
            if text.strip():
                yield lineno, text


def _too_long(text: str, source: SourceConfig) -> _Bad | None:
    cap = source.max_record_bytes
    if cap and len(text) > cap // 4 and len(text.encode("utf-8", "surrogatepass")) > cap:
        return _Bad(f"record of {len(text.encode('utf-8', 'surrogatepass')):,} bytes is longer than "
                    f"max_record_bytes={cap:,}")
    return None


def _local_records(source: SourceConfig, files, keep) -> Iterator[tuple[str, Any]]:
    """Yield (location, text|_Bad) for records whose global index satisfies keep(i); others are not parsed."""
    i = 0
    for path, fmt in files:
        if fmt == "jsonl":
            for lineno, line in iter_lines(path, source.max_record_bytes):
                if keep(i):
                    if isinstance(line, _Bad):
                        rec = line
                    else:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError as e:
                            rec = _Bad(f"malformed JSON ({e.msg} at column {e.colno})")
                    yield f"{path}:{lineno}", rec if isinstance(rec, _Bad) else _get_text(rec, source)
                i += 1
        elif fmt == "parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            names = pf.schema_arrow.names
            if source.text_field not in names:
                raise DataError(
                    f"data source {source.name!r}: parquet file {path} has no column {source.text_field!r} "
                    f"(columns: {names}); set text_field to one of them"
                )
            row = 0
            for batch in pf.iter_batches(columns=[source.text_field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if keep(i):
                        ok = isinstance(text, str)
                        bad = _too_long(text, source) if ok else _Bad(f"column {source.text_field!r} is {text!r}")
                        yield f"{path}:row {row}", bad or text
                    i += 1
        elif fmt == "txt":
            if source.txt_unit == "file":
                if keep(i):
                    cap = source.max_record_bytes
                    size = os.path.getsize(path)
                    if cap and not path.lower().endswith(".gz") and size > cap:
                        yield path, _Bad(f"file of {size:,} bytes is longer than max_record_bytes={cap:,}")
                    else:
                        with _open_binary(path) as fh:
                            raw = fh.read()
                        try:
                            text = raw.decode("utf-8")
                            yield path, _too_long(text, source) or text
                        except UnicodeDecodeError as e:
                            yield path, _Bad(f"invalid UTF-8 at byte {e.start} ({e.reason})")
                i += 1
            elif source.txt_unit == "line":
                for lineno, line in iter_lines(path, source.max_record_bytes):
                    if keep(i):
                        yield f"{path}:{lineno}", line if isinstance(line, _Bad) else line.rstrip("\n")
                    i += 1
            else:
                raise DataError(f"data source {source.name!r}: txt_unit must be 'file' or 'line', not {source.txt_unit!r}")
        else:
            raise DataError(f"data source {source.name!r}: unknown format {fmt!r} for {path}; use jsonl|parquet|txt")


def open_hub_dataset(source: SourceConfig, streaming: bool):
    """``datasets.load_dataset(path, hub_config, split, data_files)``: streamed (pretraining corpora) or
    memory-mapped Arrow (SFT / preference / prompt sets that are counted up front); a DataError names the
    source and what to do when it cannot be opened."""
    try:
        import datasets

        return datasets.load_dataset(source.path, source.hub_config, split=source.split, streaming=streaming,
                                     data_files=source.data_files)
    except Exception as e:  # network, unknown name, gated dataset ...
        raise DataError(
            f"data source {source.name!r}: cannot open Hugging Face dataset {source.path!r} "
            f"(config {source.hub_config!r}, split {source.split!r}): {type(e).__name__}: {e}. "
            "Check the name, the network / HF token, or point `path` at local jsonl / parquet files."
        ) from e


def _hub_dataset(source: SourceConfig, shard_index: int, num_shards: int, start: int):
    ds = open_hub_dataset(source, streaming=True)
    if num_shards > 1:
        from datasets.distributed import split_dataset_by_node

        ds = split_dataset_by_node(ds, rank=shard_index, world_size=num_shards)
    if start:
        ds = ds.skip(start)
    return ds


def _hub_records(source: SourceConfig, shard_index: int, num_shards: int, start: int):
    ds = _hub_dataset(source, shard_index, num_shards, start)
    for k, rec in enumerate(ds, start + 1):
        t = _get_text(rec, source)
        yield (f"{source.path}[{source.split}] shard {shard_index}/{num_shards} record {k}",
               t if isinstance(t, _Bad) else _too_long(t, source) or t)


def _check_threshold(source: SourceConfig, stats: SourceStats) -> None:
    too_many = stats.bad > source.max_bad_records
    too_frac = stats.records >= 100 and stats.bad > source.max_bad_fraction * stats.records
    if too_many or too_frac:
        raise DataError(
            f"data source {source.name!r}: {stats.bad} bad records out of {stats.records} read "
            f"(limits: max_bad_records={source.max_bad_records}, max_bad_fraction={source.max_bad_fraction}); "
            f"first ones: {stats.bad_examples}. Fix or remove those records, check text_field "
            f"({source.text_field!r}), or raise the limits in the source config."
        )


def iter_records(
    source: SourceConfig,
    shard_index: int = 0,
    num_shards: int = 1,
    start: int = 0,
    stats: SourceStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield ``(position, text)`` for the documents of one shard.

    ``position`` is the number of records of this shard consumed so far (bad ones included), i.e. the
    ``start`` to pass to continue right after this document. Bad and empty records update ``stats``.
    """
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    stats = stats if stats is not None else SourceStats()
    if is_hub_name(source):
        records = _hub_records(source, shard_index, num_shards, start)
        pos = start
    else:
        files = resolve_files(source)
        first = shard_index + start * num_shards  # global index of the first record to parse
        records = _local_records(source, files, lambda i: i >= first and i % num_shards == shard_index)
        pos = start
    for loc, rec in records:
        pos += 1
        stats.records += 1
        if isinstance(rec, _Bad):
            stats.bad += 1
            if len(stats.bad_examples) < _BAD_EXAMPLES:
                stats.bad_examples.append(f"{loc}: {rec.reason}")
            _check_threshold(source, stats)
            continue
        if not rec.strip():
            stats.empty += 1
            continue
        yield pos, rec


def iter_documents(
    source: SourceConfig, shard_index: int = 0, num_shards: int = 1, start: int = 0, stats: SourceStats | None = None
) -> Iterator[str]:
    """Yield the texts of one shard of a source (see :func:`iter_records`)."""
    for _, text in iter_records(source, shard_index, num_shards, start, stats):
        yield text


def validate_source(source: SourceConfig, probe_records: int = 1000) -> dict:
    """Check a source before training: it exists, has a document, and its records have the text field.

    Reads at most ``probe_records`` records. Raises :class:`DataError` naming source, file, line and fix.
    Returns ``{"name", "kind", "files"}`` (``files`` is None for hub sources).
    """
    if source.format not in (None, "jsonl", "parquet", "txt", "hub"):
        raise DataError(f"data source {source.name!r}: format {source.format!r} unknown; use jsonl|parquet|txt|hub")
    hub = is_hub_name(source)
    files = None if hub else resolve_files(source)
    if hub:
        records = _hub_records(source, 0, 1, 0)
    else:
        records = _local_records(source, files, lambda i: True)
    seen = 0
    first_bad = None
    for loc, rec in records:
        seen += 1
        if isinstance(rec, _Bad):
            if "no field" in rec.reason:
                raise DataError(
                    f"data source {source.name!r}: record at {loc} has {rec.reason}; set text_field to the field "
                    "that holds the document text"
                )
            first_bad = first_bad or f"{loc}: {rec.reason}"
        elif rec.strip():
            return {"name": source.name, "kind": "hub" if hub else "local", "files": files and [f for f, _ in files]}
        if seen >= probe_records:
            break
    where = source.path if hub else ", ".join(f for f, _ in files[:5])
    raise DataError(
        f"data source {source.name!r}: no document with non-empty text in the first {seen} records of {where}"
        f"{' (first bad record: ' + first_bad + ')' if first_bad else ''}; the corpus is empty or unreadable. "
        "Check the files and text_field."
    )
