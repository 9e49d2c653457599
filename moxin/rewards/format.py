"""Format reward and weighted combinations of verifiers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moxin.rewards.base import CORRECT, WRONG, RewardResult, Verifier

__all__ = ["FormatVerifier", "CombinedVerifier"]

# The completion must END with its answer: "Answer: 85" or "\boxed{...}" (optional final period / $).
_DEFAULT_PATTERN = r"(?:Answer:\s*-?\d+(?:\.\d+)?|\\boxed\{.+\})\s*\$?\.?\s*$"


@dataclass
class FormatVerifier:
    """1.0 if the completion ends with an answer in the expected form, else 0.0 (the reference is ignored).

    ``pattern`` is a regex searched in the completion (default: ends with ``Answer: <number>`` or a ``\\boxed{}``).
    A format reward helps a cold model find the answer form; weighted too high (next to correctness), the
    policy learns to emit the form with wrong answers. Keep its weight small (~0.1) in a :class:`CombinedVerifier`.
    """

    pattern: str = _DEFAULT_PATTERN

    def __post_init__(self) -> None:
        try:
            self._re = re.compile(self.pattern, re.DOTALL)
        except re.error as exc:
            raise ValueError(f"FormatVerifier pattern {self.pattern!r} is not a valid regex: {exc}") from exc

    def __call__(self, completion: str, reference: str) -> RewardResult:
        m = self._re.search(completion)
        if m:
            return RewardResult(1.0, CORRECT, m.group(0).strip())
        return RewardResult(0.0, WRONG)


@dataclass
class CombinedVerifier:
    """Weighted sum of several verifiers' scores: ``score = sum_i w_i * score_i``.

    ``weights`` is a list of ``(verifier, weight)``; verifiers may be given by registry name ("math", "exact",
    "format"). The FIRST verifier is the primary one: its reason and extracted answer are the result's, so the
    batch stats (correct / wrong / no_answer) count correctness, and the others appear as ``; name=score``
    details. An error in any component sets ``error`` (the score still sums the components that worked).
    """

    weights: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from moxin.rewards import get_verifier  # registry lives in the package; imported late to avoid a cycle

        if not self.weights:
            raise ValueError("CombinedVerifier needs at least one (verifier, weight) pair")
        resolved = []
        for item in self.weights:
            try:
                verifier, weight = item
            except (TypeError, ValueError) as exc:
                raise ValueError(f"CombinedVerifier weights must be (verifier, weight) pairs, got {item!r}") from exc
            name = verifier if isinstance(verifier, str) else type(verifier).__name__
            verifier = get_verifier(verifier) if isinstance(verifier, str) else verifier
            resolved.append((name, verifier, float(weight)))
        self._parts: list[tuple[str, Verifier, float]] = resolved

    def __call__(self, completion: str, reference: str) -> RewardResult:
        score, details, errors = 0.0, [], []
        first: RewardResult | None = None
        for name, verifier, weight in self._parts:
            r = verifier(completion, reference)
            first = first or r
            score += weight * r.score
            details.append(f"{name}={r.score:g}")
            if r.error:
                errors.append(f"{name}: {r.error}")
        assert first is not None
        reason = first.outcome + "; " + " ".join(details)
        return RewardResult(score, reason, first.extracted, error="; ".join(errors) or None)
