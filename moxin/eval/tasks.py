"""Evaluation tasks: where the records come from and how a record becomes what is scored.

Two kinds (:class:`TaskKind`): ``multiple_choice``, scored by log-likelihood as lm-evaluation-harness scores
ARC, HellaSwag, PIQA, Winogrande and MMLU (``acc``, ``acc_norm``), and ``generation``, a completion scored by a
:mod:`moxin.rewards` verifier (pass@1, pass@k). Records come from the training data's reader; a ``preset``
applies lm-eval's own field mapping, and few-shot contexts follow lm-eval's sampler, so numbers compare with
the published ones. Details: docs/modules.md, "eval/tasks.py".
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from moxin.config import (DataError, EvalConfig, EvalConfigError, FewshotSampler, SourceConfig, TaskConfig,
                          TaskKind)
from moxin.data.grpo_data import DEFAULT_INSTRUCTIONS
from moxin.data.reader import Bad, is_hub_name, open_hub_dataset, read_records
from moxin.rewards import VERIFIERS
from moxin.tokenizer.chat import render_chat

__all__ = ["MCItem", "GenItem", "load_records", "build_mc_items", "build_gen_items", "PRESET_DOCS", "eval_config"]


def eval_config(obj: Any) -> EvalConfig:
    """``EvalConfig.from_any(obj)`` whose generation tasks name a registered verifier (moxin.rewards.VERIFIERS: code,
    which the config package does not import)."""
    cfg = EvalConfig.from_any(obj)
    for task in cfg.tasks:
        if task.kind == TaskKind.generation and task.verifier not in VERIFIERS:
            raise EvalConfigError(f"eval task {task.name!r}: verifier={task.verifier!r}; choose one of "
                                  f"{sorted(VERIFIERS)}")
    return cfg


# ---- records ---------------------------------------------------------------------------------------------------
def load_records(path: str, split: str = "test", hub_config: str | None = None, data_files: Any = None,
                 name: str = "eval") -> list[dict]:
    """All records of a local jsonl / parquet file set or a hub dataset (memory-mapped, not streamed: eval sets
    are counted up front). A malformed line stops with its file and line number."""
    src = SourceConfig(name=name, path=path, split=split, hub_config=hub_config, data_files=data_files)
    dataset = open_hub_dataset(src, streaming=False) if is_hub_name(src) else None
    out = []
    for loc, rec in read_records(src, formats=("jsonl", "parquet"), dataset=dataset):
        if isinstance(rec, Bad):
            raise DataError(f"eval task {name!r}: {loc}: {rec.reason}; fix the line")
        out.append(dict(rec))
    return out


# ---- multiple choice -------------------------------------------------------------------------------------------
@dataclass
class MCItem:
    """One multiple-choice item as lm-eval scores it: request i is (contexts[i], continuations[i])."""

    index: int
    contexts: list[str]
    continuations: list[str]
    gold: int
    norm_lengths: list[float]
    """Divisors of acc_norm: lm-eval's len(choice) per option (characters of the option text)."""


@dataclass
class MCDoc:
    """A record mapped to lm-eval's three functions' values."""

    text: str | int
    """doc_to_text: the context, or (winogrande) the index of the gold context among ``choices``."""
    choices: list[str]
    target: int | str
    """doc_to_target: gold index, or (winogrande) the continuation text."""


def _hellaswag_pre(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict) -> MCDoc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return MCDoc(_hellaswag_pre(doc["activity_label"] + ": " + ctx), [_hellaswag_pre(e) for e in doc["endings"]],
                 int(doc["label"]))


def _arc(doc: dict) -> MCDoc:
    labels = list(doc["choices"]["label"])
    return MCDoc(f"Question: {doc['question']}\nAnswer:", list(doc["choices"]["text"]), labels.index(doc["answerKey"]))


def _piqa(doc: dict) -> MCDoc:
    return MCDoc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _winogrande(doc: dict) -> MCDoc:
    s = doc["sentence"]
    i = s.index("_")
    return MCDoc({"1": 0, "2": 1}[doc["answer"]], [s[:i] + doc["option1"], s[:i] + doc["option2"]],
                 s[i + 1:].strip())


#: lm-eval's doc_to_text / doc_to_choice / doc_to_target of the benchmarks in the Moxin paper, by preset name (where
#: their records are: moxin.config.TASK_PRESETS)
PRESET_DOCS: dict[str, Callable[[dict], MCDoc]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _winogrande,
}


def _gold_index(task: TaskConfig, rec: dict, choices: list[str], where: str) -> int:
    g = rec.get(task.gold_field)
    if isinstance(g, bool) or g is None:
        raise DataError(f"eval task {task.name!r}: {where} has no gold_field {task.gold_field!r} (fields: "
                        f"{sorted(rec)[:20]}); set gold_field")
    if isinstance(g, str) and task.labels_field:
        labels = list(rec[task.labels_field])
        if g not in labels:
            raise DataError(f"eval task {task.name!r}: {where}: gold {g!r} not among {task.labels_field} {labels}")
        g = labels.index(g)
    elif isinstance(g, str) and g.strip().isdigit():
        g = int(g)
    elif isinstance(g, str) and len(g.strip()) == 1 and g.strip().isalpha():
        g = ord(g.strip().upper()) - ord("A")
    if not isinstance(g, int) or not 0 <= g < len(choices):
        raise DataError(f"eval task {task.name!r}: {where}: gold {rec.get(task.gold_field)!r} is not an index into "
                        f"its {len(choices)} choices")
    return g


