"""Pretraining data: prepared token shards (moxin.prepare + data.prepared) against the raw path (every reader
reads every line of every file, tokenizes in the loader), on one synthetic corpus.

The corpus (``--corpus``, made once, reused): three jsonl sources of Zipf-distributed pseudo-words (``web``,
``books``, ``code``; ``--gb`` of text in 64 MiB files), with planted cross-source exact copies (case and spacing
changed) and near copies (a fraction of the words replaced; the true Jaccard similarity of their word 5-shingles
is recorded in ``truth.json``). Measured:

* prepare throughput: tokens per CPU-second of each part (one core each, ``RAYON_NUM_THREADS=1``), bytes per token
  of the output;
* bytes read per reader with ``--readers`` readers over a whole pass (``/proc/self/io`` rchar: every ``read`` and
  ``pread``), as a fraction of the corpus;
* loader tokens/s per worker (tokens of packed micro-batches per CPU-second of the one process, seq 4096);
* time to the first batch when resuming at 90 % of a reader's data against 0 %;
* dedup: exact copies found against planted ones; near-duplicate recall (planted pairs at or above the
  threshold) and precision.

Everything is measured first on a slice (``--slice-files`` files a source: 192 MiB by default), for both paths,
prepared with the run's tokenizer (``--tokenizer``) and near dedup, then on the whole corpus for the prepared path.
The whole corpus is prepared with ``--full-tokenizer`` (default ``bytes``: one id per UTF-8 byte, so that 2 GB
prepare in minutes on a shared 2-core machine; the Mistral tokenizer's prepare throughput is the slice's, and the
reading side does not care where the ids came from). The raw path would need hours at 2 GB there; its bytes-read
share does not depend on size, and its resume time grows linearly with the position (extrapolated by the size
ratio).

    python scripts/bench/data.py --corpus /tmp/moxin-data-corpus --gb 2 --out bench_out/data.json
    python scripts/bench/data.py --smoke --out /tmp/data.json        # a 3 MB corpus, for tests
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizer on one core: throughput per core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from _common import default_out, table, write_json  # noqa: E402

from moxin.config import SourceConfig  # noqa: E402
from moxin.data.dedup import normalize_text, text_hash  # noqa: E402
from moxin.data.documents import iter_records  # noqa: E402
from moxin.data.packed_dataset import PackedDataset  # noqa: E402
from moxin.data.phases import Phase  # noqa: E402
from moxin.data.prepared import INDEX_DTYPE, PreparedData, reader_range  # noqa: E402
from moxin.prepare import PrepareOptions, merge, run_part  # noqa: E402
from moxin.tokenizer import load_tokenizer  # noqa: E402

SOURCES = ("web", "books", "code")
FILE_BYTES = 64 << 20
SEQ = 4096


# ---- the synthetic corpus ------------------------------------------------------------------------------------
def _vocab(rng: np.random.Generator, n: int) -> np.ndarray:
    syl = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["th", "st", "qu", "ing", "er", "an"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syl, size=int(rng.integers(1, 5)))))
    return np.array(sorted(words))


def shingles(text: str, n: int = 5) -> set[str]:
    w = normalize_text(text).split()
    return {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}


def make_corpus(root: Path, total_bytes: int, file_bytes: int = FILE_BYTES, seed: int = 0) -> dict:
    """Write the corpus and truth.json (planted copies: their hashes, originals and true Jaccard)."""
    rng, prng = np.random.default_rng(seed), random.Random(seed)
    vocab = _vocab(rng, 30000)
    cum = np.cumsum(1.0 / (np.arange(len(vocab)) + 2.7) ** 1.1)
    cum /= cum[-1]
    perms = {s: vocab[rng.permutation(len(vocab))] for s in SOURCES}
    recent: list[str] = []
    truth = {"exact": [], "near": []}
    per_source = total_bytes // len(SOURCES)
    n_files = max(1, -(-per_source // file_bytes))
    root.mkdir(parents=True, exist_ok=True)
    for f in range(n_files):
        for s in SOURCES:
            words: list[str] = []
            size, lines, at = 0, [], 0
            while size < min(file_bytes, per_source - f * file_bytes):
                r = prng.random()
                if r < 0.005 and recent:  # an exact copy of a recent document (any source), case and spacing changed
                    orig = prng.choice(recent)
                    text = orig.upper().replace(" ", "  ", 3)
                    truth["exact"].append({"hash": text_hash(text), "orig": text_hash(orig)})
                elif r < 0.010 and recent:  # a near copy: 0.3 % to 3 % of the words replaced
                    orig = prng.choice(recent)
                    w = orig.split(" ")
                    for i in prng.sample(range(len(w)), max(1, int(len(w) * prng.uniform(0.003, 0.03)))):
                        w[i] = str(vocab[prng.randrange(len(vocab))])
                    text = " ".join(w)
                    a, b = shingles(orig), shingles(text)
                    truth["near"].append({"hash": text_hash(text), "orig": text_hash(orig),
                                          "jaccard": len(a & b) / len(a | b)})
                else:
                    n = int(np.clip(rng.lognormal(5.5, 0.8), 20, 5000))
                    if at + n > len(words):  # Zipf-distributed words, drawn in bulk
                        words = words[at:] + perms[s][np.searchsorted(cum, rng.random(1 << 20))].tolist()
                        at = 0
                    doc, at = words[at:at + n], at + n
                    text = (" ".join(doc) if s != "code" else
                            "\n".join("    " * (i % 3) + "_".join(doc[i:i + 6]) for i in range(0, n, 6)))
                    recent.append(text)
                    if len(recent) > 2000:
                        recent[prng.randrange(len(recent))] = recent[-1]
                        recent.pop()
                line = json.dumps({"text": text}) + "\n"
                lines.append(line)
                size += len(line)
            (root / s).mkdir(exist_ok=True)
            (root / s / f"{f:04d}.jsonl").write_text("".join(lines))
    (root / "truth.json").write_text(json.dumps(truth))
    return truth


def corpus_sources(root: Path, max_files: int | None = None) -> list[SourceConfig]:
    """The corpus's sources, or a slice of them (a folder of links to the first ``max_files`` files of each)."""
    out = []
    for s in SOURCES:
        if max_files is None:
            out.append(SourceConfig(s, str(root / s)))
            continue
        d = root / f"slice-{max_files}" / s
        d.mkdir(parents=True, exist_ok=True)
        for f in sorted((root / s).glob("*.jsonl"))[:max_files]:
            if not (d / f.name).exists():
                (d / f.name).symlink_to(f)
        out.append(SourceConfig(s, str(d)))
    return out


