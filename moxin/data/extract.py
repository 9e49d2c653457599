"""What each stage takes from a record, and :func:`extract_all`, which applies an extractor to every record of a
post-training set (SFT, DPO, GRPO prompts) with the bad ones counted.

Extractors return the value a stage trains on, or a :class:`Bad` naming what is wrong (a ``KeyError`` counts as a
missing field); checks take a value and return ``(kind, description)`` of what makes it unusable, or None.

* pretraining: :func:`text_of` (the document text; its size capped by ``max_record_bytes``);
* SFT: :class:`messages_from_record` (the ``messages`` list, or a ShareGPT record converted) checked by
  :func:`conversation_problem`;
* DPO: :class:`pair_from_record` checked by :func:`pair_problem`;
* GRPO: :class:`prompt_from_record` (problem, reference answer, optional worked solution).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from moxin.config import DataError, SourceConfig
from moxin.data.bad_records import RecordStats
from moxin.data.enhance import render_record
from moxin.data.reader import Bad, is_hub_name, open_hub_dataset, read_records
from moxin.tokenizer.chat import validate_conversation

__all__ = ["text_of", "text_columns", "SHAREGPT_ROLES", "sharegpt_messages", "messages_from_record", "conversation_problem", "role_order_problem", "pair_from_record", "pair_problem",
           "prompt_from_record", "Extracted", "extract_all"]

log = logging.getLogger(__name__)


# ---- pretraining -----------------------------------------------------------------------------------------------
def text_of(record: Any, source: SourceConfig) -> str | Bad:
    """The document text of a record: a text file / line itself, the ``text_field`` of an object or row, or the
    record rendered by the source's ``template`` (moxin/data/enhance.py)."""
    if source.template is not None:
        record = render_record(record, source)
        if isinstance(record, Bad):
            return record
    elif not isinstance(record, str):
        field = source.text_field
        if field not in record:
            return Bad(f"no field {field!r} (fields: {sorted(record)[:20]})", "missing_field")
        record = record[field]
        if not isinstance(record, str):
            return Bad(f"field {field!r} is a {type(record).__name__}, not a string", "not_text")
    cap = source.max_record_bytes
    if cap and len(record) > cap // 4 and len(record.encode("utf-8", "surrogatepass")) > cap:
        return Bad(f"record of {len(record.encode('utf-8', 'surrogatepass')):,} bytes is longer than "
                   f"max_record_bytes={cap:,}", "oversized")
    return record


def text_columns(source: SourceConfig) -> list[str] | None:
    """The parquet columns the text comes from: ``text_field``, or all of them for a templated source."""
    return None if source.template is not None else [source.text_field]


# ---- SFT -------------------------------------------------------------------------------------------------------
#: ShareGPT ``from`` values and the chat role each becomes (OpenThoughts-114k: user / assistant; the ShareGPT
#: originals: human / gpt; a system turn where a set has one).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_messages(turns: Any, system: Any = None) -> list[dict] | Bad:
    """ShareGPT turns (``[{"from": ..., "value": ...}]``) and an optional record-level system prompt -> chat
    messages (``[{"role", "content"}]``, the system prompt first unless the turns open with one); a :class:`Bad`
    naming the first turn that cannot be read."""
    if not isinstance(turns, (list, tuple)):
        return Bad(f"conversations must be a list of {{'from', 'value'}} turns, got {type(turns).__name__}", "invalid")
    if system is not None and not isinstance(system, str):
        return Bad(f"system must be a string, got {type(system).__name__}", "invalid")
    messages = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            got = sorted(turn) if isinstance(turn, dict) else type(turn).__name__
            return Bad(f"conversations[{j}] must be a dict with 'from' and 'value', got {got}", "invalid")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            return Bad(f"conversations[{j}]: unknown 'from' {turn['from']!r}; expected one of "
                       f"{sorted(SHAREGPT_ROLES)}", "unknown_role")
        if not isinstance(turn["value"], str):
            return Bad(f"conversations[{j}]: 'value' must be a string, got {type(turn['value']).__name__}", "invalid")
        messages.append({"role": role, "content": turn["value"]})
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


