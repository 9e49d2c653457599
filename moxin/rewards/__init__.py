"""Verifiers behind one interface: ``verifier(completion, reference) -> RewardResult``.

    from moxin.rewards import get_verifier, score_batch
    results, stats = score_batch(get_verifier("math"), completions, answers, timeout_s=10)

Configs name verifiers by string (:func:`get_verifier`): ``"math"`` (math-verify equality, with answer-phrase and last-number fallbacks),
``"deepscaler"`` (DeepScaleR's reward: the last ``\\boxed{}`` after ``</think>``, math-verify equality, no fallback;
Moxin-Reasoning's), ``"exact"`` (exact final answer, for the built-in arithmetic task), ``"format"`` (answer-form
reward); the evaluation scorers of moxin/eval/scoring.py: ``"gsm8k"`` (lm-eval's exact_match, kwarg
``filter_name``), ``"qwen_math"`` (Qwen2.5-Math's answer extraction + math-verify), ``"humaneval"`` (tests run in
the sandbox), ``"bbh"`` (lm-eval bbh_cot_fewshot's get-answer exact match), ``"mmlu_cot"`` (OLMES's MMLU CoT
letter), ``"popqa"`` (a possible answer in the first line).
"""

from __future__ import annotations

from typing import Any, Callable

from moxin.rewards.base import RewardResult, Verifier, score_batch, shutdown_pools
from moxin.rewards.exact import ExactAnswerVerifier
from moxin.rewards.format import CombinedVerifier, FormatVerifier

__all__ = [
    "RewardResult",
    "Verifier",
    "score_batch",
    "shutdown_pools",
    "MathVerifier",
    "DeepScaleRVerifier",
    "ExactAnswerVerifier",
    "FormatVerifier",
    "CombinedVerifier",
    "VERIFIERS",
    "get_verifier",
]


def _math(**kwargs: Any) -> Verifier:
    from moxin.rewards.math import MathVerifier  # imports math-verify (and SymPy) only when asked for

    return MathVerifier(**kwargs)


def _deepscaler(**kwargs: Any) -> Verifier:
    from moxin.rewards.deepscaler import DeepScaleRVerifier  # math-verify (and SymPy) only when asked for

    return DeepScaleRVerifier(**kwargs)


def _gsm8k(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import GSM8KVerifier  # the eval scorers import math-verify

    return GSM8KVerifier(**kwargs)


def _qwen_math(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import MathAnswerVerifier

    return MathAnswerVerifier(**kwargs)


def _humaneval(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import HumanEvalVerifier

    return HumanEvalVerifier(**kwargs)


def _bbh(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import BBHVerifier

    return BBHVerifier(**kwargs)


def _mmlu_cot(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import MMLUCoTVerifier

    return MMLUCoTVerifier(**kwargs)


def _popqa(**kwargs: Any) -> Verifier:
    from moxin.eval.scoring import PopQAVerifier

    return PopQAVerifier(**kwargs)


VERIFIERS: dict[str, Callable[..., Verifier]] = {
    "math": _math,
    "deepscaler": _deepscaler,
    "gsm8k": _gsm8k,
    "qwen_math": _qwen_math,
    "humaneval": _humaneval,
    "bbh": _bbh,
    "mmlu_cot": _mmlu_cot,
    "popqa": _popqa,
    "exact": ExactAnswerVerifier,
    "format": FormatVerifier,
}


def get_verifier(name: str, **kwargs: Any) -> Verifier:
    """Build a verifier by name (``"math"``, ``"deepscaler"``, ``"exact"``, ``"format"``); kwargs go to its
    constructor."""
    try:
        factory = VERIFIERS[name]
    except KeyError:
        raise KeyError(f"unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}") from None
    return factory(**kwargs)


def __getattr__(name: str) -> Any:  # lazy math verifiers, so `import moxin.rewards` does not pull in SymPy
    if name == "MathVerifier":
        from moxin.rewards.math import MathVerifier

        return MathVerifier
    if name == "DeepScaleRVerifier":
        from moxin.rewards.deepscaler import DeepScaleRVerifier

        return DeepScaleRVerifier
    raise AttributeError(f"module 'moxin.rewards' has no attribute {name!r}")
