"""Context-length phases of pretraining: each is one Lightning epoch with its own sequence length, token budget
and source mixture (PretrainDataModule plans steps and rows per micro-batch from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moxin.config import config_fields

__all__ = ["Phase"]


@dataclass
class Phase:
    """One context-length phase.

    Args:
        name: shown in logs and checkpoints (``ctx2k``, ``ctx4k``, ``anneal`` ...).
        seq_len: tokens per packed row in this phase (<= the model's ``max_seq_len``; must divide
            ``micro_batch_tokens``).
        tokens: token budget of the phase; steps = tokens // tokens_per_step (the remainder is not trained).
        mixture: source name -> weight (per document; normalised; 0 leaves a source out).
    """

    name: str
    seq_len: int
    tokens: int
    mixture: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_any(cls, obj: Any) -> "Phase":
        if isinstance(obj, Phase):
            return obj
        obj = config_fields(cls, obj, "phase", ("name", "seq_len", "tokens"))
        return cls(str(obj["name"]), int(obj["seq_len"]), int(float(obj["tokens"])), dict(obj.get("mixture") or {}))

