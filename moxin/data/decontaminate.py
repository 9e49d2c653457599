"""N-gram decontamination of training sources against evaluation splits, as GPT-3 and lm-evaluation-harness do it.

Text is normalised as lm-eval's ``Janitor`` does (lowercased, ASCII punctuation deleted, split on whitespace); its
word n-grams (13 by default) are hashed to 64-bit integers (each word's 64-bit str hash, combined polynomially), so
the evaluation side is a sorted ``uint64`` array with a bitmask of the tasks that hold each n-gram: 16 bytes per
n-gram, whatever the words. A training record that shares one n-gram with an evaluation split is contaminated; the
preparation (``python -m moxin.prepare``, ``data.decontaminate``) drops or flags it and writes
``decontamination.json`` next to the prepared data. Details: docs/modules.md, "data/decontaminate.py".
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
from omegaconf import OmegaConf

from moxin.config import DataError, DecontaminateConfig, EvalConfig, MoxinUserError, SourceConfig, TaskConfig
from moxin.data.reader import Bad, is_hub_name, open_hub_dataset, read_records
from moxin.paths import conf_dir

__all__ = ["normalized_words", "ngram_hashes", "EvalSplit", "eval_splits", "EvalNgrams", "SourceCounts",
           "Decontaminator", "REPORT", "build_report", "format_table", "write_report"]

REPORT = "decontamination.json"
_DELETE = str.maketrans("", "", string.punctuation)
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial combination of word hashes is a bijection per position
_MAX_TASKS = 64  # one uint64 bitmask per n-gram


def normalized_words(text: str) -> list[str]:
    """lm-eval ``Janitor.normalize_string`` then ``split()``: lowercase, ASCII punctuation deleted, whitespace split
    (``Janitor`` lowercases ASCII letters only; here every letter)."""
    return text.lower().translate(_DELETE).split()


def ngram_hashes(words: list[str], n: int) -> np.ndarray:
    """The 64-bit hash of every word n-gram of ``words`` in order (``uint64``, ``len(words) - n + 1`` of them; none
    for fewer than ``n`` words). Words are hashed with Python's str hash (64-bit SipHash, computed in C and cached
    on the string): seeded per process, so an index is only matched in the process that built it."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    w = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    m = len(words) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):  # uint64 arrays wrap around: h = sum_j w[i + j] * MUL^(n - 1 - j) mod 2^64
        h = h * _MUL + w[j:j + m]
    return h


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a record (dict values and list items, recursively)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


# ---- the evaluation side -----------------------------------------------------------------------------------------
@dataclass
class EvalSplit:
    """One evaluated split: the task name used in the report and where its records are. With ``hub_configs`` (a hub
    dataset of one config per subtask: BBH, MATH) every config is read, its records tagged with ``subject_field``."""

    name: str
    path: str
    split: str
    hub_config: str | None = None
    data_files: Any = None
    hub_configs: list[str] | None = None
    subject_field: str | None = None

    @classmethod
    def of(cls, task: TaskConfig) -> "EvalSplit":
        return cls(task.preset or task.name, task.path, task.split, task.hub_config, task.data_files,
                   task.hub_configs, task.subject_field)

    def where(self) -> dict:
        """Where the records are, for the report."""
        return {"path": self.path, "split": self.split, "hub_config": self.hub_config} | (
            {"hub_configs": list(self.hub_configs)} if self.per_config() else {})

    def per_config(self) -> bool:
        """Whether each of ``hub_configs`` is read (a hub dataset; a local copy is one file)."""
        return bool(self.hub_configs) and is_hub_name(SourceConfig(name=self.name, path=self.path, split=self.split))

    def records(self) -> Iterator[dict]:
        """Its records: local jsonl / parquet or the hub (memory-mapped, as moxin.eval reads them), every config of
        ``hub_configs`` in turn."""
        per_config = self.per_config()
        for config in self.hub_configs if per_config else [self.hub_config]:
            src = SourceConfig(name=self.name, path=self.path, split=self.split, hub_config=config,
                               data_files=self.data_files)
            dataset = open_hub_dataset(src, streaming=False) if is_hub_name(src) else None
            for loc, rec in read_records(src, formats=("jsonl", "parquet"), dataset=dataset):
                if isinstance(rec, Bad):
                    raise DataError(f"decontamination: eval task {self.name!r}: {loc}"
                                    f"{f' (config {config!r})' if config else ''}: {rec.reason}; fix the record")
                yield {**rec, self.subject_field: config} if per_config else rec

    def subject(self, rec: dict) -> str:
        """The subject a record counts under in the report (its ``subject_field``)."""
        return str(rec.get(self.subject_field))


