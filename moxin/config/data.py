"""SourceConfig: one corpus or data set, as every data module and the preparation read it (moxin/data/reader.py
reads its records); ``plain`` and ``config_fields``, which turn Hydra nodes into keyword arguments of a config
dataclass, naming an unknown or missing key."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from moxin.config.errors import DataError

__all__ = ["SourceConfig", "plain", "config_fields"]


def plain(obj: Any) -> Any:
    """A Hydra/OmegaConf container as plain dicts and lists (anything else unchanged)."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


@dataclass
class SourceConfig:
    """One corpus or data set.

    Args:
        name: short key used by mixtures (``Phase.mixture``) and reports.
        path: a local file, folder or glob (jsonl/json lines, parquet, txt; folders are searched recursively),
            or a Hugging Face hub dataset name such as ``cerebras/SlimPajama-627B``.
        text_field: the field / column holding the document text (pretraining; ``content`` for the-stack-dedup).
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
        return cls(**config_fields(cls, obj, "data source", ("name", "path")))


def config_fields(cls, obj: Any, what: str, required: tuple[str, ...]) -> dict:
    """``obj`` (a dict or Hydra DictConfig) as keyword arguments of the dataclass ``cls``; a DataError names an
    unknown or missing key."""
    obj = plain(obj)
    allowed = list(cls.__dataclass_fields__)
    if not isinstance(obj, Mapping):
        raise DataError(f"{what} must be a mapping with keys {', '.join(allowed)}; got {obj!r}")
    unknown = set(obj) - set(allowed)
    if unknown:
        raise DataError(f"{what} {obj.get('name', '?')!r}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise DataError(f"{what} {obj.get('name', '?')!r}: missing key(s) {missing}")
    return dict(obj)
