"""The exact-answer verifier: the final answer of a completion equals the reference (the built-in arithmetic task's
verifier, moxin/data/arithmetic.py)."""

from __future__ import annotations

from dataclasses import dataclass

from moxin.rewards.base import CORRECT, WRONG, RewardResult
from moxin.rewards.extract import extract_or_no_answer

__all__ = ["ExactAnswerVerifier"]


def _normalise(s: str) -> str:
    s = s.strip().strip("$").strip().rstrip(".").replace(",", "").replace(" ", "")
    try:
        return str(int(s))  # "085" -> "85", "+85" -> "85", "-0" -> "0"
    except ValueError:
        return s


@dataclass
class ExactAnswerVerifier:
    """Reward 1.0 if the extracted final answer equals the reference exactly (after trimming; integers compared
    as integers), else 0.0.

    Extraction: last ``\\boxed{...}``, else the last "Answer: X" / "answer is X", else (``number_fallback``)
    the last integer in the completion. With the fallback, "37 + 48 = 85" earns the reward even without the
    "Answer:" suffix; turn it off to demand the format.
    """

    number_fallback: bool = True

    def __call__(self, completion: str, reference: str) -> RewardResult:
        extracted, no_answer = extract_or_no_answer(completion, self.number_fallback)
        if no_answer is not None:
            return no_answer
        if _normalise(extracted) == _normalise(reference):
            return RewardResult(1.0, CORRECT, extracted)
        return RewardResult(0.0, WRONG, extracted)