def _eval_config_file(name: str) -> Path:
    path = Path(name) if name.endswith((".yaml", ".yml")) else conf_dir() / "eval" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (conf_dir() / "eval").glob("*.yaml"))
        raise DataError(f"data.decontaminate.eval: {name!r} is no eval config ({path} does not exist); name one of "
                        f"{known} or give a path to a .yaml file")
    return path


def eval_splits(cfg: DecontaminateConfig) -> list[EvalSplit]:
    """The evaluated splits of every task of the eval configs ``cfg.eval`` names, each once (a split evaluated by
    several tasks, e.g. ARC-Challenge 0-shot and 25-shot, counts once, under its preset's name)."""
    out: dict[tuple, EvalSplit] = {}
    for name in cfg.eval:
        path = _eval_config_file(name)
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        raw.pop("defaults", None)
        if cfg.local_dir is not None:
            raw["local_dir"] = cfg.local_dir
        try:
            ecfg = EvalConfig.from_any(raw)
        except MoxinUserError as e:
            raise DataError(f"data.decontaminate.eval: {path}: {e}") from e
        for task in ecfg.tasks:
            s = EvalSplit.of(task)
            key = (s.path, s.split, s.hub_config, json.dumps(s.data_files, sort_keys=True), json.dumps(s.hub_configs))
            out.setdefault(key, s)
    names = [s.name for s in out.values()]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"data.decontaminate.eval: tasks {dup} read different records under one name; give the tasks "
                        "distinct names")
    return list(out.values())


