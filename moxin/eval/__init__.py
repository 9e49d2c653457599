"""Evaluation after any stage, with numbers that agree with lm-evaluation-harness.

    from moxin.eval import evaluate
    results = evaluate(model, tokenizer, {"tasks": [{"name": "arc_easy", "preset": "arc_easy"}]})

- :mod:`moxin.eval.tasks`: record loading (local jsonl / parquet, hub names), lm-eval's
  doc_to_text / doc_to_choice / doc_to_target for ARC, HellaSwag, PIQA, Winogrande, few-shot contexts.
- :mod:`moxin.eval.loglik`: lm-eval's context/continuation split and batched log-likelihoods.
- :mod:`moxin.eval.generation`: generation on the rollout engine, verifier scoring, pass@k.
- :mod:`moxin.eval.runner`: ranks split items, results gathered, table, ``eval.json``, logger metrics.
- :mod:`moxin.eval.stage`: ``python -m moxin.run +experiment=eval init_from=...``.
- :mod:`moxin.eval.heldout`: GRPO's held-out reward every N rollout steps.

Entry points in training: ``moxin.callbacks.evaluation.EvalCallback`` (``+eval=sample eval.after=stage``).
"""

from moxin.eval.generation import pass_at_k
from moxin.eval.loglik import encode_pair, loglikelihoods
from moxin.eval.runner import evaluate, flat_metrics, print_table, write_results
from moxin.eval.tasks import PRESET_DOCS, build_gen_items, build_mc_items, eval_config, load_records

__all__ = ["evaluate", "eval_config", "PRESET_DOCS", "load_records", "build_mc_items", "build_gen_items", "encode_pair", "loglikelihoods",
           "pass_at_k", "flat_metrics", "print_table", "write_results"]
