"""The one bad-record counter of every stage's data: records read, bad ones by kind (with the first few
``location: reason``), empty texts, records kept; and the limits past which a run stops.

Bad records are counted and reported, never silently dropped; past ``max_bad_records`` or ``max_bad_fraction``
the run stops with a :class:`DataError` naming the first bad locations and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moxin.config import DataError
from moxin.data.reader import Bad

__all__ = ["RecordStats"]

_BAD_EXAMPLES = 5


@dataclass
class RecordStats:
    """Counts of one reader or data set (``records`` includes the bad and empty ones)."""

    records: int = 0
    bad: int = 0
    empty: int = 0
    kept: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    bad_examples: list[str] = field(default_factory=list)

    def add_bad(self, where: str, bad: Bad) -> None:
        self.bad += 1
        self.reasons[bad.kind] = self.reasons.get(bad.kind, 0) + 1
        if len(self.bad_examples) < _BAD_EXAMPLES:
            self.bad_examples.append(f"{where}: {bad.reason}")

    def check(self, what: str, max_bad_records: int | None, max_bad_fraction: float, fix: str,
              final: bool = False) -> None:
        """Raise DataError past the limits: more than ``max_bad_records`` (None: no count limit), or a bad share
        above ``max_bad_fraction`` once 100 records are read (at the ``final`` check: whatever was read)."""
        too_many = max_bad_records is not None and self.bad > max_bad_records
        too_frac = (final or self.records >= 100) and self.records and self.bad > max_bad_fraction * self.records
        if too_many or too_frac:
            limits = f"max_bad_fraction={max_bad_fraction}"
            if max_bad_records is not None:
                limits = f"max_bad_records={max_bad_records}, {limits}"
            raise DataError(f"{what}: {self.bad} bad records out of {self.records} read ({self.reasons}; limits: "
                            f"{limits}); first ones: {self.bad_examples}. {fix}")

    def merge(self, other: "RecordStats") -> None:
        self.records += other.records
        self.bad += other.bad
        self.empty += other.empty
        self.kept += other.kept
        for kind, n in other.reasons.items():
            self.reasons[kind] = self.reasons.get(kind, 0) + n
        self.bad_examples.extend(other.bad_examples[:max(0, _BAD_EXAMPLES - len(self.bad_examples))])

    def to_dict(self) -> dict:
        return {"records": self.records, "bad": self.bad, "empty": self.empty, "kept": self.kept,
                "bad_by_kind": dict(self.reasons), "bad_examples": list(self.bad_examples)}

    @classmethod
    def from_dict(cls, d: dict) -> "RecordStats":
        """The inverse of :meth:`to_dict` (missing keys are 0: reader states saved before they existed)."""
        return cls(int(d.get("records", 0)), int(d.get("bad", 0)), int(d.get("empty", 0)), int(d.get("kept", 0)),
                   dict(d.get("bad_by_kind", {})), list(d.get("bad_examples", [])))
