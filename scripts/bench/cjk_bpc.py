"""Tiny models pretrained with the base tokenizer and with moxin-cjk on the same training characters: bits per
character on held-out CJK and English text (the fair comparison across tokenizers), and training tokens/s.

Both runs go through `python -m moxin.run` (stage, data pipeline, sample callback and HF export) on the built-in
sample corpus, one phase at sequence length 256. The base run gets `--tokens` tokens with the default mixture
(prose 0.45, code 0.35, cjk 0.2 of tokens); the moxin-cjk run gets, per source, the number of tokens that covers
the same number of characters (source tokens/char measured with each tokenizer on the sample files), so both models
read the same text. Evaluation loads each run's Hugging Face export *with the tokenizer found in that export
folder* and scores every held-out line from a bos token: bits/char = sum of -log2 p(token) / characters.

Held-out text: the sample's cjk.jsonl evaluation split (never trained on, by either model or the experts), Debian
documentation (as in scripts/bench/tokenizer.py; skipped with --no-debian), and English: the Latin-script lines of
the repository's README and docs (not in the sample corpus).

    python scripts/bench/cjk_bpc.py [--tokens 163840] [--out bench.json]
    python scripts/bench/cjk_bpc.py --smoke          # a few steps, tiny eval, for tests
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _common import ROOT, default_out, table, write_json

from moxin.data.sample import sample_path
from moxin.tokenizer import load_tokenizer
from moxin.tokenizer.cjk import is_claimed

RUNS = (("mistral", "tiny-cpu"), ("moxin-cjk", "tiny-cjk"))
MIXTURE = {"prose": 0.45, "code": 0.35, "cjk": 0.2}
TOKENS_PER_STEP = 4096


def tokens_per_char(tok, source: str) -> float:
    texts = [json.loads(x)["text"] for x in sample_path(source).read_text(encoding="utf-8").splitlines()]
    return sum(map(len, tok.encode_batch(texts, eos=True))) / sum(map(len, texts))


def phase_for(tok, base_rates: dict, total_tokens: int) -> tuple[dict, int, float]:
    """Mixture and token count that make `tok` read the characters the base run reads."""
    chars = {s: MIXTURE[s] * total_tokens / base_rates[s] for s in MIXTURE}
    toks = {s: chars[s] * tokens_per_char(tok, s) for s in MIXTURE}
    n = sum(toks.values())
    steps = max(1, round(n / TOKENS_PER_STEP))
    return {s: round(toks[s] / n, 4) for s in MIXTURE}, steps * TOKENS_PER_STEP, sum(chars.values())


def english_heldout(max_chars: int) -> str:
    lines = []
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for line in p.read_text(encoding="utf-8").splitlines():
            s = line.strip()
            if len(s) >= 40 and not is_claimed(s) and not s.startswith(("|", "```", "    ")):
                lines.append(s)
    out, n = [], 0
    for s in lines:
        if n >= max_chars:
            break
        out.append(s)
        n += len(s)
    return "\n".join(out)


def eval_sets(debs: str | None, max_chars: int) -> dict[str, str]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tokenizer import debian_eval, sample_heldout  # scripts/bench/tokenizer.py

    sets = {f"sample held-out {k}": v for k, v in sample_heldout().items()}
    if debs:
        for k, v in debian_eval(Path(debs)).items():
            sets[f"Debian docs {k}"] = v[:max_chars].rsplit("\n", 1)[0]
    sets["English (README, docs)"] = english_heldout(max_chars)
    return sets


@torch.no_grad()
def bits_per_char(model, tok, text: str, max_line_chars: int = 160, batch: int = 4) -> float:
    """Sum over lines of -log2 p(tokens | bos, earlier tokens of the line) / characters of the lines."""
    lines = [s[:max_line_chars] for s in text.splitlines() if s.strip()]
    bits, chars = 0.0, 0
    for i in range(0, len(lines), batch):
        group = lines[i:i + batch]
        seqs = [[tok.bos_id] + tok.encode(s) for s in group]
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
        pos = torch.zeros((len(seqs), T), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, :len(s)] = torch.tensor(s)
            pos[r] = torch.arange(T)  # right padding continues the positions; causal, so it never affects the line
        logp = torch.log_softmax(model(ids, pos).float(), dim=-1)
        for r, s in enumerate(seqs):
            tgt = torch.tensor(s[1:])
            bits -= logp[r, torch.arange(len(s) - 1), tgt].sum().item() / math.log(2)
        chars += sum(map(len, group))
    return bits / chars


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=163840, help="training tokens of the base run")
    ap.add_argument("--debs", default="/tmp/cjk-debs", help="scratch folder of the Debian eval packages")
    ap.add_argument("--no-debian", action="store_true")
    ap.add_argument("--eval-chars", type=int, default=8000, help="characters per Debian / English eval set")
    ap.add_argument("--work", default=None, help="folder for the two runs (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=default_out("cjk_bpc"))
    args = ap.parse_args()
    if args.smoke:
        args.tokens, args.no_debian, args.eval_chars = 2 * TOKENS_PER_STEP, True, 300

    work = Path(args.work or tempfile.mkdtemp(prefix="cjk_bpc-"))
    base_tok = load_tokenizer(RUNS[0][0])
    base_rates = {s: tokens_per_char(base_tok, s) for s in MIXTURE}
    sets = eval_sets(None if args.no_debian else args.debs, args.eval_chars)
    results = []
    for spec, model_name in RUNS:
        tok = load_tokenizer(spec)
        mixture, n_tokens, chars = phase_for(tok, base_rates, args.tokens)
        mix = ", ".join(f"{k}: {v}" for k, v in mixture.items())
        out_dir = work / spec
        cmd = [sys.executable, "-m", "moxin.run", f"tokenizer={spec}", f"model={model_name}", f"out_dir={out_dir}",
               f"run_name=bpc-{spec}", "trainer.progress_bar=none", "hardware.num_workers=0",
               "trainer.val_every_n_steps=null", "trainer.checkpoint_every_n_steps=1000",
               f"schedule.phases=[{{name: main, seq_len: 256, tokens: {n_tokens}, mixture: {{{mix}}}}}]"]
        print("$ " + " ".join(f"'{c}'" if " " in c else c for c in cmd), flush=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=sys.stderr if not args.smoke else
                       subprocess.DEVNULL)
        summary = json.loads((out_dir / "summary.json").read_text())
        from moxin.model.hf import load_hf

        model = load_hf(out_dir / "hf").eval()
        export_tok = load_tokenizer(out_dir / "hf")  # the tokenizer the export carries
        probe = "中文、日本語のテキスト、한국어 and English."
        assert export_tok.encode(probe) == tok.encode(probe), f"{spec}: exported tokenizer differs"
        row = {"tokenizer": spec, "vocab": model.cfg.vocab_size, "train tokens": summary["target_tokens"],
               "train chars": round(chars), "tokens/s": summary["tokens_per_s"],
               "chars/s": summary["tokens_per_s"] * chars / max(summary["target_tokens"], 1),
               "seconds": summary["seconds"],
               "final loss": summary["metrics"].get("train/loss")}
        for name, text in sets.items():
            row[name] = bits_per_char(model, export_tok, text)
        results.append(row)
        print(json.dumps(row), flush=True)

    cols = [("tokenizer", "tokenizer", ""), ("vocab", "vocab", ""), ("train tokens", "train tokens", ","),
            ("train chars", "train chars", ","), ("tokens/s", "train tok/s", ",.0f"), ("chars/s", "train chars/s", ",.0f"),
            ("seconds", "run s", "")]
    print(table(results, cols, "training (same characters)"))
    bpc = [{"text": name, "chars": len(text), **{r["tokenizer"]: r[name] for r in results}} for name, text in
           sets.items()]
    for r in bpc:
        r["ratio"] = r[RUNS[1][0]] / r[RUNS[0][0]]
    print(table(bpc, [("text", "held-out text", ""), ("chars", "chars", ","), (RUNS[0][0], f"{RUNS[0][0]} bits/char",
                                                                                  ".3f"),
                      (RUNS[1][0], f"{RUNS[1][0]} bits/char", ".3f"), ("ratio", "cjk / base", ".3f")],
                "bits per character (lower is better)"))
    write_json(args.out, {"runs": results, "bits_per_char": bpc})


if __name__ == "__main__":
    main()
