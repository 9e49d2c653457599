"""`python -m moxin.prepare data=<data config> out=DIR`: read a pretraining corpus once, filter it, deduplicate it
across all sources and parts, tokenize it with the run's tokenizer and write token shards with a document index
and a manifest (layout: moxin/data/prepared.py). Train on it with ``data.prepared=DIR``.

``prepare.part=i prepare.parts=n`` writes one slice (a SLURM array), ``prepare.merge=true`` joins the parts;
without ``prepare.part`` one process does both. Parts, merge and dedup: docs/modules.md, "prepare.py". A data
config with ``decontaminate`` has its benchmark sources checked against evaluation splits
(moxin/data/decontaminate.py), the report written as ``decontamination.json`` beside the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from moxin.config import DataError, DecontaminateConfig, SourceConfig, plain
from moxin.data.bad_records import RecordStats
from moxin.data.decontaminate import REPORT, Decontaminator, SourceCounts, build_report, format_table, write_report
from moxin.data.dedup import normalize_text, text_hash
from moxin.data.documents import documents_of
from moxin.data.prepared import (FORMAT_VERSION, INDEX_DTYPE, MANIFEST, PreparedData, file_sha256, token_dtype,
                                 tokenizer_fingerprint)
from moxin.data.extract import text_columns
from moxin.data.reader import is_hub_name, open_hub_dataset, open_hub_file, read_positioned, resolve_files
from moxin.data.sample import sample_path
from moxin.paths import conf_dir
from moxin.tokenizer import TokenizerError, load_tokenizer

__all__ = ["PrepareOptions", "run_part", "merge", "prepare", "minhash_signature"]

_WORD = re.compile(r"\S+")

if not OmegaConf.has_resolver("moxin_sample"):  # ${moxin_sample:NAME} of conf/data/sample.yaml (as in moxin.run)
    OmegaConf.register_new_resolver("moxin_sample", lambda name: str(sample_path(name)))


@dataclasses.dataclass
class PrepareOptions:
    """The ``prepare`` block of conf/prepare.yaml (see the comments there)."""

    part: int | None = None
    parts: int = 1
    merge: bool = False
    shard_tokens: int = 1 << 28
    batch_docs: int = 256
    min_chars: int = 0
    near_dedup: bool = False
    threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    verify: bool = False

    def __post_init__(self):
        problems = []
        if self.parts < 1:
            problems.append(f"prepare.parts={self.parts} must be >= 1")
        if self.part is not None and not 0 <= self.part < self.parts:
            problems.append(f"prepare.part={self.part} must be in [0, prepare.parts={self.parts})")
        if self.shard_tokens < 1 or self.batch_docs < 1 or self.num_perm < 2 or self.shingle < 1:
            problems.append("prepare.shard_tokens, batch_docs, shingle must be >= 1 and num_perm >= 2")
        if not 0 < self.threshold <= 1:
            problems.append(f"prepare.threshold={self.threshold} must be in (0, 1]")
        if problems:
            raise DataError("; ".join(problems))

    def settings(self) -> dict:
        """What every part and the merge must agree on."""
        return {"parts": self.parts, "near_dedup": self.near_dedup, "num_perm": self.num_perm,
                "shingle": self.shingle, "min_chars": self.min_chars}


# ---- near duplicates ------------------------------------------------------------------------------------------
def _datasketch():
    """The optional datasketch package (MinHash LSH), or a DataError saying how to install it."""
    try:
        import datasketch
    except ImportError:
        raise DataError('prepare.near_dedup=true needs datasketch: pip install "moxin[prepare]" (or datasketch>=2.0), '
                        "or leave near_dedup off") from None
    return datasketch


class _Signer:
    """MinHash signatures of word n-gram shingles of the normalised text (datasketch, one permutation set)."""

    def __init__(self, num_perm: int, shingle: int):
        MinHash = _datasketch().MinHash
        self._MinHash = MinHash
        self.num_perm, self.shingle = num_perm, shingle
        self._perms = MinHash(num_perm=num_perm, seed=1, scheme="affine32").permutations

    def __call__(self, text: str) -> np.ndarray:
        words = _WORD.findall(normalize_text(text))
        n = self.shingle
        grams = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        m = self._MinHash(num_perm=self.num_perm, seed=1, permutations=self._perms, scheme="affine32")
        m.update_batch([g.encode("utf-8") for g in grams])
        return m.hashvalues.astype(np.uint32)


def minhash_signature(text: str, num_perm: int = 128, shingle: int = 5) -> np.ndarray:
    """The signature prepare stores for ``text`` (uint32, ``num_perm`` values)."""
    return _Signer(num_perm, shingle)(text)


# ---- one part ---------------------------------------------------------------------------------------------------
class _ShardWriter:
    """Token shards of one (source, part): ``<part>-<seq>.bin`` + ``.all.idx`` (+ ``.minhash``), rolled over at
    ``shard_tokens``."""

    def __init__(self, out: Path, source: str, part: int, shard_tokens: int, dtype: np.dtype, near: bool):
        self.out, self.rel, self.part = out, Path(source), part
        self.shard_tokens, self.dtype, self.near = shard_tokens, dtype, near
        (out / source).mkdir(parents=True, exist_ok=True)
        for old in (out / source).glob(f"{part:05d}-*"):  # a re-run part (SLURM retry) starts clean
            old.unlink()
        self.shards: list[dict] = []
        self._fh = None

    def _open(self) -> None:
        stem = self.rel / f"{self.part:05d}-{len(self.shards):04d}"
        self._cur = {"bin": f"{stem}.bin", "all_idx": f"{stem}.all.idx", "docs": 0, "tokens": 0}
        if self.near:
            self._cur["minhash"] = f"{stem}.minhash"
        self._fh = open(self.out / self._cur["bin"], "wb")
        self._rows: list[tuple[int, int, int]] = []
        self._sigs: list[np.ndarray] = []

    def add(self, h: int, ids: list[int], sig: np.ndarray | None) -> None:
        if self._fh is None:
            self._open()
        arr = np.asarray(ids, dtype=self.dtype)
        self._rows.append((self._cur["tokens"], len(arr), h))
        self._fh.write(arr.tobytes())
        self._cur["tokens"] += len(arr)
        self._cur["docs"] += 1
        if sig is not None:
            self._sigs.append(sig)
        if self._cur["tokens"] >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        self._fh.close()
        self._fh = None
        np.array(self._rows, dtype=np.int64).reshape(-1, 3).view(INDEX_DTYPE).tofile(self.out / self._cur["all_idx"])
        if self.near:
            sigs = np.stack(self._sigs) if self._sigs else np.zeros((0, 0))
            sigs.astype("<u4").tofile(self.out / self._cur["minhash"])
        self.shards.append(self._cur)

    def close(self) -> list[dict]:
        if self._fh is not None:
            self._close_shard()
        return self.shards


def _units(source: SourceConfig) -> tuple[list[Any], Any]:
    """The work units of a source: its local files, or the files of a streamed hub dataset (and the dataset)."""
    if is_hub_name(source):
        ds = open_hub_dataset(source, streaming=True)
        return list(range(ds.n_shards)), ds
    return resolve_files(source), None


def _unit_records(source: SourceConfig, unit: Any, ds: Any) -> Iterator[tuple[Any, str, Any]]:
    if ds is not None:
        for k, rec in enumerate(open_hub_file(ds, unit), 1):
            yield k, f"{source.path}[{source.split}] file {unit} record {k}", rec
    else:
        path, fmt = unit
        one = dataclasses.replace(source, path=path, data_files=None, format=fmt)
        yield from read_positioned(one, columns=text_columns(source))


def _part_path(out: Path, part: int, parts: int) -> Path:
    return out / "parts" / f"part-{part:05d}-of-{parts:05d}.json"


def run_part(sources: list[SourceConfig], tok: Any, out: str | os.PathLike, part: int, opts: PrepareOptions,
             log=print, decon: Decontaminator | None = None) -> dict:
    """Prepare part ``part`` of ``opts.parts``: its slice of every source, written to ``out``; returns (and
    writes) its record ``parts/part-<part>-of-<parts>.json``. ``decon``: check the sources it names against the
    evaluation n-grams, dropping (or flagging) the overlapping documents (moxin/data/decontaminate.py)."""
    out = Path(out)
    fp = tokenizer_fingerprint(tok)
    dtype = token_dtype(int(fp["vocab_size"] or 1 << 16))
    signer = _Signer(opts.num_perm, opts.shingle) if opts.near_dedup else None
    encode_batch = getattr(tok, "encode_batch", None)
    seen: set[int] = set()
    t0 = time.perf_counter()
    record: dict = {"part": part, "parts": opts.parts, "format_version": FORMAT_VERSION, "tokenizer": fp,
                    "dtype": dtype.str, "settings": opts.settings(), "sources": {}}
    checked = decon.checked_sources(sources) if decon else set()
    overlap: dict[str, SourceCounts] = {}
    for src in sources:
        units, ds = _units(src)
        mine = units[len(units) * part // opts.parts: len(units) * (part + 1) // opts.parts]
        writer = _ShardWriter(out, src.name, part, opts.shard_tokens, dtype, opts.near_dedup)
        stats, counts = RecordStats(), {"dup_in_part": 0, "short": 0, "tokens": 0, "decontaminated": 0}
        batch: list[tuple[int, str]] = []
        found = overlap.setdefault(src.name, SourceCounts()) if src.name in checked else None
        where = {"loc": ""}

        def located(records):  # remembers the location of the record documents_of is on (report examples)
            for pos, loc, rec in records:
                where["loc"] = loc
                yield pos, loc, rec

        def flush():
            texts = [t for _, t in batch]
            ids = encode_batch(texts) if encode_batch else [tok.encode(t) for t in texts]
            for (h, text), doc in zip(batch, ids):
                counts["tokens"] += len(doc)
                writer.add(h, doc, signer(text) if signer else None)
            batch.clear()

        for unit in mine:
            for _, text in documents_of(src, located(_unit_records(src, unit, ds)), stats):
                if found is not None and decon.check(text, found, where["loc"]) \
                        and not decon.cfg.action.keeps_record:
                    counts["decontaminated"] += 1
                    continue
                if len(text) < opts.min_chars:
                    counts["short"] += 1
                    continue
                h = text_hash(text)
                if h in seen:
                    counts["dup_in_part"] += 1
                    continue
                seen.add(h)
                batch.append((h, text))
                if len(batch) >= opts.batch_docs:
                    flush()
        if batch:
            flush()
        stats.check(f"data source {src.name!r}", src.max_bad_records, src.max_bad_fraction,
                    "Fix or remove those records, or raise the limits in the source config.", final=True)
        record["sources"][src.name] = {
            "units": [u if ds is not None else u[0] for u in mine], "stats": stats.to_dict(), **counts,
            "shards": writer.close()}
        log(f"part {part}/{opts.parts} {src.name}: {len(mine)} file(s), {stats.records} records, "
            f"{stats.kept - counts['dup_in_part'] - counts['short'] - counts['decontaminated']} documents, "
            f"{counts['tokens']:,} tokens" + (f", {found.contaminated} overlap an evaluation split" if found else ""))
    if decon is not None:
        record["decontamination"] = {"settings": decon.cfg.settings(), "eval_tasks": decon.index.meta,
                                     "sources": {n: c.to_dict() for n, c in overlap.items()}}
    record["seconds"] = time.perf_counter() - t0
    path = _part_path(out, part, opts.parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return record


# ---- merge ------------------------------------------------------------------------------------------------------
def _load_parts(out: Path, sources: list[SourceConfig], opts: PrepareOptions, fp: dict) -> list[dict]:
    missing = [i for i in range(opts.parts) if not _part_path(out, i, opts.parts).is_file()]
    if missing:
        raise DataError(f"prepare merge: {len(missing)} of {opts.parts} parts are not done (missing "
                        f"{[str(_part_path(out, i, opts.parts)) for i in missing[:5]]}); run them first with "
                        f"prepare.part=i prepare.parts={opts.parts} (i in {missing[:10]})")
    parts = [json.loads(_part_path(out, i, opts.parts).read_text()) for i in range(opts.parts)]
    names = [s.name for s in sources]
    for p in parts:
        where = _part_path(out, p["part"], opts.parts)
        if p["tokenizer"]["sha256"] != fp["sha256"]:
            raise DataError(f"{where} was tokenized with {p['tokenizer']['name']!r}, the merge runs with "
                            f"{fp['name']!r}; give the merge the parts' tokenizer= or prepare the part again")
        if p["settings"] != opts.settings():
            raise DataError(f"{where} was prepared with {p['settings']}, the merge has {opts.settings()}; use the "
                            "same prepare.* settings, or prepare the part again")
        if list(p["sources"]) != names:
            raise DataError(f"{where} holds sources {list(p['sources'])}, the data config {names}; merge with the "
                            "data config the parts were prepared with")
    return parts


def merge(sources: list[SourceConfig], tok: Any, out: str | os.PathLike, opts: PrepareOptions, log=print,
          decon: DecontaminateConfig | None = None) -> dict:
    """Merge the parts in ``out`` (module docstring) and write ``manifest.json`` (and, with ``decon``, the
    decontamination report); returns the manifest."""
    out = Path(out)
    fp = tokenizer_fingerprint(tok)
    parts = _load_parts(out, sources, opts, fp)
    want = decon.settings() if decon else None
    for p in parts:
        have = (p.get("decontamination") or {}).get("settings")
        if have != want:
            raise DataError(f"{_part_path(out, p['part'], opts.parts)} was prepared with data.decontaminate "
                            f"{have}, the merge has {want}; merge with the data config the parts were prepared "
                            "with, or prepare the part again")
    t0 = time.perf_counter()
    # every written document in canonical order: sources in config order, then parts, then shards
    entries = [(s.name, p["sources"][s.name], sh)
               for s in sources for p in parts for sh in p["sources"][s.name]["shards"]]
    rows = [np.fromfile(out / sh["all_idx"], dtype=INDEX_DTYPE) for _, _, sh in entries]
    hashes = np.concatenate([r["hash"] for r in rows]) if rows else np.zeros(0, np.int64)
    keep = np.zeros(len(hashes), dtype=bool)
    keep[np.unique(hashes, return_index=True)[1]] = True
    bounds = np.cumsum([0] + [len(r) for r in rows])
    near = np.zeros(len(hashes), dtype=bool)
    if opts.near_dedup:
        near = _near_duplicates(out, entries, bounds, keep, opts)
        keep &= ~near
    manifest = {"format_version": FORMAT_VERSION, "tokenizer": fp, "dtype": parts[0]["dtype"],
                "settings": {**opts.settings(), "threshold": opts.threshold}, "sources": {}}
    for s in sources:
        manifest["sources"][s.name] = {"config": dataclasses.asdict(s), "documents": 0, "tokens": 0,
                                       "dead_tokens": 0, "dup_exact": 0, "dup_near": 0, "short": 0,
                                       "decontaminated": 0, "stats": RecordStats(), "shards": []}
    for k, ((name, part_src, sh), r) in enumerate(zip(entries, rows)):
        m = manifest["sources"][name]
        sl = slice(bounds[k], bounds[k + 1])
        kept = r[keep[sl]]
        idx = sh["all_idx"][: -len(".all.idx")] + ".idx"
        kept.tofile(out / idx)
        n_tok = int(kept["len"].sum())
        m["documents"] += len(kept)
        m["tokens"] += n_tok
        m["dead_tokens"] += sh["tokens"] - n_tok
        m["dup_near"] += int(near[sl].sum())
        m["dup_exact"] += len(r) - len(kept) - int(near[sl].sum())
        m["shards"].append({"bin": sh["bin"], "idx": idx, "docs": len(kept), "tokens": n_tok,
                            "bin_bytes": (out / sh["bin"]).stat().st_size, "idx_bytes": (out / idx).stat().st_size,
                            "bin_sha256": file_sha256(out / sh["bin"]), "idx_sha256": file_sha256(out / idx)})
    for s in sources:  # counts that the parts made
        m = manifest["sources"][s.name]
        for p in parts:
            ps = p["sources"][s.name]
            m["stats"].merge(RecordStats.from_dict(ps["stats"]))
            m["dup_exact"] += ps["dup_in_part"]
            m["short"] += ps["short"]
            m["decontaminated"] += ps.get("decontaminated", 0)
        m["stats"] = m["stats"].to_dict()
    if decon is not None:
        report = _merge_decontamination(decon, parts)
        write_report(out, report)
        manifest["decontamination"] = {"settings": want, "report": REPORT, "sources": {
            n: {k: c[k] for k in ("checked", "contaminated", "dropped", "flagged")}
            for n, c in report["sources"].items()}}
        log(format_table(report))
    manifest["totals"] = {k: sum(m[k] for m in manifest["sources"].values())
                          for k in ("documents", "tokens", "dead_tokens", "dup_exact", "dup_near")}
    manifest["prepare_seconds"] = {"parts": [p["seconds"] for p in parts], "merge": time.perf_counter() - t0}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    for name, m in manifest["sources"].items():
        log(f"{name}: {m['documents']:,} documents, {m['tokens']:,} tokens, {m['stats']['bad']} bad, "
            f"{m['dup_exact']} exact and {m['dup_near']} near duplicates dropped")
    return manifest


def _merge_decontamination(cfg: DecontaminateConfig, parts: list[dict]) -> dict:
    """The decontamination report of all parts: their counts summed per source."""
    total: dict[str, SourceCounts] = {}
    for p in parts:
        for name, c in p["decontamination"]["sources"].items():
            total.setdefault(name, SourceCounts()).merge(SourceCounts.from_dict(c), cfg.examples)
    return build_report(cfg, parts[0]["decontamination"]["eval_tasks"], total)


def _near_duplicates(out: Path, entries: list, bounds: np.ndarray, keep: np.ndarray,
                     opts: PrepareOptions) -> np.ndarray:
    """Documents (among ``keep``) whose MinHash signature estimates a Jaccard similarity >= threshold with an
    earlier kept document: LSH candidates from datasketch, each confirmed on the signatures."""
    ds = _datasketch()
    LeanMinHash, MinHashLSH = ds.LeanMinHash, ds.MinHashLSH
    lsh = MinHashLSH(threshold=opts.threshold, num_perm=opts.num_perm)
    near = np.zeros(len(keep), dtype=bool)
    kept_sigs: dict[int, np.ndarray] = {}
    for k, (_, _, sh) in enumerate(entries):
        sigs = np.fromfile(out / sh["minhash"], dtype="<u4").reshape(-1, opts.num_perm)
        for j, sig in enumerate(sigs):
            g = int(bounds[k]) + j
            if not keep[g]:
                continue
            m = LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")
            if any(np.mean(kept_sigs[c] == sig) >= opts.threshold for c in lsh.query(m)):
                near[g] = True
                continue
            lsh.insert(g, m, check_duplication=False)
            kept_sigs[g] = sig
    return near


# ---- entry point ------------------------------------------------------------------------------------------------
def prepare(cfg: DictConfig, log=print) -> dict | None:
    """Run what ``cfg.prepare`` asks: one part, the merge, or everything (module docstring)."""
    if not cfg.get("out"):
        raise DataError("prepare: give the output folder, out=DIR")
    opts = PrepareOptions(**plain(cfg.prepare))
    raw = plain(cfg.data.sources) or []
    sources = [SourceConfig.from_any(s) for s in raw]
    if not sources:
        raise DataError("prepare: the data config lists no sources")
    out = Path(cfg.out)
    if opts.verify:
        n = PreparedData(out).verify_checksums()
        log(f"{out}: the sha256 of all {n} shard and index files match {MANIFEST}")
        return None
    decon = DecontaminateConfig.from_any(plain(cfg.data.get("decontaminate")))
    tok = load_tokenizer(cfg.tokenizer)
    if (out / MANIFEST).exists() and not opts.merge:
        raise DataError(f"prepare: {out / MANIFEST} exists, the corpus there is prepared; choose another out=, or "
                        "delete the folder to prepare it again")
    if opts.merge:
        return merge(sources, tok, out, opts, log, decon)
    checker = Decontaminator.from_config(decon, log) if decon else None
    if opts.part is not None:
        run_part(sources, tok, out, opts.part, opts, log, checker)
        return None
    for i in range(opts.parts):
        run_part(sources, tok, out, i, opts, log, checker)
    return merge(sources, tok, out, opts, log, decon)


@hydra.main(version_base=None, config_path=str(conf_dir()), config_name="prepare")
def main(cfg: DictConfig) -> None:
    try:
        prepare(cfg)
    except (DataError, TokenizerError) as e:  # bad input: one line naming it and the fix, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
