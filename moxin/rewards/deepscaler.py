"""DeepScaleRVerifier: the reward of DeepScaleR-Preview (agentica-project/deepscaler, the RL recipe Moxin-Reasoning
names), graded with math-verify as :class:`moxin.rewards.math.MathVerifier` grades.

The published rule (sources and line numbers: docs/recipe.md, "GRPO: Moxin-Reasoning"):

Details: docs/modules.md, "rewards/deepscaler.py".
"""

from __future__ import annotations

from dataclasses import dataclass

from moxin.rewards.base import NO_ANSWER, RewardResult
from moxin.rewards.math import _math_verify, grade_answer

__all__ = ["DeepScaleRVerifier", "answer_region", "published_boxed"]

_BOXED, _OPEN = "\\boxed", "\\boxed{"


def answer_region(completion: str, think_end: str = "</think>") -> str | None:
    """The text after the first ``think_end`` and before a second one; None when ``think_end`` is absent."""
    parts = completion.split(think_end)
    return parts[1] if len(parts) > 1 else None


def published_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` of ``text`` as DeepScaleR reads it, or None (no ``\\boxed``, the last
    one not followed directly by ``{``, or its braces never closed). Escaped braces ``\\{ \\}`` do not count."""
    start = text.rfind(_BOXED)
    if start < 0 or not text.startswith(_OPEN, start):
        return None
    depth = 0
    for i in range(start + len(_BOXED), len(text)):
        ch = text[i]
        if ch in "{}" and text[i - 1] == "\\":
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + len(_OPEN):i]
    return None


@dataclass
class DeepScaleRVerifier:
    """DeepScaleR's math reward (module docstring): the last ``\\boxed{}`` after ``</think>``, math-verify equality.

    Args:
        think_end: the delimiter that closes the reasoning (DeepScaleR: ``</think>``).
        require_think: True (published): no ``think_end`` in the completion is a format error. False: a completion
            without one is read whole (for a model that does not emit reasoning delimiters; not DeepScaleR's rule).
        correct_reward, incorrect_reward, format_error_reward: the reward values (published: 1, 0, 0).
        float_rounding: decimal places math-verify rounds floats to before comparing.
    """

    think_end: str = "</think>"
    require_think: bool = True
    correct_reward: float = 1.0
    incorrect_reward: float = 0.0
    format_error_reward: float = 0.0
    float_rounding: int = 6

    def __post_init__(self) -> None:
        if not self.think_end:
            raise ValueError("DeepScaleRVerifier think_end must be a non-empty delimiter such as '</think>'")
        _math_verify()  # fail at construction, on the trainer, if the package is missing

    def __call__(self, completion: str, reference: str) -> RewardResult:
        region = answer_region(completion, self.think_end)
        if region is None:
            if self.require_think:
                return RewardResult(self.format_error_reward, f"{NO_ANSWER}; no {self.think_end} before the answer")
            region = completion
        answer = published_boxed(region)
        if answer is None or not answer.strip():
            return RewardResult(self.format_error_reward, f"{NO_ANSWER}; no \\boxed{{...}} answer after the reasoning")
        if _BOXED in reference:
            reference = published_boxed(reference) or reference
        return grade_answer(answer.strip(), reference, self.float_rounding, self.correct_reward, self.incorrect_reward)
