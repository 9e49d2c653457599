"""Run evaluation tasks on a model: items split across ranks, results gathered, a table, ``eval.json``.

    results = evaluate(model, tokenizer, EvalConfig(tasks=[...]))      # any process group, or none
    print_table(results); write_results(results, "runs/x/eval.json")

Distributed: rank r scores items r, r + world, ... of every task; per-item results are gathered to every rank
(``all_gather_object``) and the metrics computed from all of them, so every rank returns the same numbers.
Under FSDP2 the forwards are collective: ``lockstep=True`` makes every rank run the same number of them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.table import Table

from moxin.config import EvalConfig, TaskConfig, TaskKind
from moxin.distributed import rank_and_world
from moxin.eval.generation import generate_all, score_texts
from moxin.eval.metrics import pass_at_k
from moxin.eval.loglik import encode_pairs, loglikelihoods
from moxin.eval.scoring import truncate_at
from moxin.eval.tasks import (CHAT_EOS_TEXT, PRESET_SUBJECTS, build_gen_items, build_mc_items, eval_config,
                              task_records)
from moxin.tensor_parallel import data_rank_and_world

__all__ = ["evaluate", "print_table", "write_results", "flat_metrics", "lm_eval_results", "markdown_table"]


def _gather(obj: list, tp: int = 1) -> list:
    """Every rank's list, concatenated in rank order; of a tensor-parallel group (T consecutive ranks holding the
    same items) only its first rank's."""
    rank, world = rank_and_world()
    if world == 1:
        return obj
    parts: list = [None] * world
    dist.all_gather_object(parts, obj)
    return [x for i, p in enumerate(parts) if i % tp == 0 for x in p]


