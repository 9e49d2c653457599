"""moxin-cjk against its base (the Mistral tokenizer), in one run: tokens per character on Chinese, Japanese and
Korean running text that the experts never saw, identical ids on English and code, and encoding throughput.

Evaluation text: Debian's translated documentation (manpages-zh: zh_CN + zh_TW man pages; manpages-ja; the
Korean Debian FAQ, debian-faq-ko), which scripts/train_cjk_experts.py never trains on. The .deb files are
fetched with `apt-get download` into --debs (a scratch folder; never commit them) unless already there. From each
language, lines whose non-space characters are at least 60 % CJK (running text, not option tables) are shuffled
with a fixed seed and the first ~150k characters are kept; tokens / characters is measured over whole lines, so the
Latin command names and options inside them count too.

    python scripts/bench/tokenizer.py [--debs /tmp/cjk-debs] [--out bench.json]
    python scripts/bench/tokenizer.py --smoke          # the sample corpus only (no apt), for tests
"""

from __future__ import annotations

import argparse
import glob
import gzip
import html
import json
import random
import re
import subprocess
import time
from pathlib import Path

from _common import ROOT, default_out, table, write_json

from moxin.data.sample import sample_path
from moxin.tokenizer import load_tokenizer
from moxin.tokenizer.cjk import SAMPLE_HELDOUT_EVERY, document_language, is_claimed

PACKAGES = {"zh": "manpages-zh", "ja": "manpages-ja", "ko": "debian-faq-ko"}
EVAL_CHARS = 150_000


def fetch_debs(where: Path) -> dict[str, Path]:
    where.mkdir(parents=True, exist_ok=True)
    out = {}
    for lang, pkg in PACKAGES.items():
        debs = sorted(where.glob(f"{pkg}_*.deb"))
        if not debs:
            print(f"$ (cd {where} && apt-get download {pkg})", flush=True)
            subprocess.run(["apt-get", "download", pkg], cwd=where, check=True, capture_output=True)
            debs = sorted(where.glob(f"{pkg}_*.deb"))
        tree = where / pkg
        if not tree.is_dir():
            subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(tree)], check=True)
        out[lang] = tree
    return out


def man_text(path: str) -> str:
    """Text lines of a gzipped roff man page: macro lines dropped (their arguments kept for headings/fonts)."""
    raw = gzip.open(path).read()
    for enc in ("utf-8", "gb18030", "big5", "euc-jp"):
        try:
            t = raw.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    else:
        return ""
    out = []
    for line in t.splitlines():
        if line.startswith((".", "'")):
            parts = line.split(None, 1)
            if len(parts) == 2 and parts[0] in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".TP", ".IP"):
                line = parts[1]
            else:
                continue
        line = re.sub(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&e-]|\\s[-+]?\d", "", line).replace("\\-", "-").strip('"')
        if line.strip():
            out.append(line)
    return "\n".join(out)


def html_text(path: str) -> str:
    t = Path(path).read_text(encoding="utf-8")
    t = re.sub(r"(?s)<(script|style).*?</\1>", "", t)
    t = html.unescape(re.sub(r"<[^>]+>", "", t))
    return "\n".join(line.strip() for line in t.splitlines() if line.strip())


def running_text(text: str, chars: int = EVAL_CHARS, seed: int = 0) -> str:
    """Lines that are mostly CJK (>= 60 % of non-space characters, >= 8 of them), shuffled, ~chars long."""
    keep = set()
    for line in text.splitlines():
        s = line.strip()
        ns = re.sub(r"\s", "", s)
        if len(ns) >= 8 and sum(map(is_claimed, ns)) >= 0.6 * len(ns):
            keep.add(s)
    lines = sorted(keep)
    random.Random(seed).shuffle(lines)
    out, n = [], 0
    for s in lines:
        if n >= chars:
            break
        out.append(s)
        n += len(s) + 1
    return "\n".join(out) + "\n"


def debian_eval(debs: Path) -> dict[str, str]:
    trees = fetch_debs(debs)
    docs = {
        "zh": [man_text(p) for p in sorted(glob.glob(str(trees["zh"] / "usr/share/man/zh_*/man*/*.gz")))],
        "ja": [man_text(p) for p in sorted(glob.glob(str(trees["ja"] / "usr/share/man/ja/man*/*.gz")))],
        "ko": [html_text(p) for p in sorted(glob.glob(str(trees["ko"] / "usr/share/doc/debian/FAQ/ko/*.html")))],
    }
    return {lang: running_text("\n".join(d)) for lang, d in docs.items()}


