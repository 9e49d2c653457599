"""Weighted mixture of sources: a seeded RNG picks the source of the next *document*.

Weights are per document (not per token): a source of long documents gets more tokens than its weight says.
Weights need not sum to 1 (they are normalised); a weight of 0 leaves a source out of that phase.
The state (``random.Random`` state + number of draws) is checkpointable and restores the exact sequence.
"""

from __future__ import annotations

import bisect
import math
import random
from typing import Iterable, Mapping

from moxin.config import DataError

__all__ = ["validate_weights", "Mixture"]


def validate_weights(weights: Mapping[str, float], known: Iterable[str], where: str) -> dict[str, float]:
    """Check and normalise mixture weights. ``where`` names the config place (e.g. ``phase 'ctx2k'``).

    Errors: empty mapping, unknown source names, non-numeric / negative / non-finite weights, all zero.
    """
    known = list(known)
    if not weights:
        raise DataError(f"{where}: the mixture is empty; give a weight for at least one of the sources {known}")
    out = {}
    for name, w in weights.items():
        if name not in known:
            raise DataError(f"{where}: mixture names unknown source {name!r}; known sources: {known}")
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise DataError(f"{where}: mixture weight of {name!r} is {w!r}, not a number") from None
        if not math.isfinite(w) or w < 0:
            raise DataError(f"{where}: mixture weight of {name!r} is {w}; weights must be finite and >= 0")
        out[name] = w
    total = sum(out.values())
    if total <= 0:
        raise DataError(f"{where}: all mixture weights are zero ({out}); give at least one source a positive weight")
    return {n: w / total for n, w in out.items() if w > 0}


class Mixture:
    """``choose()`` returns the next source name, distributed as ``weights``."""

    def __init__(self, weights: Mapping[str, float], seed: int, where: str = "mixture"):
        self.weights = validate_weights(weights, list(weights), where)
        self.names = list(self.weights)
        cum, acc = [], 0.0
        for n in self.names:
            acc += self.weights[n]
            cum.append(acc)
        cum[-1] = 1.0
        self._cum = cum
        self._rng = random.Random(seed)
        self.draws = 0

    def choose(self) -> str:
        self.draws += 1
        if len(self.names) == 1:
            return self.names[0]
        return self.names[bisect.bisect_right(self._cum, self._rng.random())]

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"weights": dict(self.weights), "rng": [version, list(internal), gauss], "draws": self.draws}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self.draws = int(state["draws"])
