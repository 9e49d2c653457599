"""Decontamination (moxin/data/decontaminate.py) against the reference way to do it: lm-evaluation-harness's
``Janitor`` in Python mode keeps the evaluation n-grams as a set of strings; moxin keeps 64-bit hashes in a sorted
numpy array. Same normalisation and n, one synthetic corpus:

* an evaluation side of ``--eval`` records (a question of ~40 words and four answers of ~8 words: MMLU-sized),
* a training side of ``--train`` records of ~``--words`` words, ``--planted`` of which carry a 13-word span of an
  evaluation question (case and punctuation changed), and as many near misses that carry 12 words.

Measured: the index's build time, its retained memory (tracemalloc, in a second build: tracing slows allocation),
training records checked per second, and agreement (both find exactly the planted records). Pseudo-words are
Zipf-distributed over a 50K vocabulary.

    python scripts/bench/decontaminate.py --out bench_out/decontaminate.json
"""

from __future__ import annotations

import argparse
import random
import string
import time
import tracemalloc

from _common import default_out, table, write_json

from moxin.config import DecontaminateConfig
from moxin.data.decontaminate import Decontaminator, EvalNgrams, SourceCounts, normalized_words


def corpus(args) -> tuple[list[dict], list[str], set[int]]:
    rnd = random.Random(0)
    vocab = ["".join(rnd.choice(string.ascii_lowercase) for _ in range(rnd.randint(2, 9))) for _ in range(50_000)]
    weights = [1 / (r + 1) for r in range(len(vocab))]

    def words(k):
        return rnd.choices(vocab, weights, k=k)

    evals = [{"question": " ".join(words(40)) + "?", "choices": [" ".join(words(8)) for _ in range(4)], "answer": 1}
             for _ in range(args.eval)]
    train = [" ".join(words(args.words)) for _ in range(args.train)]
    planted = set(rnd.sample(range(args.train), 2 * args.planted))
    dirty = set(sorted(planted)[:args.planted])
    for i in planted:
        q = evals[rnd.randrange(args.eval)]["question"].split()
        span = q[5:18] if i in dirty else q[5:17]
        w = train[i].split()
        at = rnd.randrange(len(w))
        # "n0t" / "0ut" are no vocabulary words: only the span itself can overlap an evaluation question
        train[i] = " ".join(w[:at] + ["n0t", span[0].upper() + ","] + span[1:] + ["0ut"] + w[at:])
    return evals, train, dirty


def strings_of(rec: dict) -> list[str]:
    return [rec["question"]] + rec["choices"]


def built(make):
    """``(index, build seconds, retained bytes)``: timed untraced, then built again under tracemalloc."""
    t0 = time.perf_counter()
    make()
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    index = make()
    mem = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return index, seconds, mem


def reference(evals, train, n):
    """lm-eval Janitor (Python mode): the n-gram strings of every evaluation text in a set."""
    def make():
        grams = set()
        for rec in evals:
            for s in strings_of(rec):
                w = normalized_words(s)
                grams.update(" ".join(w[i:i + n]) for i in range(len(w) - n + 1))
        return grams

    grams, build, mem = built(make)
    t0 = time.perf_counter()
    found = set()
    for k, text in enumerate(train):
        w = normalized_words(text)
        if any(" ".join(w[i:i + n]) in grams for i in range(len(w) - n + 1)):
            found.add(k)
    return {"build_s": build, "index_bytes": mem, "ngrams": len(grams), "check_s": time.perf_counter() - t0}, found


def moxin(evals, train, n):
    def make():
        index = EvalNgrams(n)
        index.add("eval", evals)
        return index

    index, build, mem = built(make)
    checker = Decontaminator(DecontaminateConfig(n=n), index)
    counts = SourceCounts()
    t0 = time.perf_counter()
    found = {k for k, text in enumerate(train) if checker.check(text, counts, str(k))}
    return {"build_s": build, "index_bytes": mem, "ngrams": len(index.keys), "check_s": time.perf_counter() - t0}, found


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=14_000)
    ap.add_argument("--train", type=int, default=20_000)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--planted", type=int, default=50)
    ap.add_argument("--n", type=int, default=13)
    ap.add_argument("--out", default=default_out("decontaminate"))
    args = ap.parse_args()
    evals, train, dirty = corpus(args)
    rows = []
    for name, fn in (("lm-eval Janitor (python set)", reference), ("moxin (uint64 hashes)", moxin)):
        stats, found = fn(evals, train, args.n)
        rows.append({"impl": name, **stats, "bytes_per_ngram": stats["index_bytes"] / max(stats["ngrams"], 1),
                     "records_per_s": len(train) / stats["check_s"], "found": len(found),
                     "exactly_planted": found == dirty})
    ref, ours = rows
    print(table(rows, [("impl", "implementation", ""), ("ngrams", "eval n-grams", ","),
                       ("index_bytes", "index bytes", ","), ("bytes_per_ngram", "B / n-gram", ".1f"),
                       ("build_s", "build s", ".2f"), ("records_per_s", "train records / s", ",.0f"),
                       ("found", "contaminated", ""), ("exactly_planted", "= planted", "")],
                f"decontamination, {args.eval} eval records, {args.train} training records of {args.words} words, "
                f"n={args.n}"))
    ratios = {"memory_ratio": ref["index_bytes"] / ours["index_bytes"],
              "check_speed_ratio": ours["records_per_s"] / ref["records_per_s"]}
    print(f"moxin: {ratios['memory_ratio']:.1f}x less index memory, {ratios['check_speed_ratio']:.2f}x the check speed")
    write_json(args.out, {"args": vars(args), "rows": rows, **ratios})


if __name__ == "__main__":
    main()
