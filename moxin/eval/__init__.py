"""Evaluation after any stage, with numbers that agree with lm-evaluation-harness.

    from moxin.eval import evaluate
    results = evaluate(model, tokenizer, {"tasks": [{"name": "arc_easy", "preset": "arc_easy"}]})

- :mod:`moxin.eval.tasks`: record loading (local jsonl / parquet, hub names), the presets' record mapping
  (lm-eval's ARC, HellaSwag, PIQA, Winogrande, MMLU by subject, GSM8K, HumanEval(+); Qwen2.5-Math's MATH-500, AMC
  2023, Minerva Math, OlympiadBench), few-shot contexts.
- :mod:`moxin.eval.loglik`: lm-eval's context/continuation split and batched log-likelihoods.
- :mod:`moxin.eval.generation`: generation on the rollout engine, verifier scoring, pass@k.
- :mod:`moxin.eval.scoring` / :mod:`moxin.eval.sandbox`: generative scorers, code run in a sandboxed child.
- :mod:`moxin.eval.runner`: ranks split items, results gathered, table, ``eval.json`` (with lm-eval's
  ``results`` / ``n-shot``) and ``eval.md``, logger metrics.
- :mod:`moxin.eval.stage`: ``python -m moxin.run +experiment=eval init_from=...``.
- :mod:`moxin.eval.heldout`: GRPO's held-out reward every N rollout steps.

Entry points in training: ``moxin.callbacks.evaluation.EvalCallback`` (``+eval=sample eval.after=stage``).
"""

from moxin.eval.metrics import pass_at_k
from moxin.eval.loglik import encode_pair, loglikelihoods
from moxin.eval.runner import evaluate, flat_metrics, lm_eval_results, markdown_table, print_table, write_results
from moxin.eval.tasks import GEN_PRESET_DOCS, PRESET_DOCS, build_gen_items, build_mc_items, eval_config, load_records

__all__ = ["evaluate", "eval_config", "PRESET_DOCS", "GEN_PRESET_DOCS", "load_records", "build_mc_items",
           "build_gen_items", "encode_pair", "loglikelihoods", "pass_at_k", "flat_metrics", "print_table",
           "write_results", "lm_eval_results", "markdown_table"]
