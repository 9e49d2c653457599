"""Answer extraction shared by the verifiers: the last ``\\boxed{...}``, an "answer is X" phrase, the last number."""

from __future__ import annotations

import re

from moxin.rewards.base import NO_ANSWER, RewardResult

__all__ = ["MalformedAnswer", "last_boxed", "answer_phrase", "last_number", "extract_answer"]


class MalformedAnswer(ValueError):
    """The completion tried to give a final answer (``\\boxed{``) but it is not well formed."""


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# "the answer is X", "final answer: X", "Answer: X" -- X runs to the end of the line.
_PHRASE = re.compile(r"(?:final\s+answer|answer)\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the LAST ``\\boxed{...}`` (or ``\\fbox{...}``), nested braces handled.

    Returns None if there is no ``\\boxed{``. Raises :class:`MalformedAnswer` if the last one is never closed
    (a truncated or broken answer must not fall back to some earlier number).
    """
    matches = list(_BOXED.finditer(text))
    if not matches:
        return None
    start = matches[-1].end()
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{" and text[i - 1] != "\\":
            depth += 1
        elif ch == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    raise MalformedAnswer("unbalanced braces in the last \\boxed{...}")


def answer_phrase(text: str) -> str | None:
    """X from the last "answer is X" / "Answer: X" phrase, trimmed of ``$``, trailing period and spaces."""
    matches = list(_PHRASE.finditer(text))
    if not matches:
        return None
    value = matches[-1].group(1).strip()
    value = value.strip("$ ").rstrip(".").strip().strip("$ ")
    return value or None


def last_number(text: str) -> str | None:
    """The last number in the text (integer, decimal, or a/b), commas removed."""
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    return re.sub(r"[\s,]", "", matches[-1])


def extract_answer(text: str, number_fallback: bool = True) -> str | None:
    """The final answer: last ``\\boxed{}``, else the last "answer is X", else (optionally) the last number.

    Returns None when nothing answer-like is found. Raises :class:`MalformedAnswer` for an unclosed ``\\boxed{``.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed or None
    phrase = answer_phrase(text)
    if phrase is not None:
        return phrase
    return last_number(text) if number_fallback else None


def extract_or_no_answer(completion: str, number_fallback: bool):
    """``(answer, None)``, or ``(None, RewardResult(0, "no_answer..."))`` when the completion has no answer or a
    malformed one: the common first step of every answer-checking verifier."""
    try:
        extracted = extract_answer(completion, number_fallback=number_fallback)
    except MalformedAnswer as exc:
        return None, RewardResult(0.0, f"{NO_ANSWER}; {exc}")
    if extracted is None:
        return None, RewardResult(0.0, NO_ANSWER)
    return extracted, None