def corpus_bytes(sources: list[SourceConfig]) -> int:
    from moxin.data.reader import resolve_files

    return sum(os.path.getsize(p) for s in sources for p, _ in resolve_files(s))


# ---- measuring helpers -------------------------------------------------------------------------------------------
def rchar() -> int:
    """Bytes this process has read with read/pread so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ByteTokenizer:
    """Each UTF-8 byte one id (byte + 3; bos 1, eos 2): the whole-corpus run's stand-in for the run's tokenizer, so
    that 2 GB prepare in minutes on a shared 2-core machine (the Mistral tokenizer's throughput is the slice's)."""

    name, bos_id, eos_id, vocab_size = "bytes", 1, 2, 259

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + (np.frombuffer(text.encode(), np.uint8).astype(np.uint16) + 3).tolist() + [2] * eos

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode(), np.uint8).astype(np.uint16) + 3 for t in texts]


def get_tokenizer(spec: str):
    return ByteTokenizer() if spec == "bytes" else load_tokenizer(spec)


def _part_job(args) -> dict:
    sources, tok_spec, out, part, opts = args
    tok = get_tokenizer(tok_spec)
    c0, t0 = cpu(), time.perf_counter()
    rec = run_part(sources, tok, out, part, opts, log=lambda *_: None)
    tokens = sum(v["tokens"] for v in rec["sources"].values())
    return {"part": part, "tokens": tokens, "cpu_s": cpu() - c0, "wall_s": time.perf_counter() - t0}


def prepare_corpus(sources, tok_spec, out: Path, parts: int, near: bool, threshold: float) -> dict:
    """Run the parts in parallel processes (one core each), then the merge here; cached in out/bench_prepare.json."""
    cached = out / "bench_prepare.json"
    if cached.is_file() and (out / "manifest.json").is_file():
        return json.loads(cached.read_text())
    shutil.rmtree(out, ignore_errors=True)
    opts = PrepareOptions(parts=parts, near_dedup=near, threshold=threshold)
    with ProcessPoolExecutor(parts) as pool:
        jobs = list(pool.map(_part_job, [(sources, tok_spec, out, i, opts) for i in range(parts)]))
    tok = get_tokenizer(tok_spec)
    c0, t0 = cpu(), time.perf_counter()
    man = merge(sources, tok, out, opts, log=lambda *_: None)
    res = {"tokenizer": tok_spec, "near": near, "parts": jobs, "merge_cpu_s": cpu() - c0,
           "merge_wall_s": time.perf_counter() - t0,
           "tokens_written": sum(j["tokens"] for j in jobs), "totals": man["totals"],
           "out_bytes": sum(sh["bin_bytes"] + sh["idx_bytes"] for s in man["sources"].values() for sh in s["shards"])}
    cached.write_text(json.dumps(res))
    return res


def bytes_per_reader(sources, prepared: Path | None, readers: int) -> list[int]:
    """rchar of each of ``readers`` readers over one whole pass of its share of every source."""
    out = []
    for s in range(readers):
        r0 = rchar()
        if prepared is not None:
            data = PreparedData(prepared)
            for name in data.source_names:
                for _ in data.iter_docs(name, s, readers):
                    pass
            data.close()
        else:
            for src in sources:
                for _ in iter_records(src, s, readers):
                    pass
        out.append(rchar() - r0)
    return out


def _dataset(sources, tok, prepared, rank, world, batches, positions=None):
    ds = PackedDataset(sources, Phase("bench", SEQ, 1 << 40, {s.name: 1 for s in sources}), tok, micro_rows=4,
                       num_batches=batches, rank=rank, world_size=world, seed=0, dedup=prepared is None,
                       val_percent=0, prepared=None if prepared is None else PreparedData(prepared))
    if positions:
        st = ds._fresh_state(0, 1)
        for n, p in positions.items():
            st["sources"][n]["pos"] = p
        ds.initial_states = {0: st}
    return ds


def loader_rate(sources, tok, prepared, readers: int, batches: int) -> dict:
    """Tokens of packed micro-batches per CPU-second (and per wall second) of one loader worker (rank 0 of
    ``readers``), tokenization included on the raw path."""
    ds = _dataset(sources, tok, prepared, 0, readers, batches)
    c0, t0, n = cpu(), time.perf_counter(), 0
    for b in ds:
        n += b["input_ids"].numel()
    return {"tokens": n, "tok_per_cpu_s": n / (cpu() - c0), "tok_per_wall_s": n / (time.perf_counter() - t0)}


def first_batch(sources, tok, prepared, readers: int, frac: float, reps: int) -> dict:
    """Seconds from building reader 0's loader to its first batch, its positions at ``frac`` of its data (median
    of ``reps``, wall and CPU time)."""
    if prepared is not None:
        data = PreparedData(prepared)
        pos = {n: int(frac * (lambda r: r[1] - r[0])(reader_range(data.num_docs(n), 0, readers)))
               for n in data.source_names}
    else:
        from moxin.data.reader import resolve_files

        pos = {s.name: int(frac * sum(sum(1 for _ in open(p, "rb")) for p, _ in resolve_files(s)) / readers)
               for s in sources}
    wall, cpu_s = [], []
    for _ in range(reps):
        c0, t0 = cpu(), time.perf_counter()
        next(iter(_dataset(sources, tok, prepared, 0, readers, 1, pos)))
        wall.append(time.perf_counter() - t0)
        cpu_s.append(cpu() - c0)
    return {"wall_s": float(np.median(wall)), "cpu_s": float(np.median(cpu_s)), "reps": reps}


def exact_copies(sources) -> int:
    """Documents whose normalised text appeared before (the exact copies a full dedup must drop), counted by
    hashing every text of the sources."""
    counts: dict[int, int] = {}
    for src in sources:
        for _, text in iter_records(src):
            h = text_hash(text)
            counts[h] = counts.get(h, 0) + 1
    return sum(c - 1 for c in counts.values())


def near_quality(out: Path, truth: dict, threshold: float) -> dict:
    """Planted near copies found (recall over pairs at or above the threshold) and what was dropped that was not
    one (precision), from the prepared folder's written and kept document hashes."""
    written, kept = set(), set()
    for f in out.rglob("*.all.idx"):
        written.update(np.fromfile(f, dtype=INDEX_DTYPE)["hash"].tolist())
        kept.update(np.fromfile(str(f)[: -len(".all.idx")] + ".idx", dtype=INDEX_DTYPE)["hash"].tolist())
    dropped = written - kept
    pairs = [p for p in truth["near"] if p["hash"] in written and p["orig"] in written]
    planted = {p["hash"] for p in pairs} | {p["orig"] for p in pairs}
    above = [p for p in pairs if p["jaccard"] >= threshold]
    found = [p for p in above if p["hash"] in dropped or p["orig"] in dropped]
    below_found = [p for p in pairs if p["jaccard"] < threshold and (p["hash"] in dropped or p["orig"] in dropped)]
    bands = {}
    for lo, hi in ((0.0, 0.7), (0.7, 0.8), (0.8, 0.85), (0.85, 0.9), (0.9, 0.95), (0.95, 1.01)):
        b = [p for p in pairs if lo <= p["jaccard"] < hi]
        hit = sum(1 for p in b if p["hash"] in dropped or p["orig"] in dropped)
        bands[f"{lo:.2f}-{min(hi, 1.0):.2f}"] = [len(b), hit]
    tp = len(dropped & planted)
    return {"planted_pairs": len(pairs), "pairs_at_or_above_threshold": len(above), "found": len(found),
            "recall": len(found) / max(1, len(above)), "dropped": len(dropped),
            "precision": tp / len(dropped) if dropped else None, "pairs_found_by_jaccard": bands,
            "found_below_threshold": len(below_found)}


