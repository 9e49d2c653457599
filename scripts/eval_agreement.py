"""Agreement of moxin's multiple-choice scoring with lm-evaluation-harness, item by item, on the same Hugging Face
folder and the same local jsonl task; prints both tables, items/s of each, and every disagreement.

    # lm-eval lives in its own environment (never a moxin dependency); point --lm-eval-python at it
    python scripts/eval_agreement.py --hf runs/evaltiny/hf --lm-eval-python /work/scratch-lmeval/bin/python
    python scripts/eval_agreement.py --hf /path/to/Moxin-7B --device cuda --dtype bfloat16 --num-fewshot 5 \\
        --lm-eval-python python   # lm-eval installed into the GPU machine's environment

    # throughput at realistic lengths: a generated task (~250-token passages, four candidate sentences), and moxin's
    # padded-row path (eval.share_prefixes=false) timed in the same process
    python scripts/eval_agreement.py --hf runs/evaltiny/hf --synthetic 300 --plain-too --lm-eval-python ...

The task (default: the built-in sample, moxin/data/sample/eval_mc.jsonl, ``{"question", "choices", "gold"}``) is
written as an lm-eval task yaml (dataset_path json, doc_to_text from --text, doc_to_choice/doc_to_target the
fields, fewshot_split = test split so lm-eval drops the item from its own few-shot draw) and as a moxin
``TaskConfig`` with the same template. Both sides prepend bos (lm-eval: add_bos_token=True; the export has no
tokenizer_config.json, so lm-eval's tokenizer is the folder's tokenizer.model through transformers).

Compared per item: the token ids of every (context, continuation) request (lm-eval's own ``_encode_pair``),
the log-likelihood of every option (max |difference| reported), acc and acc_norm. Exit status 1 with
``--strict`` when any item's acc or acc_norm differs.

This file runs twice: as the driver (moxin side, imports moxin) and, with ``--side lmeval``, inside the lm-eval
environment (imports only lm_eval, transformers, torch and the standard library).

On a GPU machine without network (Python 3.12, torch, transformers, accelerate, pandas, pyarrow, sentencepiece,
scikit-learn, sacrebleu already there) lm-eval travels as wheels. What lm-eval 0.4.13 imports on this path and such
an image lacks: lm-eval, datasets, dill, multiprocess (datasets 5.2 needs pyarrow >= 24, fsspec <= 2026.9.0,
huggingface-hub >= 1.31: check with ``pip show`` there; an older datasets fits an older pyarrow). Fetch here:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

and there (``--make-random`` writes a randomly initialised model of a preset when no weights are at hand):

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    python3 scripts/eval_agreement.py --hf runs/moxin7b-random --make-random moxin-7b --device cuda \
        --dtype float32 --repeat 20 --batch-size 32 --lm-eval-python python3 --out agree_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "moxin" / "data" / "sample" / "eval_mc.jsonl"
DEFAULT_TEXT = "Question: {question}\nAnswer:"
TASK = "moxin_agreement"


def jinja_template(text: str) -> str:
    """The str.format template as lm-eval's jinja: {field} -> {{field}} (fields only, no format specs)."""
    import re

    return re.sub(r"\{(\w+)\}", r"{{\1}}", text)


#: Winogrande-form records for --style winogrande (partial evaluation: one continuation after each filled context).
WINOGRANDE = [
    ("The trophy would not fit in the brown suitcase because the _ was too big.", "trophy", "suitcase", "1"),
    ("The trophy would not fit in the brown suitcase because the _ was too small.", "trophy", "suitcase", "2"),
    ("Sarah lent her umbrella to Maria because _ was going to walk home in the rain.", "Sarah", "Maria", "2"),
    ("The glass fell on the stone floor and the _ shattered into pieces.", "glass", "floor", "1"),
    ("John could not lift the box onto the shelf because the _ was too heavy.", "box", "shelf", "1"),
    ("The dog chased the cat up the tree, and the _ barked at it for an hour.", "dog", "cat", "1"),
    ("Anna asked Kim for help with the homework because _ understood the lesson.", "Anna", "Kim", "2"),
    ("The ice cream melted in the car because the _ was so hot inside.", "ice cream", "car", "2"),
    ("We moved the plant from the window to the table because the _ got too much sun.", "plant", "table", "1"),
    ("The lawyer asked the witness a question, but the _ refused to answer it.", "lawyer", "witness", "2"),
    ("The bottle did not fit in the bag because the _ was too narrow.", "bottle", "bag", "2"),
    ("Tom paid Jim back the money because _ had borrowed it last week.", "Tom", "Jim", "1"),
]

