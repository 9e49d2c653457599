"""Agreement of moxin's generative evaluation with lm-evaluation-harness's HF backend on the same model and items:
gsm8k (lm-eval's gsm8k.yaml, few-shot) and bbh_cot_fewshot subtasks (their own yamls: 3-shot CoT, stop strings
``</s>``, ``Q``, ``\\n\\n``) over local jsonl copies; greedy completions side by side (moxin: its own batched decode
with the stop strings checked during decoding; lm-eval: ``HFLM.generate_until``), each side's metric, and moxin's
scorer on lm-eval's completions (equal scoring on the same completions); items/s of each side's generation.

    # one environment with moxin and lm-eval (lm-eval 0.4.9.1 installed with --target beside the dev venv works)
    PYTHONPATH=$PWD:/tmp/lmeval-site python scripts/eval_gen_agreement.py --hf /tmp/tinycpu-hf \\
        --make-random tiny-cpu --max-gen-toks 64
    # GPU: a random Moxin-7B in bf16 (see scripts/eval_agreement.py for carrying lm-eval's wheels)
    python scripts/eval_gen_agreement.py --hf runs/moxin7b-random --make-random moxin-7b --device cuda \\
        --dtype bfloat16 --batch-size 32 --repeat 8 --out gen_agree.json

Completions differ only where the two forwards' logits round differently at a near tie (fp32 on the CPU: none
seen); the scores of the same completions must be equal (exit status 1 otherwise). lm-eval 0.4.13 with
transformers 5 (whose models carry ``generation_config.max_new_tokens = 256``, which wins over lm-eval's
``max_length``) ignores a task's ``max_gen_toks``; the lm-eval side clears it so both sides use the task's budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# siblings (scripts/ is the script's path): the random model writer, and the records whose requests
# scripts/eval_preset_agreement.py checks
from eval_agreement import make_random
from eval_preset_agreement import BBH_TEST, GSM8K_TEST, GSM8K_TRAIN, _jsonl


def tasks_of(tmp: Path, args) -> list[tuple[str, dict, dict]]:
    """(name, lm-eval task config over the local files, moxin task) per task compared."""
    import lm_eval

    try:  # lm-eval >= 0.4.10
        from lm_eval.tasks._yaml_loader import load_yaml

        def load_yaml_config(path, mode="full"):
            return load_yaml(path)
    except ImportError:
        from lm_eval.utils import load_yaml_config

    tdir = Path(lm_eval.__file__).parent / "tasks"
    out = []
    files = {"train": _jsonl(tmp / "gsm8k_train.jsonl", GSM8K_TRAIN),
             "test": _jsonl(tmp / "gsm8k_test.jsonl", GSM8K_TEST * args.repeat)}
    cfg = load_yaml_config(str(tdir / "gsm8k" / "gsm8k.yaml"), mode="full")
    out.append(("gsm8k", cfg | {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}},
                {"name": "gsm8k", "preset": "gsm8k", "path": files["test"], "fewshot_path": files["train"],
                 "num_fewshot": args.num_fewshot}))
    for sub, rows in BBH_TEST.items():
        cfg = load_yaml_config(str(tdir / "bbh" / "cot_fewshot" / f"{sub}.yaml"), mode="full")
        path = _jsonl(tmp / f"bbh_{sub}.jsonl", [r | {"subtask": sub} for r in rows * args.repeat])
        out.append((f"bbh_cot_fewshot_{sub}",
                    cfg | {"dataset_path": "json", "dataset_name": None,
                           "dataset_kwargs": {"data_files": {"test": path}}},
                    {"name": f"bbh_cot_fewshot_{sub}", "preset": "bbh_cot_fewshot", "path": path}))
    for _, lm_cfg, ours in out:
        lm_cfg.pop("include", None)
        lm_cfg.pop("tag", None)
        lm_cfg.pop("group", None)
        if args.max_gen_toks:
            lm_cfg["generation_kwargs"] = {**lm_cfg["generation_kwargs"], "max_gen_toks": args.max_gen_toks}
            ours["max_new_tokens"] = args.max_gen_toks
    return out


def run_lmeval(args, tasks) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=args.hf, tokenizer=args.hf, add_bos_token=True, dtype=args.dtype, device=args.device,
              batch_size=args.batch_size)
    # transformers 5 gives every model a generation_config.max_new_tokens (256), which wins over the max_length
    # lm-eval passes, so a task's max_gen_toks would be ignored (BBH's 1024 capped at 256, a smaller one exceeded)
    lm.model.generation_config.max_new_tokens = None
    seconds = [0.0]
    inner = lm.generate_until

    def timed(requests, *a, **kw):  # tokenization + decoding, as moxin's items/s counts
        t = time.perf_counter()
        out = inner(requests, *a, **kw)
        seconds[0] += time.perf_counter() - t
        return out

    lm.generate_until = timed
    out = {}
    for name, cfg, ours in tasks:
        seconds[0] = 0.0
        res = lm_eval.simple_evaluate(model=lm, tasks=[cfg], num_fewshot=ours.get("num_fewshot"), log_samples=True,
                                      fewshot_random_seed=1234, bootstrap_iters=0)
        docs: dict[int, dict] = {}
        for smp in res["samples"][cfg["task"]]:  # one sample per document and filter
            d = docs.setdefault(smp["doc_id"], {"completion": smp["resps"][0][0], "scores": {}})
            d["scores"][f"exact_match,{smp['filter']}"] = float(smp["exact_match"])
        out[name] = {"completions": [docs[i]["completion"] for i in sorted(docs)],
                     "scores": [docs[i]["scores"] for i in sorted(docs)],
                     "metrics": {k: float(v) for k, v in res["results"][cfg["task"]].items()
                                 if k.startswith("exact_match,")},
                     "items_per_s": len(docs) / max(seconds[0], 1e-9)}
    return out


def run_moxin(args, tasks) -> dict:
    import torch

    from moxin.eval.runner import evaluate
    from moxin.model.hf import load_hf
    from moxin.tokenizer import load_tokenizer

    model = load_hf(args.hf, attn_backend="sdpa").to(device=args.device, dtype=getattr(torch, args.dtype)).eval()
    tok = load_tokenizer(args.hf)
    out = {}
    for name, _, ours in tasks:
        res = evaluate(model, tok, {"tasks": [ours], "verifier_workers": 0, "gen_batch_size": 64})["tasks"][name]
        out[name] = {"completions": [x["greedy"] for x in res["items"]], "answers": [x["answer"] for x in res["items"]],
                     "metrics": {k: v for k, v in res["metrics"].items()
                                 if k.startswith("exact_match,") and "_stderr" not in k},
                     "items_per_s": res["items_per_s"], "finished": [x["greedy_finished"] for x in res["items"]]}
    return out


def moxin_scores(name: str, completions: list[str], answers: list[str]) -> dict[str, list[float]]:
    """moxin's scorers on the given (already cut) completions, per lm-eval metric name."""
    from moxin.eval.scoring import gsm8k_scores
    from moxin.rewards import get_verifier

    if name == "gsm8k":
        per = [gsm8k_scores(c, a) for c, a in zip(completions, answers)]
        return {k: [p[k] for p in per] for k in per[0]}
    v = get_verifier("bbh")
    return {"exact_match,get-answer": [v(c, a).score for c, a in zip(completions, answers)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="Hugging Face MistralForCausalLM folder")
    ap.add_argument("--make-random", default=None, metavar="PRESET", help="write a random model of PRESET to --hf "
                    "when it has no config.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-fewshot", type=int, default=5, help="gsm8k's shots (bbh: its 3 fixed examples)")
    ap.add_argument("--max-gen-toks", type=int, default=None, help="both sides' token budget (default: the tasks')")
    ap.add_argument("--repeat", type=int, default=1, help="copies of the test records (throughput)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", default="16", help="lm-eval batch size")
    ap.add_argument("--tasks", default=None, help="comma-separated task names to compare (default: all: gsm8k "
                    "and the bbh_cot_fewshot_* subtasks)")
    ap.add_argument("--out", default=None, help="write both sides' completions and scores here (json)")
    args = ap.parse_args(argv)
    if args.make_random and not Path(args.hf, "config.json").is_file():
        make_random(args.make_random, args.hf, args.seed, windowless=True)
    args.hf = str(Path(args.hf).resolve())
    with tempfile.TemporaryDirectory() as d:
        tasks = tasks_of(Path(d), args)
        if args.tasks:
            wanted = args.tasks.split(",")
            unknown = sorted(set(wanted) - {t[0] for t in tasks})
            if unknown:
                ap.error(f"--tasks: unknown {unknown}; choose from {[t[0] for t in tasks]}")
            tasks = [t for t in tasks if t[0] in wanted]
        lm = run_lmeval(args, tasks)
        mx = run_moxin(args, tasks)
    bad = 0
    report = {}
    for name, *_ in tasks:
        a, b = lm[name], mx[name]
        same = sum(x == y for x, y in zip(a["completions"], b["completions"]))
        ours = moxin_scores(name, a["completions"], b["answers"])  # moxin's scorers on lm-eval's completions
        differ = [(i, k) for k, v in ours.items() for i, x in enumerate(v) if x != a["scores"][i][k]]
        bad += len(differ)
        report[name] = {"items": len(b["completions"]), "same_completion": same, "lm_eval": a["metrics"],
                        "moxin": b["metrics"], "score_differences": differ,
                        "lm_eval_items_per_s": a["items_per_s"], "moxin_items_per_s": b["items_per_s"],
                        "moxin_stopped": sum(b["finished"])}
        print(f"{name}: {same}/{len(b['completions'])} completions identical; lm-eval {a['metrics']}, moxin "
              f"{b['metrics']}; moxin's scorer on lm-eval's completions: "
              f"{'the same score on every item' if not differ else f'{len(differ)} DIFFERENT'}; items/s lm-eval "
              f"{a['items_per_s']:.2f}, moxin {b['items_per_s']:.2f}; moxin rows stopped by eos or a stop string "
              f"{sum(b['finished'])}")
        for i, (x, y) in enumerate(zip(a["completions"], b["completions"])):
            if x != y:
                print(f"  item {i} differs:\n    lm-eval {x[:160]!r}\n    moxin   {y[:160]!r}")
    if args.out:
        Path(args.out).write_text(json.dumps({"report": report, "lm_eval": lm, "moxin": mx}, indent=1, default=str))
    print("scores on the same completions: all equal" if not bad else f"scores differ on {bad} item(s)")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