# ---- main ------------------------------------------------------------------------------------------------------
def measure(name: str, sources, prep_dir: Path, prep: dict, tok, raw_sources, a, results: dict) -> list[dict]:
    """The rows of one corpus size: ours on ``prep_dir`` (prepared from ``sources``), the raw path on
    ``raw_sources`` when given."""
    rows, res = [], results.setdefault(name, {"prepare": prep})
    nbytes, tokens = corpus_bytes(sources), prep["totals"]["tokens"]
    by_prep = bytes_per_reader(sources, prep_dir, a.readers)
    res["bytes_per_reader"] = {"ours": by_prep}
    row = {"what": f"bytes read per reader, {a.readers} readers (max share)", "ours": max(by_prep) / prep["out_bytes"],
           "goal": f"~{1 / a.readers:.3f}"}
    if raw_sources:
        by_raw = bytes_per_reader(raw_sources, None, a.readers)
        res["bytes_per_reader"]["raw"] = by_raw
        row["raw"] = max(by_raw) / corpus_bytes(raw_sources)
    rows.append(row)
    rate = {"ours": loader_rate(sources, tok, prep_dir, a.readers, a.batches)}
    if raw_sources:
        rate["raw"] = loader_rate(raw_sources, tok, None, a.readers, max(2, a.batches // 8))
    res["loader"] = rate
    rows.append({"what": "loader tokens/s per worker (CPU time)", "goal": ">= 60000",
                 **{k: v["tok_per_cpu_s"] for k, v in rate.items()}})
    fb = {}
    for frac in (0.0, 0.9):
        fb[f"ours@{frac}"] = first_batch(sources, tok, prep_dir, a.readers, frac, 9)
        if raw_sources:
            fb[f"raw@{frac}"] = first_batch(raw_sources, tok, None, a.readers, frac, 3)
    res["first_batch"] = fb
    for frac in (0.0, 0.9):
        rows.append({"what": f"first batch resuming at {frac:.0%} (s CPU, median)", "ours": fb[f"ours@{frac}"]["cpu_s"],
                     "raw": fb.get(f"raw@{frac}", {}).get("cpu_s"), "goal": ""})
    for t in ("cpu_s", "wall_s"):
        rows.append({"what": f"first batch 90% / 0% ({t[:-2]})", "ours": fb["ours@0.9"][t] / fb["ours@0.0"][t],
                     "raw": fb["raw@0.9"][t] / fb["raw@0.0"][t] if raw_sources else None, "goal": "<= 2"})
    busy = [j for j in prep["parts"] if j["tokens"]]  # a part without files of its own has nothing to time
    per_core = sum(j["tokens"] for j in busy) / sum(j["cpu_s"] for j in busy)
    rows.append({"what": f"prepare tokens/s per core (CPU time, {prep.get('tokenizer', '?')}"
                         + (", MinHash too)" if prep.get("near") else ")"),
                 "ours": per_core, "goal": ""})
    rows.append({"what": "prepared bytes per token (.bin + .idx)", "ours": prep["out_bytes"] / tokens, "goal": ""})
    print(table(rows, [("what", "measure", ""), ("ours", "prepared", ".4g"), ("raw", "raw path", ".4g"),
                       ("goal", "goal", "")], f"data, {name}: {nbytes / 1e9:.3f} GB of jsonl, {tokens:,} tokens kept"),
          flush=True)
    res["rows"], res["corpus_bytes"], res["tokens"] = rows, nbytes, tokens
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="/tmp/moxin-data-corpus")
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--slice-files", type=int, default=1, help="files a source in the slice (raw path, near dedup)")
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--batches", type=int, default=64, help="micro-batches (4 x 4096 tokens) for the loader rate")
    ap.add_argument("--tokenizer", default="mistral", help="the slice's (and the smoke's) tokenizer")
    ap.add_argument("--full-tokenizer", default="bytes", help="the whole corpus's: bytes (ByteTokenizer) or a spec")
    ap.add_argument("--stage", choices=("slice", "full", "rate", "all"), default="all",
                    help="run only the slice, the whole-corpus part, or the rate (prepare of one file with --tokenizer,"
                         " no near dedup); results accumulate in --out")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=default_out("data"))
    a = ap.parse_args()
    file_bytes = FILE_BYTES
    if a.smoke:
        a.corpus, a.gb, a.batches, file_bytes = a.corpus + "-smoke", 0.003, 4, 256 << 10
    root = Path(a.corpus)
    if not (root / "truth.json").is_file():
        t0 = time.perf_counter()
        make_corpus(root, int(a.gb * (1 << 30)), file_bytes)
        print(f"made {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    truth = json.loads((root / "truth.json").read_text())
    tok = load_tokenizer(a.tokenizer)
    results: dict = json.loads(Path(a.out).read_text()) if a.stage != "all" and Path(a.out).is_file() else {}
    results["args"] = vars(a)
    sl = corpus_sources(root, a.slice_files)
    if a.stage in ("slice", "all"):
        measure_slice(root, sl, truth, tok, a, results)
    if a.stage in ("full", "all"):
        measure_full(root, sl, truth, tok, a, results)
    if a.stage in ("rate", "all"):
        measure_rate(root, a, results)


def measure_rate(root: Path, a, results: dict) -> None:
    """Prepare throughput of the run's tokenizer without near dedup: one part over one file, one core."""
    src = [SourceConfig(SOURCES[0], str(sorted((root / SOURCES[0]).glob("*.jsonl"))[0]))]
    out = root.parent / f"{root.name}-prepared-rate"
    shutil.rmtree(out, ignore_errors=True)
    job = _part_job((src, a.tokenizer, out, 0, PrepareOptions()))
    results["rate"] = {**job, "file": src[0].path, "tokenizer": a.tokenizer,
                       "tok_per_cpu_s": job["tokens"] / job["cpu_s"]}
    print(f"prepare, {a.tokenizer}, no near dedup: {job['tokens']:,} tokens in {job['cpu_s']:.1f} CPU s = "
          f"{job['tokens'] / job['cpu_s']:,.0f} tokens per CPU-second", flush=True)
    write_json(a.out, results)


def measure_slice(root: Path, sl, truth: dict, tok, a, results: dict) -> None:
    """Both paths on the slice, prepared with near dedup; the dedup counts."""
    near_dir = root.parent / f"{root.name}-prepared-slice{a.slice_files}-near"
    near_prep = prepare_corpus(sl, a.tokenizer, near_dir, a.parts, True, a.threshold)
    measure("slice", sl, near_dir, near_prep, tok, sl, a, results)
    nq = near_quality(near_dir, truth, a.threshold)
    exact_planted = exact_copies(sl)
    results["near"] = {**nq, "exact_planted": exact_planted, "exact_dropped": near_prep["totals"]["dup_exact"]}
    print(table([{"what": "exact copies planted / dropped",
                  "v": f"{exact_planted} / {near_prep['totals']['dup_exact']}"},
                 {"what": f"near pairs planted (J >= {a.threshold}) / found",
                  "v": f"{nq['pairs_at_or_above_threshold']} / {nq['found']}"},
                 {"what": "near recall", "v": f"{nq['recall']:.4f}"},
                 {"what": "near precision (dropped that were planted)",
                  "v": "-" if nq["precision"] is None else f"{nq['precision']:.4f}"},
                 {"what": "merge seconds (CPU) with LSH", "v": f"{near_prep['merge_cpu_s']:.1f}"}],
                [("what", "dedup on the slice", ""), ("v", "", "")], "dedup (near_dedup=true, parts split the files)"),
          flush=True)
    write_json(a.out, results)


def measure_full(root: Path, sl, truth: dict, tok, a, results: dict) -> None:
    """The prepared path on the whole corpus (the raw path's figures on the slice do not depend on size)."""
    full = corpus_sources(root)
    full_dir = root.parent / f"{root.name}-prepared-{a.full_tokenizer.replace('/', '_')}"
    full_prep = prepare_corpus(full, a.full_tokenizer, full_dir, a.parts, False, a.threshold)
    measure("full", full, full_dir, full_prep, get_tokenizer(a.full_tokenizer), None, a, results)
    if Path(a.out).is_file():  # the slice's results, when a --stage slice run wrote them meanwhile
        results = {**json.loads(Path(a.out).read_text()), **results}
    # every original is in the whole corpus; a near copy that came out equal to another is an exact copy too
    repeated_near = len(truth["near"]) - len({p["hash"] for p in truth["near"]})
    results["full"]["exact_planted"] = len(truth["exact"]) + repeated_near
    results["full"]["exact_dropped"] = full_prep["totals"]["dup_exact"]
    print(f"whole corpus: exact copies planted {len(truth['exact'])} (+ {repeated_near} near copies equal to another),"
          f" dropped {full_prep['totals']['dup_exact']}", flush=True)
    if "slice" in results:
        raw90 = results["slice"]["first_batch"]["raw@0.9"]["wall_s"]
        scale = corpus_bytes(full) / corpus_bytes(sl)
        results["full"]["raw_first_batch_90_extrapolated_s"] = raw90 * scale
        print(f"raw path's first batch at 90 %, the slice's x {scale:.1f} (size ratio): {raw90 * scale:.1f} s",
              flush=True)
    write_json(a.out, results)


if __name__ == "__main__":
    main()
