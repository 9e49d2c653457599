"""Pretraining documents: the texts of one shard of a source, counted, with the position to resume from; and
:func:`validate_source`, the check of a source before any training step.

Records come from :func:`moxin.data.reader.read_records` (sharded by record index, so the readers of all
(rank, dataloader worker) pairs never see the same record) and their text from :func:`moxin.data.extract.text_of`.
Bad records (malformed JSON, not an object, invalid UTF-8, oversized, a missing or non-string text field) are
counted in a :class:`RecordStats` with ``file:line`` for the first few; past the source's ``max_bad_records`` or
``max_bad_fraction`` (per reader) the run stops with :class:`DataError`. Empty texts are counted (``empty``) and
skipped.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from moxin.config import DataError, SourceConfig
from moxin.data.bad_records import RecordStats
from moxin.data.extract import text_columns, text_of
from moxin.data.reader import Bad, is_hub_name, read_positioned, read_records, resolve_files

__all__ = ["iter_records", "documents_of", "iter_documents", "validate_source"]


def iter_records(
    source: SourceConfig,
    shard_index: int = 0,
    num_shards: int = 1,
    start: Any = 0,
    stats: RecordStats | None = None,
) -> Iterator[tuple[Any, str]]:
    """Yield ``(position, text)`` for the documents of one shard.

    ``position`` is the ``start`` to pass to continue right after this document (records of this shard consumed
    so far, bad ones included; ``[file, record]`` for a hub dataset read by file, see
    :func:`moxin.data.reader.read_positioned`). Bad and empty records update ``stats``.
    """
    records = read_positioned(source, shard=shard_index, num_shards=num_shards, start=start,
                              columns=text_columns(source))
    yield from documents_of(source, records, stats)


def documents_of(source: SourceConfig, records: Iterable[tuple[Any, str, Any]],
                 stats: RecordStats | None = None) -> Iterator[tuple[Any, str]]:
    """``(position, text)`` of the usable documents among ``(position, location, record)``: bad records counted
    (with their location) under the source's limits, empty texts counted and skipped."""
    stats = stats if stats is not None else RecordStats()
    for pos, loc, rec in records:
        text = rec if isinstance(rec, Bad) else text_of(rec, source)
        stats.records += 1
        if isinstance(text, Bad):
            stats.add_bad(loc, text)
            stats.check(f"data source {source.name!r}", source.max_bad_records, source.max_bad_fraction,
                        f"Fix or remove those records, check text_field ({source.text_field!r}), or raise the "
                        "limits in the source config.")
            continue
        if not text.strip():
            stats.empty += 1
            continue
        stats.kept += 1
        yield pos, text


def iter_documents(
    source: SourceConfig, shard_index: int = 0, num_shards: int = 1, start: Any = 0, stats: RecordStats | None = None
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
    seen = 0
    first_bad = None
    for loc, rec in read_records(source, columns=text_columns(source)):
        text = rec if isinstance(rec, Bad) else text_of(rec, source)
        seen += 1
        if isinstance(text, Bad):
            if text.kind == "missing_field":
                fix = (f"check the records against template {source.template!r} (moxin/data/enhance.py)"
                       if source.template else "set text_field to the field that holds the document text")
                raise DataError(f"data source {source.name!r}: record at {loc} has {text.reason}; {fix}")
            first_bad = first_bad or f"{loc}: {text.reason}"
        elif text.strip():
            return {"name": source.name, "kind": "hub" if hub else "local", "files": files and [f for f, _ in files]}
        if seen >= probe_records:
            break
    where = source.path if hub else ", ".join(f for f, _ in files[:5])
    raise DataError(
        f"data source {source.name!r}: no document with non-empty text in the first {seen} records of {where}"
        f"{' (first bad record: ' + first_bad + ')' if first_bad else ''}; the corpus is empty or unreadable. "
        "Check the files and text_field."
    )