@dataclass
class messages_from_record:
    """Picklable getter: a record -> its chat messages. ``record[messages_field]`` when the record has it (Tülu 3,
    OpenR1-Math-220k), else a ShareGPT record (OpenThoughts-114k: ``conversations`` of ``from``/``value`` turns
    and a ``system`` prompt) converted at read time by :func:`sharegpt_messages`."""

    messages_field: str = "messages"
    conversations_field: str = "conversations"
    system_field: str = "system"

    @property
    def columns(self) -> tuple[str, str]:
        """The columns a hub set must have one of."""
        return self.messages_field, self.conversations_field

    def __call__(self, rec: dict) -> Any:
        if self.messages_field in rec and rec[self.messages_field] is not None:
            return rec[self.messages_field]
        if self.conversations_field in rec:
            return sharegpt_messages(rec[self.conversations_field], rec.get(self.system_field))
        return Bad(f"no field {self.messages_field!r} (chat messages) or {self.conversations_field!r} (ShareGPT "
                   f"turns) (fields: {sorted(rec)[:20]})", "missing_field")


def conversation_problem(messages: Any, index: int | None = None) -> tuple[str, str] | None:
    """``(kind, description)`` of what makes a conversation unusable for SFT, or None."""
    problem = validate_conversation(messages, index)
    if problem is not None:
        kind = "unknown_role" if "unknown role" in problem else "invalid"
        return kind, problem
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant", "no assistant turn (nothing to train on)"
    order = role_order_problem(messages)
    if order is not None:
        return "role_order", order
    return None


def role_order_problem(messages: list) -> str | None:
    """What is out of order in a conversation's roles, or None: an optional system message first, then user
    and assistant turns alternating, starting with a user. Anything else (two users in a row, an assistant
    first, a system message in the middle) renders a prompt the model never sees at inference and teaches
    it to answer itself."""
    roles = [m["role"] for m in messages]
    start = 1 if roles and roles[0] == "system" else 0
    for j, role in enumerate(roles[start:], start):
        want = "user" if (j - start) % 2 == 0 else "assistant"
        if role != want:
            return (f"message {j} has role {role!r} where {want!r} is expected (roles: {roles[:8]}"
                    f"{'...' if len(roles) > 8 else ''}); expected an optional system message, then user / "
                    "assistant turns alternating")
    return None


# ---- DPO -------------------------------------------------------------------------------------------------------
@dataclass
class pair_from_record:
    """Picklable getter: a record -> ``(chosen_messages, rejected_messages)`` (raises KeyError if fields miss)."""

    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"

    def __call__(self, rec: dict):
        chosen, rejected = rec[self.chosen_field], rec[self.rejected_field]
        if isinstance(chosen, str) or isinstance(rejected, str):
            prompt = rec[self.prompt_field]
            prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt or [])
            if isinstance(chosen, str):
                chosen = prompt + [{"role": "assistant", "content": chosen}]
            if isinstance(rejected, str):
                rejected = prompt + [{"role": "assistant", "content": rejected}]
        return chosen, rejected


def pair_problem(pair: Any, index: int | None = None) -> tuple[str, str] | None:
    """``(kind, description)`` of what makes a pair unusable, or None."""
    chosen, rejected = pair
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        problem = validate_conversation(msgs, index)
        if problem is not None:
            return ("unknown_role" if "unknown role" in problem else "invalid"), f"{side}: {problem}"
        if msgs[-1]["role"] != "assistant":
            return "no_assistant", f"{side}: the last message must be the assistant answer being compared"
        order = role_order_problem(msgs)
        if order is not None:
            return "role_order", f"{side}: {order}"
    if [(m["role"], m["content"]) for m in chosen] == [(m["role"], m["content"]) for m in rejected]:
        return "identical", "chosen and rejected are identical (no preference to learn)"
    return None