def _mean_stderr(xs: list[float]) -> tuple[float, float]:
    """Mean and lm-eval's stderr (sample standard deviation / sqrt(n))."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, float("nan")
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def _argmax(xs: list[float]) -> int:
    """First index of the maximum (np.argmax's tie rule, which lm-eval uses)."""
    return max(range(len(xs)), key=lambda j: (xs[j], -j))


def eval_multiple_choice(model, tokenizer, task: TaskConfig, cfg: EvalConfig, lockstep: bool) -> dict:
    rank, world, tp = data_rank_and_world(model)
    items = build_mc_items(task, *task_records(task))
    mine = items[rank::world]
    t0 = time.perf_counter()
    reqs = encode_pairs(tokenizer, [(c, x) for it in mine for c, x in zip(it.contexts, it.continuations)], bos=cfg.bos,
                        eos_text=CHAT_EOS_TEXT if task.chat else None)
    res = loglikelihoods(model, reqs, batch_tokens=cfg.batch_tokens, max_batch=cfg.max_batch,
                         pad_id=tokenizer.pad_id, lockstep=lockstep, share_prefixes=cfg.share_prefixes,
                         row_tokens=cfg.row_tokens)
    s = 0
    out = []
    for it in mine:
        n = len(it.contexts)
        lls = [r.logprob for r in res[s:s + n]]
        s += n
        pred = _argmax(lls)
        pred_norm = _argmax([ll / ln for ll, ln in zip(lls, it.norm_lengths)])
        acc = float(pred == it.gold) if it.labels is None else _mc2(lls, it.labels)
        out.append({"index": it.index, "gold": it.gold, "loglik": lls, "pred": pred, "pred_norm": pred_norm,
                    "acc": acc, "acc_norm": float(pred_norm == it.gold),
                    "is_greedy": [r.is_greedy for r in res[s - n:s]]} | ({"subject": it.subject} if it.subject else {}))
    out = sorted(_gather(out, tp), key=lambda r: r["index"])
    seconds = max(_gather([time.perf_counter() - t0]))
    metrics = _mc_metrics(out)
    if items and items[0].labels is not None:  # TruthfulQA MC2 reports its probability mass as acc only
        metrics = {k: v for k, v in metrics.items() if not k.startswith("acc_norm")}
    res = {"kind": task.kind.value, "n": len(out), "num_fewshot": task.num_fewshot, "seconds": seconds,
           "items_per_s": len(out) / max(seconds, 1e-9), "metrics": metrics, "items": out}
    if task.subject_field:  # lm-eval's group score is the size-weighted mean of its subjects: the mean over items
        subjects = sorted({r["subject"] for r in out})
        res["subjects"] = {s_: {"n": sum(r["subject"] == s_ for r in out),
                                "metrics": _mc_metrics([r for r in out if r["subject"] == s_])} for s_ in subjects}
        group_of = PRESET_SUBJECTS.get(task.preset or "")
        if group_of:  # lm-eval's subgroups (mmlu_stem ...): size-weighted means of their subjects
            groups = sorted({group_of[r["subject"]] for r in out})
            res["groups"] = {g: {"n": sum(group_of[r["subject"]] == g for r in out),
                                 "metrics": _mc_metrics([r for r in out if group_of[r["subject"]] == g])}
                             for g in groups}
        res["macro"] = _macro(res["subjects"])
    return res


def _macro(subjects: dict[str, dict]) -> dict[str, float]:
    """Each metric's unweighted mean over the subjects (OLMES's "macro" suite score: ``mmlu:mc::tulu``,
    ``minerva_math::tulu``), beside the size-weighted one lm-eval reports; stderr entries are left out."""
    names = [k for k, v in next(iter(subjects.values()))["metrics"].items()
             if "_stderr" not in k and isinstance(v, (int, float))]
    return {k: sum(vals) / len(vals) for k in names
            for vals in [[s["metrics"][k] for s in subjects.values() if k in s["metrics"]]]}


def _mc2(lls: list[float], labels: list[int]) -> float:
    """lm-eval truthfulqa_mc2: the true options' share of the options' probabilities (normalised stably)."""
    top = max(lls)
    probs = [math.exp(x - top) for x in lls]
    return sum(p for p, lab in zip(probs, labels) if lab == 1) / sum(probs)


def _mc_metrics(out: list[dict]) -> dict:
    acc, acc_se = _mean_stderr([r["acc"] for r in out])
    accn, accn_se = _mean_stderr([r["acc_norm"] for r in out])
    return {"acc": acc, "acc_stderr": acc_se, "acc_norm": accn, "acc_norm_stderr": accn_se}


def _decode_and_score(tokenizer, task: TaskConfig, cfg: EvalConfig, gens, answers: list[str]):
    """Completions cut at the task's stop strings, and their scores under each verifier variant (name -> results;
    name "" when the task has none)."""
    texts = [truncate_at(tokenizer.decode(g.tokens), task.until) for g in gens]
    stopped = [g.finished or len(t) < len(tokenizer.decode(g.tokens)) for g, t in zip(gens, texts)]
    timeout = task.verifier_timeout_s or cfg.verifier_timeout_s
    variants = task.verifier_variants or {"": {}}
    scores = {v: score_texts(texts, answers, task.verifier, {**task.verifier_kwargs, **(kw or {})}, timeout,
                             cfg.verifier_workers) for v, kw in variants.items()}
    return texts, stopped, scores


def eval_generation(model, tokenizer, task: TaskConfig, cfg: EvalConfig, lockstep: bool) -> dict:
    rank, world, tp = data_rank_and_world(model)
    records, fewshot = task_records(task)
    items = build_gen_items(task, records, tokenizer, fewshot)
    mine = items[rank::world]
    device = next(model.parameters()).device
    kw = dict(max_new_tokens=task.max_new_tokens, stop_tokens=(tokenizer.eos_id,), pad_id=tokenizer.pad_id,
              batch_size=cfg.gen_batch_size, lockstep=lockstep, stop_strings=tuple(task.until), tokenizer=tokenizer,
              by_length=True)
    t0 = time.perf_counter()
    per = [{"index": it.index, "answer": it.answer} | ({"subject": it.subject} if it.subject else {}) for it in mine]
    names = {v: task.metric + (f",{v}" if v else "") for v in (task.verifier_variants or {"": {}})}
    first = next(iter(names))
    if task.greedy:
        gens = generate_all(model, [it.prompt_ids for it in mine], temperature=0.0, **kw)
        texts, stopped, scores = _decode_and_score(tokenizer, task, cfg, gens, [it.answer for it in mine])
        for j, (p, g, t, st) in enumerate(zip(per, gens, texts, stopped)):
            r = scores[first][j]
            p.update(greedy=t, greedy_score=r.score, greedy_reason=r.reason, greedy_finished=st,
                     greedy_tokens=len(g.tokens))
            if task.verifier_variants:
                p["greedy_scores"] = {names[v]: scores[v][j].score for v in names}
    if task.samples:
        gen = torch.Generator(device=device)
        gen.manual_seed(task.seed * 1_000_003 + rank)  # reproducible for a given world size
        prompts = [it.prompt_ids for it in mine for _ in range(task.samples)]
        gens = generate_all(model, prompts, temperature=task.temperature, top_p=task.top_p, generator=gen, **kw)
        answers = [it.answer for it in mine for _ in range(task.samples)]
        one = {first: task.verifier_variants[first]} if task.verifier_variants else {}  # pass@k: the first variant
        texts, _, scores = _decode_and_score(tokenizer, replace(task, verifier_variants=one), cfg, gens, answers)
        sampled = scores[first]
        for j, p in enumerate(per):
            sl = slice(j * task.samples, (j + 1) * task.samples)
            p.update(samples=texts[sl], sample_scores=[r.score for r in sampled[sl]])
    per = sorted(_gather(per, tp), key=lambda r: r["index"])
    seconds = max(_gather([time.perf_counter() - t0]))
    res = {"kind": task.kind.value, "n": len(per), "num_fewshot": task.num_fewshot, "seconds": seconds,
           "items_per_s": len(per) / max(seconds, 1e-9), "samples": task.samples,
           "temperature": task.temperature if task.samples else None, "metrics": _gen_metrics(task, names, per),
           "items": per}
    if task.subject_field:  # BBH's subtasks; the group score (size-weighted, as lm-eval's) is the mean over items
        res["subjects"] = {s_: {"n": len(sub), "metrics": _gen_metrics(task, names, sub)}
                           for s_ in sorted({p["subject"] for p in per})
                           for sub in [[p for p in per if p["subject"] == s_]]}
        res["macro"] = _macro(res["subjects"])
    return res


def _gen_metrics(task: TaskConfig, names: dict[str, str], per: list[dict]) -> dict:
    """A generation task's metrics over ``per``: each variant's greedy score with its stderr, the shares without an
    answer and run into max_new_tokens, pass@k of the samples."""
    metrics = {}
    if task.greedy:
        for name in names.values():
            key = (lambda p: p["greedy_scores"][name]) if task.verifier_variants else (lambda p: p["greedy_score"])
            metrics[name], metrics[f"{name}_stderr"] = _mean_stderr([float(key(p) >= 1.0) for p in per])
        metrics["no_answer"] = sum(p["greedy_reason"].startswith("no_answer") for p in per) / max(len(per), 1)
        metrics["truncated"] = sum(not p["greedy_finished"] for p in per) / max(len(per), 1)
    if task.samples:
        for k in task.k:
            metrics[f"pass@{k}_sampled"] = sum(
                pass_at_k(task.samples, sum(s >= 1.0 for s in p["sample_scores"]), k) for p in per) / max(len(per), 1)
    return metrics


def evaluate(model, tokenizer, cfg: EvalConfig | dict, *, lockstep: bool = False) -> dict:
    """Every task of ``cfg`` on ``model``; the same dict on every rank: ``{"tasks": {name: {...}}}``."""
    cfg = eval_config(cfg)
    was_training = model.training
    model.eval()
    out: dict = {"tasks": {}, "bos": cfg.bos}
    try:
        for task in cfg.tasks:
            fn = eval_multiple_choice if task.kind == TaskKind.multiple_choice else eval_generation
            res = fn(model, tokenizer, task, cfg, lockstep)
            if not cfg.log_items:
                res.pop("items")
            res["task"] = task.preset or task.name  # lm-eval's task name where the task is a preset
            out["tasks"][task.name] = res
    finally:
        model.train(was_training)
    out.update(lm_eval_results(out))
    return out


def flat_metrics(results: dict, prefix: str = "eval") -> dict[str, float]:
    """``{"eval/<task>/<metric>": value}`` for loggers."""
    return {f"{prefix}/{name}/{k}": float(v) for name, r in results["tasks"].items() for k, v in r["metrics"].items()
            if not k.endswith("_stderr")}


def _lm_metric(k: str) -> str:
    return k if "," in k else f"{k},none"  # lm-eval's "metric,filter" keys


def lm_eval_results(results: dict) -> dict:
    """``{"results": {task: {"alias", "metric,filter": value, "metric_stderr,filter": se}}, "n-shot": {...}}`` in
    lm-eval's output shape, keyed by task name (its ``alias`` the lm-eval task); MMLU's subjects as lm-eval's
    ``mmlu_<group>`` subgroups and ``mmlu_<subject>`` subtasks after the group."""
    out: dict = {"results": {}, "n-shot": {}}
    for name, r in results["tasks"].items():
        entries = [(name, r.get("task", name), r["metrics"])]
        entries += [(f"{name}_{s}", f"{r.get('task', name)}_{s}", sub["metrics"])
                    for part in ("groups", "subjects") for s, sub in r.get(part, {}).items()]
        for key, alias, metrics in entries:
            row = {"alias": alias}
            for k, v in metrics.items():
                if k.endswith("_stderr"):
                    row[_lm_metric(k[:-len("_stderr")]).replace(",", "_stderr,", 1)] = v
                else:
                    row[_lm_metric(k)] = v
            out["results"][key] = row
            out["n-shot"][key] = r.get("num_fewshot", 0)
    return out


def markdown_table(results: dict) -> str:
    """The results as a markdown table: task, lm-eval task, n-shot, metric, value, stderr, n."""
    lines = ["| task | lm-eval task | n-shot | metric | value | stderr | n |", "|---|---|---:|---|---:|---:|---:|"]
    for name, r in results["tasks"].items():
        lm = r.get("task", name)
        parts = [(lm, r)] + [(f"{lm}_{g}", sub) for g, sub in r.get("groups", {}).items()]
        for lm_name, part in parts:  # MMLU: the group, then lm-eval's subgroups (mmlu_stem ...)
            for k, v in part["metrics"].items():
                if k.endswith("_stderr"):
                    continue
                se = part["metrics"].get(f"{k}_stderr")
                lines.append(f"| {name} | {lm_name} | {r.get('num_fewshot', 0)} | {k} | {v:.4f} | "
                             f"{'' if se is None or math.isnan(se) else f'{se:.4f}'} | {part['n']} |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, path: str | Path) -> Path:
    """``results`` as JSON at ``path`` (written whole, then renamed), and its table as markdown beside it
    (``eval.md``): one evaluation's table, or for a training run's ``{"evaluations": [...]}`` one table each."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(p)
    if "tasks" in results:
        p.with_suffix(".md").write_text(markdown_table(results))
    elif any("tasks" in r for r in results.get("evaluations", [])):
        done = [r for r in results["evaluations"] if "tasks" in r]
        p.with_suffix(".md").write_text("\n".join(f"## {r.get('when', 'evaluation')}, step {r.get('step', '?')}\n\n"
                                                  f"{markdown_table(r)}" for r in done))
    return p


def print_table(results: dict, title: str = "moxin evaluation") -> None:
    """The results as a table on the console: moxin's task name and lm-eval's, shots, items, each metric."""
    t = Table(title=title)
    for col in ("task", "lm-eval task", "shots", "n", "metric", "value", "stderr", "items/s"):
        t.add_column(col, justify="right" if col in ("shots", "n", "value", "stderr", "items/s") else "left",
                     no_wrap=True)
    for name, r in results["tasks"].items():
        first = True
        for k, v in r["metrics"].items():
            if k.endswith("_stderr"):
                continue
            se = r["metrics"].get(f"{k}_stderr")
            head = (name, r.get("task", name), str(r.get("num_fewshot", 0)), str(r["n"])) if first else ("",) * 4
            t.add_row(*head, k, f"{v:.4f}",
                      "" if se is None or math.isnan(se) else f"{se:.4f}", f"{r['items_per_s']:.1f}" if first else "")
            first = False
    Console(width=max(100, Console().width)).print(t)
