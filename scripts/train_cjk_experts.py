"""Build the moxin-cjk expert tokenizer: one BPE per language (zh, ja, ko) appended to a base tokenizer.

    python scripts/train_cjk_experts.py                                   # rebuilds moxin/tokenizer/assets/moxin-cjk
    python scripts/train_cjk_experts.py --base path/to/tokenizer.json --out my-cjk/
    python scripts/train_cjk_experts.py --text zh:corpus_zh.txt --text ko:ko.txt --no-wordfreq
    python scripts/train_cjk_experts.py --hub zh:some/dataset:train:text:20000

Sources (any mix; each is turned into counts of CJK runs, see moxin.tokenizer.cjk.runs_of_text):

* ``wordfreq`` (default on): the word-frequency lists of the ``wordfreq`` package, zh ("large"), ja ("large"),
  ko ("small"). Chinese words also enter in Traditional form where the package's Traditional->Simplified table
  maps every character of the word one-to-one back (words with ambiguous characters are skipped). wordfreq's
  Korean list holds morphemes, not space-separated words, so each enters both as a word start (with the "▁" of
  the space before it) and as a suffix, half of its frequency each.
* ``jieba`` (default on, zh): the jieba package's dictionary (word, count).
* the built-in sample corpus ``cjk.jsonl`` (default on, weight 0.01): the training split only. Chinese and
  Japanese records are long runs without spaces; even at this weight each such run enters about a thousand times,
  so the experts learn long pieces of those very lines (the training records encode 3.3x shorter than with the
  base, the held-out ones 1.6x). Pass --no-sample to leave the sample out (records whose index is not a
  multiple of 5; ``moxin.tokenizer.cjk.SAMPLE_HELDOUT_EVERY`` keeps the rest for evaluation). Each record goes to the language its script says.
* ``--text LANG:PATH``: plain text files (UTF-8), e.g. a corpus of your own.
* ``--hub LANG:NAME:SPLIT:FIELD[:N]``: the first N records of a Hugging Face dataset (streamed; needs network).

Each source is normalized to relative frequencies and weighted (``--weight NAME=W``), so a 20k-word list and a
1 GB corpus can be mixed on purpose. Do not train on Debian's translated documentation packages (manpages-zh,
manpages-ja, debian-faq-ko): those are the evaluation text of scripts/bench/tokenizer.py.

Packages for the sources (wordfreq, jieba) are the optional extra ``cjk-train`` (pip install -e .[cjk-train]);
they are never needed to *use* the tokenizer.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moxin.tokenizer import load_tokenizer  # noqa: E402
from moxin.tokenizer.cjk import (  # noqa: E402
    LANGS, SAMPLE_HELDOUT_EVERY, add_special_tokens, compose, document_language, runs_of_text, script_runs,
    train_expert, write_artifact,
)
from moxin.tokenizer.tokenizer import ASSET_DIR, SPIECE_UNDERLINE  # noqa: E402

DEFAULT_VOCAB = {"zh": 32000, "ja": 16000, "ko": 10000}
#: Single characters each expert keeps as pieces (the most frequent ones); the rest of its size goes to merges.
DEFAULT_ALPHABET = {"zh": 7000, "ja": 5000, "ko": 2500}
DEFAULT_WEIGHTS = {"wordfreq": 1.0, "wordfreq-trad": 0.8, "jieba": 0.5, "sample": 0.01, "text": 1.0, "hub": 1.0}
#: Share of a zh/ja dictionary word's frequency that enters with a leading "▁" (after a space or at the start of a
#: text, where the base's dummy prefix sits); Korean morphemes enter half and half (see wordfreq_source).
LEAD_SHARE = 0.1
def word_runs(word: str, lead: bool = False) -> list[str]:
    """CJK runs of one dictionary word (a word with no CJK character gives none)."""
    return script_runs((SPIECE_UNDERLINE if lead else "") + word.replace(" ", SPIECE_UNDERLINE))


def add(counts: dict, runs_with_freq, weight: float) -> int:
    """Add a source's runs to ``counts`` as relative frequencies times ``weight``; returns distinct runs."""
    src = collections.Counter()
    for run, f in runs_with_freq:
        src[run] += f
    total = sum(src.values())
    for run, f in src.items():
        counts[run] = counts.get(run, 0.0) + weight * f / total
    return len(src)