WINOGRANDE_UTILS = '''
def doc_to_text(doc):
    return {"1": 0, "2": 1}[doc["answer"]]


def doc_to_target(doc):
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def doc_to_choice(doc):
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in [doc["option1"], doc["option2"]]]
'''


def task_yaml(args) -> str:
    data = str(Path(args.data).resolve())
    if args.style == "winogrande":  # lm-eval's own winogrande functions (tasks/winogrande/preprocess_winogrande.py)
        fields = ["doc_to_text: !function utils.doc_to_text", "doc_to_choice: !function utils.doc_to_choice",
                  "doc_to_target: !function utils.doc_to_target"]
    else:
        fields = [f"doc_to_text: {json.dumps(jinja_template(args.text))}", f"doc_to_choice: {args.choices_field}",
                  f"doc_to_target: {args.gold_field}"]
    return "\n".join([
        f"task: {TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(data)}",
        "test_split: test",
        "fewshot_split: test",
        "output_type: multiple_choice",
        *fields,
        'target_delimiter: " "',
        'fewshot_delimiter: "\\n\\n"',
        "metric_list:",
        "  - {metric: acc, aggregation: mean, higher_is_better: true}",
        "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        "",
    ])


# ---- lm-eval side (runs in the lm-eval environment) ----------------------------------------------------------------
def run_lmeval(args) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as d:
        Path(d, f"{TASK}.yaml").write_text(task_yaml(args))
        Path(d, "utils.py").write_text(WINOGRANDE_UTILS)
        t0 = time.perf_counter()
        lm = HFLM(pretrained=args.hf, tokenizer=args.lmeval_tokenizer or args.hf, add_bos_token=True,
                  dtype=args.dtype, device=args.device, batch_size=args.batch_size, trust_remote_code=False)
        load_s = time.perf_counter() - t0
        scoring = [0.0]
        inner = lm.loglikelihood

        def timed(requests, *a, **kw):  # tokenization + forwards, as moxin's items/s counts
            t = time.perf_counter()
            out = inner(requests, *a, **kw)
            scoring[0] += time.perf_counter() - t
            return out

        lm.loglikelihood = timed
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=d),
                                      num_fewshot=args.num_fewshot, log_samples=True, fewshot_random_seed=1234,
                                      limit=args.limit, bootstrap_iters=0)
        eval_s = time.perf_counter() - t0
    items = []
    for s in sorted(res["samples"][TASK], key=lambda s: s["doc_id"]):
        args_ = s["arguments"]
        pairs = [tuple(a.values()) if isinstance(a, dict) else tuple(a)
                 for a in (args_.values() if isinstance(args_, dict) else args_)]
        pairs = [(p[0], p[1]) for p in pairs]
        resps = [r[0] if isinstance(r[0], (list, tuple)) else r for r in s["resps"]]
        items.append({"index": s["doc_id"], "acc": float(s["acc"]), "acc_norm": float(s["acc_norm"]),
                      "loglik": [float(r[0]) for r in resps], "pairs": pairs,
                      "tokens": [list(map(list, lm._encode_pair(c, x))) for c, x in pairs]})
    m = res["results"][TASK]
    return {"acc": m.get("acc,none"), "acc_norm": m.get("acc_norm,none"), "n": len(items), "load_s": load_s,
            "eval_s": eval_s, "score_s": scoring[0], "items_per_s": len(items) / scoring[0], "items": items,
            "versions": {"lm_eval": getattr(lm_eval, "__version__", "?"),
                         "transformers": __import__("transformers").__version__,
                         "torch": __import__("torch").__version__}}