class EvalNgrams:
    """The n-grams of the evaluation splits: sorted unique hashes, each with the bitmask of the tasks that hold it."""

    def __init__(self, n: int):
        self.n = n
        self.tasks: list[str] = []
        self.meta: dict[str, dict] = {}
        self.keys = np.zeros(0, dtype=np.uint64)
        self.masks = np.zeros(0, dtype=np.uint64)

    def add(self, name: str, records: Iterable[Any], where: dict | None = None,
            subject: Callable[[Any], str] | None = None) -> None:
        """Add one task's records: the n-grams of each string field (separately: no n-gram spans two fields).
        ``subject`` names a record's subject: the task's meta then counts the records of each."""
        if len(self.tasks) >= _MAX_TASKS:
            raise DataError(f"data.decontaminate: more than {_MAX_TASKS} evaluation tasks; split the check in two")
        grams, n_records, short, subjects = [], 0, 0, {}
        for rec in records:
            n_records += 1
            if subject is not None:
                sub = subject(rec)
                subjects[sub] = subjects.get(sub, 0) + 1
            mine = [ngram_hashes(normalized_words(s), self.n) for s in _strings(rec)]
            mine = [g for g in mine if len(g)]
            short += not mine
            grams.extend(mine)
        uniq = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)
        bit = np.uint64(1) << np.uint64(len(self.tasks))
        self.tasks.append(name)
        self.meta[name] = {**(where or {}), "records": n_records, "ngrams": int(len(uniq)), "shorter_than_n": short}
        if subject is not None:
            self.meta[name]["subjects"] = dict(sorted(subjects.items()))
        h = np.concatenate([self.keys, uniq])  # merged into the index: keys stay sorted and unique
        bits = np.concatenate([self.masks, np.full(len(uniq), bit, dtype=np.uint64)])
        order = np.argsort(h, kind="stable")
        h, bits = h[order], bits[order]
        self.keys, start = np.unique(h, return_index=True)
        self.masks = np.bitwise_or.reduceat(bits, start) if len(h) else np.zeros(0, dtype=np.uint64)

    def match(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(positions, masks)``: the positions in ``hashes`` whose n-gram an evaluation split holds, and the task
        bitmask of each."""
        if not len(hashes) or not len(self.keys):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
        idx = np.minimum(np.searchsorted(self.keys, hashes), len(self.keys) - 1)
        hit = np.flatnonzero(self.keys[idx] == hashes)
        return hit, self.masks[idx[hit]]


# ---- the training side -------------------------------------------------------------------------------------------
@dataclass
class SourceCounts:
    """What the check found in one source: records checked, contaminated (dropped or flagged), and per task the
    records that overlap it and their overlapping n-grams (distinct within a record, summed over records)."""

    checked: int = 0
    contaminated: int = 0
    tasks: dict[str, dict[str, int]] = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"checked": self.checked, "contaminated": self.contaminated, "tasks": self.tasks,
                "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceCounts":
        return cls(int(d["checked"]), int(d["contaminated"]), {k: dict(v) for k, v in d["tasks"].items()},
                   list(d["examples"]))

    def merge(self, other: "SourceCounts", max_examples: int) -> None:
        self.checked += other.checked
        self.contaminated += other.contaminated
        for task, c in other.tasks.items():
            mine = self.tasks.setdefault(task, {"records": 0, "ngrams": 0})
            mine["records"] += c["records"]
            mine["ngrams"] += c["ngrams"]
        self.examples = (self.examples + other.examples)[:max_examples]


class Decontaminator:
    """Checks training texts against the evaluation n-grams of a :class:`DecontaminateConfig`."""

    def __init__(self, cfg: DecontaminateConfig, index: EvalNgrams):
        self.cfg, self.index = cfg, index

    @classmethod
    def from_config(cls, cfg: DecontaminateConfig, log=print) -> "Decontaminator":
        """Read every evaluated split ``cfg.eval`` names (hub or ``cfg.local_dir``) into the n-gram index."""
        index = EvalNgrams(cfg.n)
        for s in eval_splits(cfg):
            index.add(s.name, s.records(), s.where(), s.subject if s.subject_field else None)
            m = index.meta[s.name]
            configs = f", {len(m['hub_configs'])} configs" if "hub_configs" in m else ""
            subjects = f" in {len(m['subjects'])} subjects" if "subjects" in m else ""
            log(f"decontamination: {s.name} ({s.path} {s.split}{configs}): {m['records']} records{subjects}, "
                f"{m['ngrams']:,} {cfg.n}-grams, {m['shorter_than_n']} records shorter than {cfg.n} words")
        return cls(cfg, index)

    def checked_sources(self, sources: list[SourceConfig]) -> set[str]:
        """The names of the sources to check (``cfg.sources``, or every source with a template)."""
        names = [s.name for s in sources]
        if self.cfg.sources is None:
            return {s.name for s in sources if s.template is not None}
        unknown = [n for n in self.cfg.sources if n not in names]
        if unknown:
            raise DataError(f"data.decontaminate.sources names {unknown}, which the data config does not list "
                            f"(sources: {names})")
        return set(self.cfg.sources)

    def check(self, text: str, counts: SourceCounts, where: str) -> bool:
        """Count one training text into ``counts``; True when it shares an n-gram with an evaluation split."""
        counts.checked += 1
        words = normalized_words(text)
        hashes = ngram_hashes(words, self.cfg.n)
        pos, masks = self.index.match(hashes)
        if not len(pos):
            return False
        counts.contaminated += 1
        hit_tasks = []
        for t, name in enumerate(self.index.tasks):
            mine = (masks & (np.uint64(1) << np.uint64(t))) != 0
            k = int(len(np.unique(hashes[pos[mine]])))
            if k:
                c = counts.tasks.setdefault(name, {"records": 0, "ngrams": 0})
                c["records"] += 1
                c["ngrams"] += k
                hit_tasks.append(name)
        if len(counts.examples) < self.cfg.examples:
            i = int(pos[0])
            counts.examples.append({"where": where, "tasks": hit_tasks, "ngram": " ".join(words[i:i + self.cfg.n])})
        return True


# ---- the report --------------------------------------------------------------------------------------------------
def build_report(cfg: DecontaminateConfig, tasks: dict[str, dict], sources: dict[str, SourceCounts]) -> dict:
    """The JSON report: settings, the evaluation splits (records, n-grams, records shorter than n) and per source
    the records checked, contaminated and written, and the per-task overlap."""
    drop = not cfg.action.keeps_record
    return {"settings": cfg.settings(), "eval_tasks": tasks,
            "sources": {name: {**c.to_dict(), "dropped": c.contaminated if drop else 0,
                               "flagged": 0 if drop else c.contaminated} for name, c in sources.items()}}


def format_table(report: dict) -> str:
    """The report as a table: one row per source x evaluation task with an overlap, and each source's total."""
    done = {"drop": "dropped", "flag": "flagged"}[report["settings"]["action"]]
    head = f"{'source':<16} {'eval task':<18} {'checked':>9} {'overlap':>9} {done:>9} {'n-grams':>9}"
    lines = [head, "-" * len(head)]
    for name, s in report["sources"].items():
        for task, c in sorted(s["tasks"].items()):
            lines.append(f"{name:<16} {task:<18} {s['checked']:>9,} {c['records']:>9,} {'':>9} {c['ngrams']:>9,}")
        lines.append(f"{name:<16} {'(any)':<18} {s['checked']:>9,} {s['contaminated']:>9,} "
                     f"{s['dropped'] + s['flagged']:>9,} {sum(c['ngrams'] for c in s['tasks'].values()):>9,}")
    return "\n".join(lines)


def write_report(out: str | Path, report: dict) -> Path:
    """Write ``decontamination.json`` into ``out`` (via a temporary name)."""
    path = Path(out) / REPORT
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    return path
