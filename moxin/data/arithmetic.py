"""A built-in procedural task with exact answers: small arithmetic, learnable by a tiny model on a CPU.

The CPU GRPO demo and the tests draw their prompts from it (moxin/data/grpo_data.py): a short SFT on
:func:`solution_text` teaches the answer format, then GRPO with ``moxin.rewards.ExactAnswerVerifier`` should raise
the mean reward within minutes.

    >>> task = ArithmeticTask(seed=0)
    >>> p = task.sample(1)[0]            # {"prompt": "What is 37 + 48?", "answer": "85"}
    >>> solution_text(p)                 # "37 + 48 = 85. Answer: 85"
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

__all__ = ["ArithmeticTask", "solution_text"]

_OPS = ("+", "-")
_PROMPT = re.compile(r"What is (\d+) ([+\-]) (\d+)\?")


@dataclass
class ArithmeticTask:
    """Problems "What is A op B?" with A, B of ``min_digits``..``max_digits`` digits and op in ``ops``.

    Deterministic: problem ``i`` depends only on ``(seed, i)``, so train/eval splits are just disjoint index
    ranges (``sample(n, start=...)``). Subtraction puts the larger operand first, so every answer is a
    non-negative integer. Keep digits small (1-2): with 3+ digits a tiny model needs far more than minutes.
    """

    seed: int = 0
    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = _OPS

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        bad = [op for op in self.ops if op not in _OPS]
        if bad or not self.ops:
            raise ValueError(f"ArithmeticTask ops must be a non-empty subset of {_OPS}, got {self.ops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={self.min_digits}, max_digits={self.max_digits}"
            )

    def _operand(self, rng: random.Random) -> int:
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def problem(self, index: int) -> dict[str, str]:
        """Problem number ``index``: ``{"prompt": "What is 37 + 48?", "answer": "85"}``."""
        rng = random.Random(f"moxin-arith/{self.seed}/{index}")  # str seeds hash deterministically (sha512)
        a, b = self._operand(rng), self._operand(rng)
        op = rng.choice(self.ops)
        if op == "-" and b > a:
            a, b = b, a
        answer = a + b if op == "+" else a - b
        return {"prompt": f"What is {a} {op} {b}?", "answer": str(answer)}

    def sample(self, n: int, start: int = 0) -> list[dict[str, str]]:
        """Problems ``start .. start + n - 1``."""
        return [self.problem(i) for i in range(start, start + n)]


def solution_text(problem: dict[str, str], style: str = "worked") -> str:
    """A short correct answer in a fixed format ending in the answer.

    ``style="worked"``: ``"37 + 48 = 85. Answer: 85"``; ``style="answer"``: ``"Answer: 85"`` (the answer alone:
    a tiny model learns the form in a few dozen steps without having to learn to copy the operands).
    The SFT warm-up trains on these, so GRPO starts from a model that already answers in the form
    ``moxin.rewards.ExactAnswerVerifier`` and :class:`moxin.rewards.format.FormatVerifier` expect.
    """
    if style not in ("worked", "answer"):
        raise ValueError(f"solution style must be 'worked' or 'answer', got {style!r}")
    if style == "answer":
        return f"Answer: {problem['answer']}"
    m = _PROMPT.fullmatch(problem["prompt"].strip())
    if m is None:
        raise ValueError(f"not an ArithmeticTask prompt: {problem['prompt']!r} (expected 'What is A + B?')")
    a, op, b = m.groups()
    return f"{a} {op} {b} = {problem['answer']}. Answer: {problem['answer']}"