def sample_heldout() -> dict[str, str]:
    by = {"zh": [], "ja": [], "ko": []}
    for i, line in enumerate(sample_path("cjk").read_text(encoding="utf-8").splitlines()):
        if i % SAMPLE_HELDOUT_EVERY == 0:
            t = json.loads(line)["text"]
            by[document_language(t)].append(t)
    return {k: "\n".join(v) for k, v in by.items()}


def latin_texts() -> dict[str, list[str]]:
    """English and code: the sample's prose and stdlib code, the repository's own Python and Markdown."""
    read = lambda name: [json.loads(x)["text"] for x in sample_path(name).read_text(encoding="utf-8").splitlines()]
    repo_py = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "moxin").rglob("*.py"))]
    docs = [p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]]
    texts = {"English (sample prose)": read("prose"), "code (sample stdlib)": read("code"),
             "code (moxin/*.py)": repo_py, "Markdown (README, docs)": docs}
    # the repository's files mention CJK in places (tests, docs); keep only Latin-script documents for identity
    return {k: [t for t in v if not is_claimed(t)] for k, v in texts.items()}


def throughput(base, tok, texts: list[str], reps: int) -> tuple[float, float]:
    """Characters per second of encode_batch for base and tok, median over reps. The two are timed alternately,
    rep by rep, so a change in machine load during the run hits both alike."""
    chars = sum(map(len, texts))
    base.encode_batch(texts)
    tok.encode_batch(texts)
    ts = {0: [], 1: []}
    for _ in range(reps):
        for k, t in enumerate((base, tok)):
            t0 = time.perf_counter()
            t.encode_batch(texts)
            ts[k].append(time.perf_counter() - t0)
    med = lambda v: sorted(v)[len(v) // 2]
    return chars / med(ts[0]), chars / med(ts[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debs", default="/tmp/cjk-debs", help="scratch folder for the Debian .deb files")
    ap.add_argument("--tokenizer", default="moxin-cjk")
    ap.add_argument("--base", default="mistral")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="sample corpus only, no apt")
    ap.add_argument("--out", default=default_out("tokenizer"))
    args = ap.parse_args()

    base, tok = load_tokenizer(args.base), load_tokenizer(args.tokenizer)
    evals = {"sample held-out": sample_heldout()}
    if not args.smoke:
        evals["Debian docs"] = debian_eval(Path(args.debs))
    rows = []
    for src, by_lang in evals.items():
        for lang, text in by_lang.items():
            nb, ne = len(base.encode(text)), len(tok.encode(text))
            assert tok.decode(tok.encode(text)) == text, f"{src} {lang}: round trip differs"
            rows.append({"text": f"{src} {lang}", "chars": len(text), "base": nb / len(text), "experts": ne / len(text),
                         "ratio": nb / ne})
    print(table(rows, [("text", "text", ""), ("chars", "chars", ","), ("base", "base tok/char", ".3f"),
                       ("experts", f"{args.tokenizer} tok/char", ".3f"), ("ratio", "base / experts", ".2f")],
                f"tokens per character, {args.base} vs {args.tokenizer}"))

    ident = []
    for name, texts in latin_texts().items():
        same = base.encode_batch(texts) == tok.encode_batch(texts)
        ident.append({"text": name, "docs": len(texts), "chars": sum(map(len, texts)), "identical": str(same)})
    print(table(ident, [("text", "text", ""), ("docs", "docs", ""), ("chars", "chars", ","),
                        ("identical", "identical ids", "")], "English and code"))

    mixed = [line for by in evals.values() for t in by.values() for line in t.splitlines()]
    mixed += [t for v in latin_texts().values() for t in v]
    thr = []
    for name, texts in (("mixed (all of the above)", mixed),
                        ("CJK only", [line for by in evals.values() for t in by.values() for line in t.splitlines()]),
                        ("English + code only", [t for v in latin_texts().values() for t in v])):
        b, e = throughput(base, tok, texts, args.reps)
        thr.append({"text": name, "chars": sum(map(len, texts)), "base": b / 1e6, "experts": e / 1e6, "ratio": e / b})
    print(table(thr, [("text", "text", ""), ("chars", "chars", ","), ("base", "base M chars/s", ".2f"),
                      ("experts", f"{args.tokenizer} M chars/s", ".2f"), ("ratio", "experts / base", ".2f")],
                "encode_batch throughput (median of reps, base and experts timed alternately)"))
    write_json(args.out, {"compression": rows, "identity": ident, "throughput": thr})


if __name__ == "__main__":
    main()
