"""A built-in procedural task with exact answers: small arithmetic, learnable by a tiny model on a CPU.

The CPU GRPO demo and the tests draw their prompts from it (moxin/data/grpo_data.py): a short SFT on
:func:`solution_text` teaches the answer format, then GRPO with ``moxin.rewards.ExactAnswerVerifier`` should raise
the mean reward within minutes.

    >>> task = ArithmeticTask(seed=0)
    >>> p = task.sample(1)[0]            # {"prompt": "What is 37 + 48?", "answer": "85"}
    >>> solution_text(p)                 # "37 + 48 = 85. Answer: 85"
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

__all__ = ["ArithmeticTask", "solution_text"]

_OPS = ("+", "-")
_PROMPT = re.compile(r"What is (\d+) ([+\-]) (\d+)\?")


@dataclass
class ArithmeticTask:
    """Problems "What is A op B?" with A, B of ``min_digits``..``max_digits`` digits and op in ``ops``.

    Deterministic: problem ``i`` depends only on ``(seed, i)``. Subtraction puts the larger operand first, so
    every answer is a non-negative integer. Keep digits small (1-2): with 3+ digits a tiny model needs far more
    than minutes.

    ``max_operand``: the largest operand (None: ``10**max_digits - 1``); operands are then uniform over
    ``[smallest min_digits-digit number, max_operand]`` instead of a digit count first. E.g. ``max_digits=2,
    max_operand=19``: 400 sums of 0..19 whose units digits are the one-digit sums' table, so what a policy learns on
    some problems could carry over to others (tried for the CPU GRPO demo: its 200-step warm-up reaches only
    0.1-0.15 there; docs/performance.md).

    ``heldout``: the fraction of the distinct problems (chosen by a hash of the seed and the prompt) that
    :meth:`problem` never returns and :meth:`heldout_problems` only returns: an evaluation set that neither RL
    nor the SFT warm-up ever trains on, whatever their index ranges (with 1-digit operands there are only 100
    sums, so disjoint index ranges alone still repeat the same problems). 0: no reserved part (index ranges
    are then the only split).
    """

    seed: int = 0
    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = _OPS
    heldout: float = 0.0
    max_operand: int | None = None

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        bad = [op for op in self.ops if op not in _OPS]
        if bad or not self.ops:
            raise ValueError(f"ArithmeticTask ops must be a non-empty subset of {_OPS}, got {self.ops}")
        if not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got min_digits={self.min_digits}, max_digits={self.max_digits}"
            )
        if self.max_operand is not None and not self.min_digits <= len(str(self.max_operand)) <= self.max_digits:
            raise ValueError(f"ArithmeticTask max_operand={self.max_operand} must have between min_digits="
                             f"{self.min_digits} and max_digits={self.max_digits} digits")
        if not 0.0 <= self.heldout < 1.0:
            raise ValueError(f"ArithmeticTask heldout is the reserved fraction of the problems, in [0, 1); "
                             f"got {self.heldout}")

    def _low(self) -> int:
        """The smallest operand."""
        return 0 if self.min_digits == 1 else 10 ** (self.min_digits - 1)

    def _operand(self, rng: random.Random) -> int:
        if self.max_operand is not None:
            return rng.randint(self._low(), self.max_operand)
        digits = rng.randint(self.min_digits, self.max_digits)
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return rng.randint(low, 10**digits - 1)

    def is_heldout(self, prompt: str) -> bool:
        """Whether ``prompt`` is in the reserved held-out part (always False with ``heldout`` 0)."""
        if not self.heldout:
            return False
        h = hashlib.sha256(f"moxin-arith-heldout/{self.seed}/{prompt}".encode()).digest()
        return int.from_bytes(h[:8], "big") < self.heldout * 2**64

    def _draw(self, index: int, heldout: bool) -> dict[str, str]:
        """The first draw of ``index``'s sequence of problems on the requested side of the held-out split."""
        for k in range(10_000):
            key = f"moxin-arith/{self.seed}/{index}" + (f"/{k}" if k else "")
            rng = random.Random(key)  # str seeds hash deterministically (sha512)
            a, b = self._operand(rng), self._operand(rng)
            op = rng.choice(self.ops)
            if op == "-" and b > a:
                a, b = b, a
            answer = a + b if op == "+" else a - b
            p = {"prompt": f"What is {a} {op} {b}?", "answer": str(answer)}
            if self.is_heldout(p["prompt"]) == heldout:
                return p
        raise ValueError(f"ArithmeticTask heldout={self.heldout}: no {'held-out' if heldout else 'training'} problem "
                         f"in 10000 draws; the problem space (digits {self.min_digits}-{self.max_digits}, ops "
                         f"{list(self.ops)}) is too small for that fraction")

    def problem(self, index: int) -> dict[str, str]:
        """Training problem number ``index``: ``{"prompt": "What is 37 + 48?", "answer": "85"}`` (never one of the
        held-out part)."""
        return self._draw(index, heldout=False)

    def heldout_problems(self, n: int) -> list[dict[str, str]]:
        """Up to ``n`` distinct problems of the held-out part, drawn as training problems are drawn (the same mix of
        operand sizes and ops), in a fixed seeded order; the first ``k`` of ``n`` are the ``k`` asked for alone
        (needs ``heldout`` > 0). Fewer when the part is smaller (with small operands all of it: ``heldout`` x
        the number of distinct problems, e.g. about 25 of the 100 one-digit sums at 0.25)."""
        if not self.heldout:
            raise ValueError("ArithmeticTask.heldout_problems needs heldout > 0 (no problem is reserved)")
        size = self._heldout_size()
        out, seen = [], set()
        for i in range(1000 * n):
            if len(out) == n or len(out) == size:
                break
            p = self._draw(2 * 10**7 + i, heldout=True)
            if p["prompt"] not in seen:
                seen.add(p["prompt"])
                out.append(p)
        return out

    def _heldout_size(self) -> int | None:
        """How many distinct problems the held-out part has, counted where they are few (operands below 100),
        else None."""
        high = self.max_operand if self.max_operand is not None else 10**self.max_digits - 1
        if high >= 100:
            return None
        vals = [v for v in range(self._low(), high + 1) if self._digits_ok(v)]
        return sum(self.is_heldout(f"What is {a} {op} {b}?") for op in self.ops for a in vals for b in vals
                   if op == "+" or a >= b)

    def _digits_ok(self, x: int) -> bool:
        """Whether ``x`` has between ``min_digits`` and ``max_digits`` digits (as :meth:`_operand` draws them)."""
        return self.min_digits <= len(str(x)) <= self.max_digits

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