# ---- moxin side ---------------------------------------------------------------------------------------------------
def run_moxin(args) -> list[dict]:
    """moxin's scoring of the task: inputs packed as prefix trees (the default), and with --plain-too also one padded
    row per input, timed in the same process after the same warm-up."""
    import torch

    from moxin.config import EvalConfig, TaskConfig
    from moxin.eval.loglik import encode_pair
    from moxin.eval.runner import evaluate
    from moxin.eval.tasks import build_mc_items, load_records
    from moxin.model.hf import load_hf
    from moxin.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    # sdpa: plain causal attention for padded rows (flash on a GPU), the dense tree mask for packed ones; flex would
    # recompile for every new batch length
    model = load_hf(args.hf, attn_backend="sdpa").to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    tok = load_tokenizer(args.moxin_tokenizer or (args.hf if any(
        Path(args.hf, f).is_file() for f in ("tokenizer.json", "tokenizer.model")) else "mistral"))
    load_s = time.perf_counter() - t0
    with torch.no_grad():  # the first forward pays CUDA/cuBLAS start-up; lm-eval, run second, finds them warm
        model(torch.ones(2, 16, dtype=torch.long, device=args.device))
    task = TaskConfig(name=TASK, path=str(args.data), text=args.text, choices_field=args.choices_field,
                      gold_field=args.gold_field, num_fewshot=args.num_fewshot, fewshot_seed=1234, limit=args.limit,
                      preset="winogrande" if args.style == "winogrande" else None)
    items = build_mc_items(task, load_records(task.path, name=TASK))
    tokens = [[list(map(list, encode_pair(tok, c, x, bos=True))) for c, x in zip(it.contexts, it.continuations)]
              for it in items]
    real_forward = model.forward
    out = []
    for share in (True, False) if args.plain_too else (True,):
        cfg = EvalConfig(tasks=[task], bos=True, batch_tokens=args.batch_tokens, verifier_workers=0,
                         share_prefixes=share, row_tokens=args.row_tokens)
        seen = [0, 0]  # forwards, tokens through the model (padding included)

        def counting(x, *a, **kw):
            seen[0] += 1
            seen[1] += x.numel()
            return real_forward(x, *a, **kw)

        model.forward = counting
        try:
            t0 = time.perf_counter()
            res = evaluate(model, tok, cfg)["tasks"][TASK]
            eval_s = time.perf_counter() - t0
        finally:
            del model.forward
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        for it, r, ids in zip(items, res["items"], tokens):
            r["pairs"] = list(zip(it.contexts, it.continuations))
            r["tokens"] = ids
        out.append({"side": "moxin" if share else "moxin, padded rows", "acc": res["metrics"]["acc"],
                    "acc_norm": res["metrics"]["acc_norm"], "n": res["n"], "load_s": load_s, "eval_s": eval_s,
                    "score_s": res["seconds"], "items_per_s": res["n"] / res["seconds"], "items": res["items"],
                    "forwards": seen[0], "forward_tokens": seen[1], "tokenizer": tok.name,
                    "versions": {"torch": torch.__version__}})
    return out


def synthetic_task(path: Path, n: int, words: int, seed: int) -> None:
    """A multiple-choice task of `n` items with long contexts, for throughput at realistic lengths: a passage of about
    `words` words (sentences of the built-in prose drawn at random, so passages differ from item to item and share
    no more than a first sentence), then four candidate next sentences (about 10-50 tokens each, as HellaSwag's
    endings). Random sentences make the task unlearnable; only the token statistics matter here."""
    import random
    import re

    texts = [json.loads(line)["text"] for line in (REPO / "moxin" / "data" / "sample" / "prose.jsonl").open()]
    sentences = sorted({s.strip() for t in texts for s in re.split(r"(?<=[.!?])\s+", t)
                        if "\n" not in s.strip() and 6 <= len(s.split()) <= 40})
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            picked = rng.sample(sentences, 40)
            passage, k = [], 0
            while sum(len(s.split()) for s in passage) < words:
                passage.append(picked[k])
                k += 1
            choices = picked[k:k + 4]
            f.write(json.dumps({"passage": " ".join(passage), "choices": choices, "gold": rng.randrange(4)}) + "\n")