def to_doc(task: TaskConfig, rec: dict, where: str) -> MCDoc:
    """A record -> lm-eval's (doc_to_text, doc_to_choice, doc_to_target), by preset or by field mapping."""
    if task.preset:
        try:
            return PRESET_DOCS[task.preset](rec)
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"eval task {task.name!r}: {where} does not fit preset {task.preset!r} "
                            f"({type(e).__name__}: {e}); fields: {sorted(rec)[:20]}") from e
    try:
        text = task.text.format(**rec)
    except (KeyError, IndexError) as e:
        raise DataError(f"eval task {task.name!r}: {where}: text template {task.text!r} needs field {e}; "
                        f"the record has {sorted(rec)[:20]}") from e
    choices = rec.get(task.choices_field)
    if isinstance(choices, dict) and "text" in choices:  # ARC-style {"text": [...], "label": [...]}
        choices = choices["text"]
    if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DataError(f"eval task {task.name!r}: {where}: choices_field {task.choices_field!r} must be a list of "
                        f">= 2 strings; got {choices!r:.120}")
    return MCDoc(text, list(choices), _gold_index(task, rec, list(choices), where))


def _fewshot_example(task: TaskConfig, d: MCDoc) -> str:
    """lm-eval's few-shot example: text + target_delimiter + target text."""
    if isinstance(d.text, int):  # winogrande: the gold context, then its continuation
        return d.choices[d.text] + task.target_delimiter + str(d.target)
    return d.text + task.target_delimiter + d.choices[int(d.target)]


def build_mc_items(task: TaskConfig, records: list[dict], fewshot_records: list[dict] | None = None) -> list[MCItem]:
    """Records -> scored items, with the few-shot prefix lm-eval's default sampler would put in front."""
    same_pool = fewshot_records is None
    pool_recs = records if same_pool else list(fewshot_records)  # lm-eval's limit cuts the evaluated docs only
    if task.limit is not None:
        records = records[:task.limit]
    docs = [to_doc(task, r, f"record {i + 1}") for i, r in enumerate(records)]
    pool = ([to_doc(task, r, f"few-shot record {i + 1}") for i, r in enumerate(pool_recs)]
            if task.num_fewshot else [])
    if task.num_fewshot and len(pool) < task.num_fewshot + same_pool:
        raise DataError(f"eval task {task.name!r}: num_fewshot={task.num_fewshot} but the few-shot pool has only "
                        f"{len(pool)} records")
    rnd = random.Random(task.fewshot_seed)
    items = []
    for i, d in enumerate(docs):
        prefix = ""
        if task.num_fewshot:
            n = task.num_fewshot
            others = [j for j in range(len(pool)) if not same_pool or pool_recs[j] != records[i]]
            if task.fewshot_sampler == FewshotSampler.first_n:
                drawn = others[:n]
            elif same_pool:  # lm-eval: sample n + 1, drop the item (by value, as its dicts compare), keep n
                drawn = [j for j in rnd.sample(range(len(pool)), n + 1) if pool_recs[j] != records[i]][:n]
                if len(drawn) < n:  # the item occurs more than once in the pool
                    drawn = [others[j] for j in rnd.sample(range(len(others)), n)]
            else:
                drawn = rnd.sample(range(len(pool)), n)
            prefix = task.fewshot_delimiter.join(_fewshot_example(task, pool[j]) for j in drawn) + task.fewshot_delimiter
        if isinstance(d.text, int):  # partial evaluation: one continuation after each filled-in context
            contexts = [prefix + c for c in d.choices]
            conts = [task.target_delimiter + str(d.target)] * len(d.choices)
            gold = d.text
        else:
            contexts = [prefix + d.text] * len(d.choices)
            conts = [task.target_delimiter + c for c in d.choices]
            gold = int(d.target)
        items.append(MCItem(i, contexts, conts, gold, [float(len(c)) for c in d.choices]))
    return items


# ---- generation ------------------------------------------------------------------------------------------------
@dataclass
class GenItem:
    index: int
    prompt_ids: list[int]
    answer: str
    problem: str


def user_text(task: TaskConfig, problem: str) -> str:
    instr = DEFAULT_INSTRUCTIONS.get(task.verifier, "") if task.instruction is None else task.instruction
    return f"{problem.strip()}\n\n{instr}" if instr else problem.strip()


def render_prompt(task: TaskConfig, problem: str, tokenizer) -> list[int]:
    """The prompt ids, as the GRPO data module renders them (chat template + generation prompt), or plain text
    after bos when ``chat`` is off (base models)."""
    text = user_text(task, problem)
    if not task.chat:
        return tokenizer.encode(text, bos=True)
    msgs = ([{"role": "system", "content": task.system}] if task.system else []) + [{"role": "user", "content": text}]
    return render_chat(msgs, tokenizer, add_generation_prompt=True).input_ids


def build_gen_items(task: TaskConfig, records: list[dict], tokenizer) -> list[GenItem]:
    if task.limit is not None:
        records = records[:task.limit]
    items = []
    for i, r in enumerate(records):
        prob, ans = r.get(task.problem_field), r.get(task.answer_field)
        if isinstance(ans, (int, float)) and not isinstance(ans, bool):
            ans = str(ans)
        if not isinstance(prob, str) or not prob.strip() or not isinstance(ans, str) or not ans.strip():
            raise DataError(f"eval task {task.name!r}: record {i + 1} needs a non-empty problem_field "
                            f"{task.problem_field!r} and answer_field {task.answer_field!r}; fields: {sorted(r)[:20]}")
        items.append(GenItem(i, render_prompt(task, prob, tokenizer), ans.strip(), prob))
    return items