# ---- GRPO ------------------------------------------------------------------------------------------------------
@dataclass
class prompt_from_record:
    """Picklable getter: a record -> ``{"problem", "answer", "solution"}``: the first of ``prompt_fields`` present,
    the reference answer (numbers as strings) and the worked solution (None when absent)."""

    prompt_fields: tuple[str, ...] = ("problem", "prompt", "question")
    answer_field: str = "answer"
    solution_field: str | None = "solution"

    def __call__(self, rec: dict) -> dict | Bad:
        pf = next((f for f in self.prompt_fields if f in rec), None)
        if pf is None:
            return Bad(f"no prompt field (looked for {list(self.prompt_fields)}; fields: {sorted(rec)[:20]})",
                       "missing_field")
        problem = rec[pf]
        if not isinstance(problem, str) or not problem.strip():
            return Bad(f"field {pf!r} is {'empty' if isinstance(problem, str) else type(problem).__name__}", "invalid")
        answer = rec.get(self.answer_field)
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            return Bad(f"field {self.answer_field!r} is missing or empty (a prompt without a reference answer "
                       "cannot be scored)", "no_answer")
        sol = rec.get(self.solution_field) if self.solution_field else None
        return {"problem": problem, "answer": answer.strip(), "solution": sol if isinstance(sol, str) else None}


# ---- a whole set ------------------------------------------------------------------------------------------------
@dataclass
class Extracted:
    """The usable values of a set: a list of them (local files), or a memory-mapped hub dataset and the kept row
    indices (values extracted again on access, so a large hub set is never copied into Python objects).
    Picklable (loader workers)."""

    store: Any
    rows: list[int] | None
    get: Callable[[Any], Any]
    stats: RecordStats

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.store)

    def __getitem__(self, i: int):
        return self.store[i] if self.rows is None else self.get(self.store[int(self.rows[i])])


def _extract(record: Any, get: Callable, check: Callable | None, index: int) -> Any:
    if isinstance(record, Bad):
        return record
    try:
        value = get(record)
    except KeyError as e:
        return Bad(f"missing field {e} (fields: {sorted(record)[:10]})", "missing_field")
    if isinstance(value, Bad) or check is None:
        return value
    problem = check(value, index)
    return value if problem is None else Bad(problem[1], problem[0])


def extract_all(source: SourceConfig, get: Callable[[Any], Any], check: Callable[[Any, int], Any] | None = None, *,
                max_bad_records: int | None, max_bad_fraction: float, what: str | None = None,
                fix: str = "Fix or remove those records, or raise the limits in the data config.",
                check_while_reading: bool = True, hub_column: str | tuple[str, ...] | None = None) -> Extracted:
    """Read every record of ``source`` (jsonl / parquet / hub), extract and check it; bad ones are counted.

    Stops with DataError past the limits (while reading, and over the whole set at the end; only at the end with
    ``check_while_reading=False``), or when no record is usable. ``hub_column``: a column a hub dataset must have
    (a tuple: one of them).
    """
    what = what or f"data set {source.name!r}"
    stats = RecordStats()
    kept: list = []
    rows: list[int] | None = None
    dataset = None
    if is_hub_name(source):
        dataset = open_hub_dataset(source, streaming=False)
        wanted = (hub_column,) if isinstance(hub_column, str) else tuple(hub_column or ())
        if wanted and not any(c in dataset.column_names for c in wanted):
            raise DataError(f"{what}: no column {' or '.join(map(repr, wanted))} (columns: {dataset.column_names})")
        rows = []
    for row, (loc, rec) in enumerate(read_records(source, formats=("jsonl", "parquet"), dataset=dataset)):
        stats.records += 1
        value = _extract(rec, get, check, row)
        if isinstance(value, Bad):
            stats.add_bad(loc, value)
        else:
            stats.kept += 1
            if rows is not None:
                rows.append(row)
            else:
                kept.append(value)
        if check_while_reading:
            stats.check(what, max_bad_records, max_bad_fraction, fix)
    stats.check(what, max_bad_records, max_bad_fraction, fix, final=True)
    if stats.kept == 0:
        raise DataError(f"{what} ({source.path}): none of its {stats.records} records is usable "
                        f"({stats.reasons}; first: {stats.bad_examples}); the run would train on nothing")
    if stats.bad:
        log.warning("%s: %d bad records skipped out of %d (%s); first: %s. Counted in summary.json; more than "
                    "max_bad_records=%s or max_bad_fraction=%s stop the run (data.max_bad_records=0: stop on any)",
                    what, stats.bad, stats.records, stats.reasons, stats.bad_examples, max_bad_records, max_bad_fraction)
    return Extracted(dataset if rows is not None else kept, rows, get, stats)