def make_random(preset: str, path: str, seed: int, windowless: bool = False) -> None:
    """A randomly initialised moxin model of ``preset`` saved as a HF folder (bf16; fp32 up to dim 1024) with the tokenizer files a run's
    export has (tokenizer.model, tokenizer.json, tokenizer_config.json): a model of the real size on a machine that
    cannot download one.

    tokenizer.json matters: from a bare tokenizer.model, transformers converts the SentencePiece model itself and
    5.17 drops the dummy-prefix space (``Question`` -> id 24994 where SentencePiece gives ``▁Question`` 22478),
    which made every request's token ids differ from moxin's on the GPU machine. `windowless`: no sliding window
    (and at least 4K positions), so both sides attend alike at any prompt length."""
    import shutil

    import torch
    from omegaconf import OmegaConf

    from moxin.model import Transformer
    from moxin.presets import load_preset
    from moxin.model.hf import save_hf
    from moxin.tokenizer import mistral_model_path
    from moxin.tokenizer.hf_export import write_hf_tokenizer_files

    torch.manual_seed(seed)
    cfg = load_preset(preset)
    if windowless:
        cfg = load_preset(preset, sliding_window=None, max_seq_len=max(4096, cfg.max_seq_len))
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Transformer(cfg)
    save_hf(model, path, dtype=torch.float32 if cfg.dim <= 1024 else torch.bfloat16)
    shutil.copy2(mistral_model_path(), Path(path) / "tokenizer.model")
    write_hf_tokenizer_files(path, OmegaConf.create({"tokenizer": "mistral", "stage": {},
                                                     "model": {"max_seq_len": cfg.max_seq_len}}))
    print(f"wrote a random {preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters) to {path}")
    del model


def compare(mx: dict, lm: dict) -> dict:
    by = {it["index"]: it for it in lm["items"]}
    out = {"items": len(mx["items"]), "acc_differs": [], "acc_norm_differs": [], "context_differs": [],
           "tokens_differ": [], "max_abs_loglik_diff": 0.0, "max_rel_loglik_diff": 0.0}
    if sorted(by) != [it["index"] for it in mx["items"]]:
        out["index_mismatch"] = True
    for it in mx["items"]:
        o = by.get(it["index"])
        if o is None:
            continue
        i = it["index"]
        if it["acc"] != o["acc"]:
            out["acc_differs"].append(i)
        if it["acc_norm"] != o["acc_norm"]:
            out["acc_norm_differs"].append(i)
        if [tuple(p) for p in it["pairs"]] != [tuple(p) for p in o["pairs"]]:
            out["context_differs"].append(i)
        if it["tokens"] != o["tokens"]:
            out["tokens_differ"].append(i)
        for a, b in zip(it["loglik"], o["loglik"]):
            out["max_abs_loglik_diff"] = max(out["max_abs_loglik_diff"], abs(a - b))
            out["max_rel_loglik_diff"] = max(out["max_rel_loglik_diff"], abs(a - b) / max(abs(b), 1e-9))
    return out