def wordfreq_source(lang: str):
    import wordfreq

    wl = "small" if lang == "ko" else "large"
    freqs = wordfreq.get_frequency_dict(lang, wordlist=wl)
    for w, f in freqs.items():
        if lang == "ko":
            for lead in (True, False):
                for r in word_runs(w, lead):
                    yield r, f / 2
        else:
            yield from dictionary_word(w, f)


def dictionary_word(w: str, f: float):
    """Runs of a zh/ja dictionary word: mostly as is, LEAD_SHARE of it after a space."""
    for lead, share in ((False, 1 - LEAD_SHARE), (True, LEAD_SHARE)):
        for r in word_runs(w, lead):
            yield r, f * share


def traditional_source(base):
    """wordfreq's Chinese list written in Traditional characters. The package's table maps Traditional to
    Simplified; where a Simplified character has several Traditional sources (发 <- 發, 髮) the one the base
    tokenizer ranks most frequent (lowest id of a single-character piece; BPE ids follow frequency) is taken."""
    import wordfreq
    from wordfreq.chinese import SIMPLIFIED_MAP

    inv = collections.defaultdict(set)
    for k, v in SIMPLIFIED_MAP.items():
        if chr(k) != v and len(v) == 1:
            inv[v].add(chr(k))

    def rank(c: str) -> tuple:
        i = base.token_to_id(c)
        return (i is None, i if i is not None else 0, c)

    to_trad = {s: min(ts, key=rank) for s, ts in inv.items()}
    for w, f in wordfreq.get_frequency_dict("zh", wordlist="large").items():
        if any(c in to_trad for c in w):
            yield from dictionary_word("".join(to_trad.get(c, c) for c in w), f)


def jieba_source():
    import importlib.resources

    path = Path(str(importlib.resources.files("jieba").joinpath("dict.txt")))
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].isdigit():
            yield from dictionary_word(parts[0], int(parts[1]))


def sample_source(lang: str):
    from moxin.data.sample import sample_path

    for i, line in enumerate(sample_path("cjk").read_text(encoding="utf-8").splitlines()):
        if i % SAMPLE_HELDOUT_EVERY == 0 or not line.strip():
            continue
        text = json.loads(line)["text"]
        if document_language(text) == lang:
            for r in runs_of_text(text):
                yield r, 1


def text_source(path: str):
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        for r in runs_of_text(line):
            yield r, 1


