"""MathVerifier: final-answer equality for math problems, via Hugging Face's ``math-verify`` (LaTeX -> SymPy).

This is Moxin's GRPO reward: 1 if the final answer checks out as equal to the reference (``1/2``, ``0.5`` and
``\\frac{1}{2}`` all match), else 0.

math-verify guards its own parsing and comparison with ``signal.alarm``, which only works on the main thread of
the main interpreter. We switch those timeouts off (``parsing_timeout=None``, ``timeout_seconds=None``) and rely on
:func:`moxin.rewards.base.score_batch`, which runs each check in a worker process with a deadline and kills it on
overrun. Do not call a MathVerifier directly on the trainer's thread with untrusted completions: a pathological
expression can make SymPy run for a very long time.
"""

from __future__ import annotations

from dataclasses import dataclass

from moxin.rewards.base import CORRECT, NO_ANSWER, WRONG, RewardResult
from moxin.rewards.extract import extract_or_no_answer

__all__ = ["MathVerifier", "grade_answer"]


def _math_verify():
    try:
        import math_verify  # on first use: it pulls in SymPy (see moxin.rewards._math)
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as exc:  # pragma: no cover - exercised only without the package
        raise ImportError(
            "MathVerifier needs the 'math-verify' package: pip install math-verify "
            "(it is a moxin dependency; check your environment)"
        ) from exc
    # We disable math-verify's signal-based timeouts on purpose (see the module docstring); silence the
    # one-time warning it would print in every worker process about it.
    for mod_name in ("math_verify.parser", "math_verify.grader"):
        mod = getattr(math_verify, mod_name.split(".")[1], None)
        if mod is not None and hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    return parse, verify, [LatexExtractionConfig(), ExprExtractionConfig()]


def _as_latex(s: str) -> str:
    """Wrap a bare expression in ``$...$`` so math-verify reads it as LaTeX (``\\frac``, ``\\sqrt`` ...)."""
    s = s.strip()
    if "$" in s or "\\boxed" in s or "\\(" in s or "\\[" in s:
        return s
    return f"${s}$"


@dataclass
class MathVerifier:
    """Reward 1.0 if the completion's final answer equals the reference mathematically, else 0.0.

    Extraction (from the completion): the LAST ``\\boxed{...}`` (nested braces handled); else the last
    "answer is X" / "Answer: X"; else, if ``number_fallback``, the last number in the text. An unclosed
    ``\\boxed{`` or no answer at all gives reason ``no_answer``.

    Args:
        number_fallback: take the last number when there is no boxed answer or answer phrase. Convenient for small
            models; for reasoning models that must box their answer, set False so a stray number in the reasoning
            is not rewarded.
        float_rounding: decimal places math-verify rounds floats to before comparing.
    """

    number_fallback: bool = True
    float_rounding: int = 6

    def __post_init__(self) -> None:
        _math_verify()  # fail at construction, on the trainer, if the package is missing

    def __call__(self, completion: str, reference: str) -> RewardResult:
        extracted, no_answer = extract_or_no_answer(completion, self.number_fallback)
        if no_answer is not None:
            return no_answer
        return grade_answer(extracted, reference, self.float_rounding)


def grade_answer(extracted: str, reference: str, float_rounding: int = 6, correct: float = 1.0,
                 wrong: float = 0.0) -> RewardResult:
    """math-verify's verdict on an extracted answer against the reference: ``correct`` if equal, else ``wrong``
    (an unparseable answer is ``no_answer`` with score ``wrong``; an unparseable reference an ``error``)."""
    parse, verify, config = _math_verify()
    gold = parse(_as_latex(reference), config, parsing_timeout=None)
    if not gold:
        return RewardResult(wrong, "error", extracted, error=f"could not parse the reference answer {reference!r}")
    pred = parse(_as_latex(extracted), config, parsing_timeout=None)
    if not pred:
        return RewardResult(wrong, f"{NO_ANSWER}; unparseable answer", extracted)
    ok = verify(gold, pred, float_rounding=float_rounding, timeout_seconds=None)
    return RewardResult(correct, CORRECT, extracted) if ok else RewardResult(wrong, WRONG, extracted)