def print_report(args, mxs: list[dict], lm: dict, cmps: list[dict]) -> None:
    print(f"\nmodel {args.hf}  task {args.data}  num_fewshot {args.num_fewshot}  device {args.device}  dtype {args.dtype}")
    print(f"lm-eval {lm['versions']}; moxin tokenizer {mxs[0]['tokenizer']}\n")
    print("items/s: tokenization + forwards of the log-likelihood requests (lm-eval: HFLM.loglikelihood; moxin: "
          "encode_pairs + loglikelihoods); total s: the whole evaluate call (lm-eval: simple_evaluate, task building "
          "and dataset loading included); forward tokens: moxin's rows x length over its forwards")
    print("| side | n | acc | acc_norm | scoring s | items/s | x lm-eval | forwards | forward tokens | total s | "
          "model load s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in (*mxs, lm):
        print(f"| {r.get('side', 'lm-eval')} | {r['n']} | {r['acc']:.4f} | {r['acc_norm']:.4f} | {r['score_s']:.2f} | "
              f"{r['items_per_s']:.1f} | {r['items_per_s'] / lm['items_per_s']:.2f} | {r.get('forwards', '')} | "
              f"{r.get('forward_tokens', '')} | {r['eval_s']:.1f} | {r['load_s']:.1f} |")
    for mx, cmp in zip(mxs, cmps):
        n = cmp["items"]
        print(f"\n{mx['side']} vs lm-eval, per item: acc equal on {n - len(cmp['acc_differs'])}/{n}, acc_norm equal on "
              f"{n - len(cmp['acc_norm_differs'])}/{n}; (context, continuation) strings equal on "
              f"{n - len(cmp['context_differs'])}/{n}; request token ids equal on {n - len(cmp['tokens_differ'])}/{n}; "
              f"max |loglik diff| {cmp['max_abs_loglik_diff']:.3g} (relative {cmp['max_rel_loglik_diff']:.3g})")
        for key in ("acc_differs", "acc_norm_differs", "context_differs", "tokens_differ"):
            if cmp[key]:
                print(f"  {key}: items {cmp[key][:20]}")
        by = {it["index"]: it for it in lm["items"]}
        for i in sorted(set(cmp["acc_differs"] + cmp["acc_norm_differs"]))[:5]:
            print(f"  item {i}: moxin loglik {mx['items'][i]['loglik']} vs lm-eval {by[i]['loglik']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face MistralForCausalLM folder (e.g. runs/<run>/hf)")
    ap.add_argument("--style", choices=["mc", "winogrande"], default="mc",
                    help="mc: question + options (ARC/PIQA/HellaSwag form); winogrande: partial evaluation with "
                         "lm-eval's winogrande functions over {sentence, option1, option2, answer} records")
    ap.add_argument("--data", default=None, help="task jsonl (default: the built-in sample; for --style winogrande "
                                                 "a dozen built-in Winograd-form sentences)")
    ap.add_argument("--text", default=DEFAULT_TEXT, help="context template over the record's fields")
    ap.add_argument("--choices-field", default="choices")
    ap.add_argument("--gold-field", default="gold")
    ap.add_argument("--num-fewshot", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch-size", default="16", help="lm-eval batch size (an int or 'auto')")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="moxin padded tokens per forward")
    ap.add_argument("--lm-eval-python", default=None,
                    help="python of the environment holding lm-eval (default: this one); run as a subprocess")
    ap.add_argument("--lmeval-tokenizer", default=None, help="tokenizer path for lm-eval (default: --hf)")
    ap.add_argument("--moxin-tokenizer", default=None,
                    help="moxin tokenizer spec (default: the folder's tokenizer.json/.model, else mistral)")
    ap.add_argument("--out", default=None, help="write both sides' per-item results and the comparison here (json)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when any item's acc or acc_norm differs")
    ap.add_argument("--make-random", default=None, metavar="PRESET",
                    help="when --hf does not exist: write a randomly initialised moxin model of this ModelConfig preset "
                         "there (e.g. moxin-7b; bf16 safetensors + the Mistral tokenizer.model) first")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed for --make-random")
    ap.add_argument("--repeat", type=int, default=1,
                    help="evaluate the task's records this many times over (0-shot only). Both sides score a repeated "
                         "request once (lm-eval's Collator, moxin's shared rows), so this tests the sharing, not "
                         "a larger workload")
    ap.add_argument("--row-tokens", type=int, default=1024, help="moxin packed tokens per row (eval.row_tokens)")
    ap.add_argument("--plain-too", action="store_true",
                    help="also time moxin with one padded row per input (eval.share_prefixes=false), same process")
    ap.add_argument("--synthetic", type=int, default=None, metavar="N",
                    help="score a generated task of N items with long contexts instead of --data (passages of "
                         "--synthetic-words words from the built-in prose, four candidate next sentences)")
    ap.add_argument("--synthetic-words", type=int, default=180, help="passage length of --synthetic, in words")
    ap.add_argument("--side", choices=["both", "lmeval"], default="both", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.synthetic and args.side == "both":
        if args.data is not None or args.style != "mc":
            ap.error("--synthetic writes its own task: give it without --data and --style")
        syn = Path(tempfile.mkdtemp(prefix="moxin-agree-")) / "synthetic.jsonl"
        synthetic_task(syn, args.synthetic, args.synthetic_words, args.seed)
        argv = list(argv if argv is not None else sys.argv[1:])
        drop = {"--synthetic", "--synthetic-words"}
        argv = [a for j, a in enumerate(argv) if a not in drop and (j == 0 or argv[j - 1] not in drop)]
        text = args.text if args.text != DEFAULT_TEXT else "{passage}\nWhich sentence comes next?\nAnswer:"
        return main(argv + ["--data", str(syn), "--text", text])
    if args.data is None:
        if args.style == "winogrande":
            wg = Path(tempfile.mkdtemp(prefix="moxin-agree-")) / "winogrande.jsonl"
            wg.write_text("".join(json.dumps({"sentence": s, "option1": a, "option2": b, "answer": y}) + "\n"
                                  for s, a, b, y in WINOGRANDE))
            args.data = str(wg)
        else:
            args.data = str(DEFAULT_DATA)
        argv = list(argv if argv is not None else sys.argv[1:]) + ["--data", args.data]
    if args.side == "both" and args.make_random and not Path(args.hf, "config.json").is_file():
        make_random(args.make_random, args.hf, args.seed)
    if args.side == "both" and args.repeat > 1:
        if args.num_fewshot:
            ap.error("--repeat copies records, which lm-eval's few-shot draw would drop as equal to the item; use it 0-shot")
        rep = Path(tempfile.mkdtemp(prefix="moxin-agree-")) / "task.jsonl"
        rep.write_text((Path(args.data).read_text().rstrip("\n") + "\n") * args.repeat)
        argv = list(argv if argv is not None else sys.argv[1:])
        i = argv.index("--data") if "--data" in argv else None
        if i is None:
            argv += ["--data", str(rep)]
        else:
            argv[i + 1] = str(rep)
        argv = [a for j, a in enumerate(argv) if a != "--repeat" and (j == 0 or argv[j - 1] != "--repeat")]
        return main(argv)
    if not Path(args.hf, "config.json").is_file():
        ap.error(f"--hf {args.hf}: no config.json; give a Hugging Face model folder (a run's hf/ export)")
    if not Path(args.data).is_file():
        ap.error(f"--data {args.data}: no such file")
    args.hf = str(Path(args.hf).resolve())

    if args.side == "lmeval":
        Path(args.json_out).write_text(json.dumps(run_lmeval(args)))
        return 0

    with tempfile.TemporaryDirectory() as d:
        jpath = Path(d, "lmeval.json")
        py = args.lm_eval_python or sys.executable
        passthru = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = [py, str(Path(__file__).resolve()), *passthru, "--side", "lmeval", "--json-out", str(jpath)]
        env = dict(os.environ)  # PYTHONPATH kept: where lm-eval was installed with --target (carried wheels)
        print("lm-eval side:", " ".join(cmd), flush=True)
        p = subprocess.run(cmd, env=env)
        if p.returncode != 0:
            print(f"the lm-eval side failed (exit {p.returncode}); is lm-eval installed for {py}? "
                  "(pip install lm-eval transformers in a separate environment; see the docstring)", file=sys.stderr)
            return 2
        lm = json.loads(jpath.read_text())
    mxs = run_moxin(args)
    cmps = [compare(mx, lm) for mx in mxs]
    print_report(args, mxs, lm, cmps)
    if args.out:
        Path(args.out).write_text(json.dumps({"moxin": mxs[0], "moxin_padded": mxs[1:], "lm_eval": lm,
                                              "comparison": cmps[0], "comparison_padded": cmps[1:]}, indent=1))
    return 1 if args.strict and any(c["acc_differs"] or c["acc_norm_differs"] for c in cmps) else 0


if __name__ == "__main__":
    sys.exit(main())