def hub_source(name: str, split: str, fld: str, n: int):
    from moxin.config import SourceConfig
    from moxin.data.reader import open_hub_dataset  # the project's one hub opener

    src = SourceConfig(name=f"cjk-{name}", path=name, text_field=fld, split=split, format="hub")
    for i, rec in enumerate(open_hub_dataset(src, streaming=True)):
        if i >= n:
            break
        for r in runs_of_text(str(rec[fld])):
            yield r, 1


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="mistral", help="base tokenizer spec (mistral or a tokenizer.json)")
    ap.add_argument("--out", default=str(ASSET_DIR), help="output directory (default: the shipped artifact)")
    for lang in LANGS:
        ap.add_argument(f"--vocab-{lang}", type=int, default=DEFAULT_VOCAB[lang],
                        help=f"{lang} expert size incl. its alphabet (default {DEFAULT_VOCAB[lang]})")
    ap.add_argument("--no-wordfreq", action="store_true")
    ap.add_argument("--no-jieba", action="store_true")
    ap.add_argument("--no-sample", action="store_true")
    ap.add_argument("--text", action="append", default=[], metavar="LANG:PATH")
    ap.add_argument("--hub", action="append", default=[], metavar="LANG:NAME:SPLIT:FIELD[:N]")
    ap.add_argument("--weight", action="append", default=[], metavar="SOURCE=W",
                    help=f"source weights, defaults {DEFAULT_WEIGHTS}")
    ap.add_argument("--min-frequency", type=int, default=2)
    args = ap.parse_args(argv)

    weights = dict(DEFAULT_WEIGHTS)
    for kv in args.weight:
        k, _, v = kv.partition("=")
        if k not in weights:
            ap.error(f"--weight {kv}: unknown source {k!r}; known: {sorted(weights)}")
        weights[k] = float(v)

    base = load_tokenizer(args.base)
    counts = {lang: {} for lang in LANGS}
    sources = {lang: [] for lang in LANGS}

    def use(lang, name, it, w):
        t = time.time()
        n = add(counts[lang], it, w)
        sources[lang].append(f"{name} (weight {w}, {n} runs)")
        print(f"  {lang}: {name}: {n} distinct runs ({time.time() - t:.1f} s)", flush=True)

    if not args.no_wordfreq:
        for lang in LANGS:
            use(lang, f"wordfreq {lang}", wordfreq_source(lang), weights["wordfreq"])
        use("zh", "wordfreq zh in Traditional characters", traditional_source(base), weights["wordfreq-trad"])
    if not args.no_jieba:
        use("zh", "jieba dict.txt", jieba_source(), weights["jieba"])
    if not args.no_sample:
        for lang in LANGS:
            use(lang, "moxin sample cjk.jsonl (training split)", sample_source(lang), weights["sample"])
    for spec in args.text:
        lang, _, path = spec.partition(":")
        if lang not in LANGS or not path:
            ap.error(f"--text {spec}: expected LANG:PATH with LANG in {LANGS}")
        use(lang, f"text {Path(path).name}", text_source(path), weights["text"])
    for spec in args.hub:
        parts = spec.split(":")
        if len(parts) not in (4, 5) or parts[0] not in LANGS:
            ap.error(f"--hub {spec}: expected LANG:NAME:SPLIT:FIELD[:N]")
        n = int(parts[4]) if len(parts) == 5 else 10000
        use(parts[0], f"hub {parts[1]}:{parts[2]}", hub_source(parts[1], parts[2], parts[3], n), weights["hub"])

    experts = []
    for lang in LANGS:
        if not counts[lang]:
            print(f"  {lang}: no training text, no expert")
            continue
        t = time.time()
        ex = train_expert(lang, counts[lang], getattr(args, f"vocab_{lang}"), min_frequency=args.min_frequency,
                          limit_alphabet=DEFAULT_ALPHABET[lang], sources=sources[lang])
        print(f"  {lang}: expert of {len(ex.pieces)} pieces, {len(ex.merges)} merges ({time.time() - t:.1f} s)",
              flush=True)
        experts.append(ex)

    if base._hf is None:
        sys.exit(f"--base {args.base}: a SentencePiece model served by the sentencepiece library (not BPE) cannot "
                 "be extended; pass a BPE tokenizer.json or SentencePiece BPE model")
    base_json = json.loads(base._hf.to_str())
    tok_json, meta = compose(base_json, experts)
    specials = {"unk": base.id_to_token(base._unk_id()) if base._unk_id() is not None else None,
                "bos": base.id_to_token(base._bos_id) if base._bos_id is not None else None,
                "eos": base.id_to_token(base._eos_id) if base._eos_id is not None else None}
    add_special_tokens(tok_json, specials)
    meta["base"] = str(args.base)
    out = write_artifact(args.out, tok_json, meta, specials)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out}: vocab {meta['vocab_size']} (base {meta['base_vocab_size']}), {size / 1e6:.2f} MB")
    for e in meta["experts"]:
        print(f"  {e['lang']}: ids {e['first_id']}..{e['end_id'] - 1}, {e['reused_ids']} pieces reuse existing ids")


if __name__ == "__main__":
    main()
