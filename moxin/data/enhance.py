"""Benchmark training records as pretraining text: the templates of the third pretraining phase's "capability
enhancement" sources (``data=moxin_enhance``; docs/recipe.md, "Pretraining").

A source with ``template: NAME`` has each record rendered by ``TEMPLATES[NAME]``: the question in the form
lm-evaluation-harness prompts it, then the gold answer, i.e. one lm-eval few-shot example as one document, so the
model sees the evaluation format with the right answer. A record that does not fit is a bad record (counted with
its location, like a missing text field). Templates and their sources: docs/modules.md, "data/enhance.py".
"""

from __future__ import annotations

import re
from typing import Any, Callable

from moxin.config import DataError, SourceConfig
from moxin.data.reader import Bad

__all__ = ["TEMPLATES", "render_record"]

_LETTERS = "ABCDEFGHIJ"


def _mmlu(rec: dict) -> str:
    """lm-eval mmlu: the question, ``A. ..`` per choice, ``Answer: <letter>``. ``cais/mmlu``'s older
    ``auxiliary_train`` files nest the record under ``train``."""
    rec = rec["train"] if isinstance(rec.get("train"), dict) else rec
    choices = list(rec["choices"])
    if not 2 <= len(choices) <= len(_LETTERS):
        raise ValueError(f"{len(choices)} choices")
    opts = "".join(f"\n{letter}. {c}" for letter, c in zip(_LETTERS, choices))
    return f"{rec['question'].strip()}{opts}\nAnswer: {_LETTERS[_index(rec['answer'], len(choices))]}"


def _hellaswag_clean(text: str) -> str:
    """lm-eval hellaswag ``preprocess``: WikiHow's ``[title]`` marks become sentence ends, other ``[..]`` go."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _hellaswag(rec: dict) -> str:
    """lm-eval hellaswag: ``<activity>: <ctx_a> <Ctx_b>`` and the gold ending."""
    ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
    ending = rec["endings"][_index(rec["label"], len(rec["endings"]))]
    return _hellaswag_clean(rec["activity_label"] + ": " + ctx) + " " + _hellaswag_clean(ending)


def _arc(rec: dict) -> str:
    """lm-eval arc_easy / arc_challenge: ``Question: ..\\nAnswer: <gold choice text>``."""
    labels = list(rec["choices"]["label"])
    return f"Question: {rec['question']}\nAnswer: {rec['choices']['text'][labels.index(rec['answerKey'])]}"


def _piqa(rec: dict) -> str:
    """lm-eval piqa: ``Question: <goal>\\nAnswer: <gold solution>``."""
    return f"Question: {rec['goal']}\nAnswer: {(rec['sol1'], rec['sol2'])[_index(rec['label'], 2)]}"


def _winogrande(rec: dict) -> str:
    """lm-eval winogrande (partial evaluation): the sentence with the blank filled by the gold option."""
    s = rec["sentence"]
    i = s.index("_")
    option = {"1": rec["option1"], "2": rec["option2"]}[str(rec["answer"])]
    return s[:i] + option + " " + s[i + 1:].strip()


def _gsm8k(rec: dict) -> str:
    """lm-eval gsm8k: ``Question: ..\\nAnswer: <worked solution ending in #### N>``."""
    return f"Question: {rec['question']}\nAnswer: {rec['answer']}"


def _math(rec: dict) -> str:
    """lm-eval minerva_math's form: ``Problem:\\n..\\n\\nSolution:\\n<worked solution with \\boxed{}>``."""
    return f"Problem:\n{rec['problem']}\n\nSolution:\n{rec['solution']}"


def _index(value: Any, n: int) -> int:
    """A gold index given as an int or a digit string, checked against ``n`` options."""
    i = int(value) if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()) else None
    if i is None or isinstance(value, bool) or not 0 <= i < n:
        raise ValueError(f"gold {value!r} is not an index into {n} options")
    return i


#: template name -> record -> text (docs/modules.md, "data/enhance.py", lists each one's hub data set)
TEMPLATES: dict[str, Callable[[dict], str]] = {
    "mmlu": _mmlu,
    "hellaswag": _hellaswag,
    "arc": _arc,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "gsm8k": _gsm8k,
    "math": _math,
}


def render_record(record: Any, source: SourceConfig) -> str | Bad:
    """The text of one record of a templated source, or a :class:`Bad` naming the field that does not fit."""
    fn = TEMPLATES.get(source.template)
    if fn is None:
        raise DataError(f"data source {source.name!r}: template {source.template!r} unknown; choose one of "
                        f"{sorted(TEMPLATES)} (moxin/data/enhance.py) or drop `template` and set text_field")
    if not isinstance(record, dict):
        return Bad(f"record is a {type(record).__name__}, template {source.template!r} needs an object", "invalid")
    try:
        return fn(record)
    except KeyError as e:
        return Bad(f"no field {e} for template {source.template!r} (fields: {sorted(record)[:20]})", "missing_field")
    except (ValueError, TypeError, AttributeError, IndexError) as e:
        return Bad(f"record does not fit template {source.template!r}: {type(e).__name__}: {e}", "invalid")
