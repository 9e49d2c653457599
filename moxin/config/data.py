"""SourceConfig: one corpus or data set, as every data module and the preparation read it (moxin/data/reader.py
reads its records); ``plain`` and ``config_fields``, which turn Hydra nodes into keyword arguments of a config
dataclass, naming an unknown or missing key."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from moxin.config.errors import DataError
from moxin.config.options import ContaminatedAction

__all__ = ["SourceConfig", "DecontaminateConfig", "plain", "config_fields"]


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
        template: render each record with this benchmark template (``moxin.data.enhance.TEMPLATES``: question and
            answer as one text) instead of reading ``text_field``; the phase-3 enhancement sources use it.
        local_dir: offline machines: read the local copy ``<local_dir>/<name>.jsonl`` (or ``.parquet``, or the folder
            ``<local_dir>/<name>/``) instead of the hub dataset ``path``; resolved into ``path`` on construction
            (``split``, ``hub_config`` and ``data_files`` then do not apply). Write a copy with
            ``datasets.load_dataset(path, hub_config, split=split).to_json("<local_dir>/<name>.jsonl")``.
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
    template: str | None = None
    local_dir: str | None = None

    def __post_init__(self):
        if self.local_dir is not None:
            self._use_local_copy()
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

    def _use_local_copy(self) -> None:
        """Point ``path`` at the local copy of the hub dataset (``local_dir``), or name the files looked for."""
        base = os.path.join(self.local_dir, self.name)
        tried = [base + ".jsonl", base + ".jsonl.gz", base + ".parquet", base]
        found = next((p for p in tried if os.path.exists(p)), None)
        if found is None:
            raise DataError(f"data source {self.name!r}: local_dir={self.local_dir!r} holds no copy of {self.path!r} "
                            f"(looked for {', '.join(tried)}); write it with datasets.load_dataset({self.path!r}, "
                            f"{self.hub_config!r}, split={self.split!r}).to_json({tried[0]!r}), or unset local_dir "
                            "to read the hub")
        self.path, self.local_dir, self.data_files, self.hub_config = found, None, None, None
        self.format = None if self.format == "hub" else self.format

    @classmethod
    def from_any(cls, obj: Any) -> "SourceConfig":
        """Accept a SourceConfig, a dict / DictConfig (Hydra) with the same keys."""
        if isinstance(obj, SourceConfig):
            return obj
        return cls(**config_fields(cls, obj, "data source", ("name", "path")))


@dataclass
class DecontaminateConfig:
    """``data.decontaminate``: n-gram overlap between training sources and the evaluation splits of eval presets,
    checked by ``python -m moxin.prepare`` (moxin/data/decontaminate.py; docs/modules.md, "data/decontaminate.py").

    Args:
        eval: eval configs whose tasks' evaluated splits (validation / test) are the contaminants: names of
            ``conf/eval/*.yaml`` files or paths to such files.
        local_dir: local copies of the preset tasks' records (``<local_dir>/<preset>/<split>.jsonl``, as
            ``eval.local_dir``), for offline machines; None: each eval config's own ``local_dir``, else the hub.
        n: words per n-gram (13: GPT-3's and lm-evaluation-harness's decontamination). Smaller n catches shorter
            overlaps and flags more chance matches; an eval item shorter than n words cannot be matched at all
            (the report counts them).
        action: ``drop`` (overlapping records are not written) or ``flag`` (written, counted and listed).
        sources: the sources to check; None: every source with a ``template`` (the benchmark training splits).
        examples: overlapping records listed per source in the report (location, task, one shared n-gram).
    """

    eval: list[str] = field(default_factory=lambda: ["paper_base", "paper_instruct", "paper_reasoning"])
    local_dir: str | None = None
    n: int = 13
    action: ContaminatedAction = ContaminatedAction.DROP
    sources: list[str] | None = None
    examples: int = 5

    def __post_init__(self):
        if isinstance(self.eval, str):
            self.eval = [self.eval]
        problems = []
        if not self.eval:
            problems.append("eval is empty; name at least one conf/eval config (e.g. paper_base)")
        if not isinstance(self.n, int) or self.n < 1:
            problems.append(f"n={self.n!r} must be an integer >= 1 (13 as GPT-3 and lm-eval)")
        try:
            self.action = ContaminatedAction(self.action)
        except ValueError:
            problems.append(f"action={self.action!r}; choose one of {[a.value for a in ContaminatedAction]}")
        if not isinstance(self.examples, int) or self.examples < 0:
            problems.append(f"examples={self.examples!r} must be an integer >= 0")
        if problems:
            raise DataError("data.decontaminate: " + "; ".join(problems))

    @classmethod
    def from_any(cls, obj: Any) -> "DecontaminateConfig | None":
        """None (no decontamination), a DecontaminateConfig, or a dict / DictConfig with its keys."""
        if obj is None or isinstance(obj, DecontaminateConfig):
            return obj
        return cls(**config_fields(cls, obj, "data.decontaminate", ()))

    def settings(self) -> dict:
        """What decides which records overlap (recorded in the prepared manifest)."""
        return {"eval": list(self.eval), "n": self.n, "action": self.action.value, "sources": self.sources}


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
