"""Agreement on recorded completions: moxin's scoring of each generative task equals its reference implementation's
scoring on hand-written completions, edge cases included. lm-eval is not importable in the dev venv, so each
reference rule is transcribed here, cited by file and function (lm-evaluation-harness at commit 4e7e0d47f):

- generation cut: lm_eval/models/utils.py ``postprocess_generated_text`` (``generation.split(term)[0]`` per stop);
- filters: lm_eval/filters/extraction.py ``RegexFilter.apply`` (``findall``, ``group_select``, first non-empty group
  of a tuple, ``strip``, fallback ``[invalid]``), then ``take_first``;
- metric: lm_eval/api/metrics.py ``exact_match_hf_evaluate`` (regexes_to_ignore, ignore_case, numpy equality);
- task settings: lm_eval/tasks/gsm8k/gsm8k.yaml (3.0), lm_eval/tasks/bbh/cot_fewshot/_cot_fewshot_template_yaml (4.0);
- PopQA: AlexTMallen/adaptive-retrieval run_model.py ``call_model`` (prediction) and ``main`` (``is_correct``).

MATH-family and HumanEval verdicts are checked against their references' known verdicts in test_eval_scoring.py.
"""

import json
import re

import numpy as np
import pytest

from moxin.config import TASK_PRESETS
from moxin.eval.scoring import BBH_UNTIL, GSM8K_UNTIL, truncate_at
from moxin.rewards import get_verifier


# ---- the references, transcribed ---------------------------------------------------------------------------------
def ref_postprocess(generation: str, stop: list[str]) -> str:
    for term in stop:
        if len(term) > 0:
            generation = generation.split(term)[0]
    return generation


def ref_regex_filter(resp: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    match = re.compile(pattern).findall(resp)
    if match:
        match = match[group_select]
        if isinstance(match, tuple):
            match = [m for m in match if m]
            match = match[0] if match else fallback
        return match.strip()
    return fallback


def ref_exact_match(pred: str, ref: str, regexes_to_ignore=None, ignore_case=False) -> float:
    if regexes_to_ignore is not None:
        preds, refs = [pred], [ref]
        for s in regexes_to_ignore:
            preds = np.array([re.sub(s, "", x) for x in preds])
            refs = np.array([re.sub(s, "", x) for x in refs])
    else:
        preds, refs = np.asarray([pred]), np.asarray([ref])
    if ignore_case:
        preds, refs = np.char.lower(preds), np.char.lower(refs)
    return float(np.mean(preds == refs))


GSM8K_YAML_UNTIL = ["Question:", "</s>", "<|im_end|>"]
GSM8K_FILTERS = {"strict-match": (r"#### (\-?[0-9\.\,]+)", 0), "flexible-extract": (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1)}
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]


def ref_gsm8k(completion: str, reference: str, filter_name: str) -> float:
    text = ref_postprocess(completion, GSM8K_YAML_UNTIL)
    pred = ref_regex_filter(text, *GSM8K_FILTERS[filter_name])
    return ref_exact_match(pred, reference, GSM8K_IGNORE, ignore_case=True)


BBH_YAML_UNTIL = ["</s>", "Q", "\n\n"]


def ref_bbh(completion: str, target: str) -> float:
    text = ref_postprocess(completion, BBH_YAML_UNTIL)
    return ref_exact_match(ref_regex_filter(text, "(?<=the answer is )(.*)(?=.)"), target)


def ref_popqa(generation: str, possible_answers_json: str) -> float:
    pred = generation
    if pred.startswith("\n\n"):
        pred = pred[2:]
    pred = pred.split("\n")[0]
    is_correct = False
    for pa in json.loads(possible_answers_json):
        if pa in pred or pa.lower() in pred or pa.capitalize() in pred:
            is_correct = True
    return float(is_correct)


# ---- recorded completions ----------------------------------------------------------------------------------------
GSM8K_REF = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
GSM8K_CASES = [
    (" 24 + 48 = 72\n#### 72", GSM8K_REF),
    (" So she pays $1,000.", "#### 1000"),
    (" 72\n\nQuestion: What is 5?\nAnswer: #### 5", GSM8K_REF),
    (" #### 5 then #### 72", GSM8K_REF),
    (" The answer is 72.0", GSM8K_REF),
    (" #### 72.", GSM8K_REF),
    (" no numbers at all", GSM8K_REF),
    (" -3 degrees, i.e. #### -3", "#### -3"),
    (" 7", "#### 7"),
    (" #### 1,234.5.", "#### 1234.5"),
    (" $ 72 dollars", GSM8K_REF),
    ("<|im_end|> #### 72", GSM8K_REF),
    (" 12 apples and then 72", GSM8K_REF),
    (" Answer: 0.5", "#### .5"),
]
BBH_CASES = [
    ("Let's evaluate. So the answer is False.", "False"),
    ("A is True. So the answer is (A).", "(A)"),
    ("the answer is 24", "24"),  # no final character after the answer: the regex leaves the last digit out
    ("So the answer is 24.", "24"),
    ("The answer is True.", "True"),  # capital T: no "the answer is " -> [invalid]
    ("So the answer is (B). But the answer is (C).", "(B)"),  # the first match wins
    ("So the answer is valid.\nOops, the answer is invalid.", "valid"),  # the regex's "." stops at the line end
    ("Step one.\n\nSo the answer is Yes.", "Yes"),  # cut at "\n\n" before the answer
    ("Queens move. So the answer is No.", "No"),  # cut at "Q": nothing left
    ("thinking... So the answer is  [ ] }.", "[ ] }"),  # stripped
    ("So the answer is false.", "False"),  # exact: case matters
    ("So the answer is (A)", "(A)"),  # no full stop: "(A" != "(A)"
    ("So the answer is 3. </s> So the answer is 4.", "3"),
    ("So the answer is (A). Q: next", "(A)"),  # cut at "Q", the trailing space is the "last character": "(A)."
    ("", "True"),
]
PA = json.dumps(["Barack Obama", "Obama", "barack obama"])
POPQA_CASES = [
    (" Barack Obama", PA),
    ("\n\n Obama was the president", PA),  # a leading blank line is dropped
    ("\n\nObama", PA),
    ("\nObama", PA),  # one newline: the first line is empty
    (" The answer is\nObama", PA),  # only the first line counts
    (" OBAMA", PA),  # neither as written, lower-cased nor capitalised
    (" new york city", json.dumps(["New York City"])),  # lower-cased answer occurs
    (" Paris, France", json.dumps(["paris"])),  # capitalised answer occurs
    (" Parisian", json.dumps(["Paris"])),  # a substring counts
    ("", json.dumps(["Paris"])),
    (" politician Q: Who is", json.dumps(["politician", "statesman"])),
]


@pytest.mark.parametrize("filter_name", ["strict-match", "flexible-extract"])
def test_gsm8k_scoring_agrees_with_lm_eval(filter_name):
    v = get_verifier("gsm8k", filter_name=filter_name)
    for completion, reference in GSM8K_CASES:
        # the runner cuts at the task's until (the preset's) before the verifier sees the text
        ours = v(truncate_at(completion, tuple(TASK_PRESETS["gsm8k"].defaults["until"])), reference).score
        assert ours == ref_gsm8k(completion, reference, filter_name), (completion, reference)
    assert list(GSM8K_UNTIL) == GSM8K_YAML_UNTIL


def test_bbh_scoring_agrees_with_lm_eval():
    v = get_verifier("bbh")
    verdicts = []
    for completion, target in BBH_CASES:
        ours = v(truncate_at(completion, tuple(TASK_PRESETS["bbh_cot_fewshot"].defaults["until"])), target).score
        assert ours == ref_bbh(completion, target), (completion, target)
        assert v(completion, target).score == ours  # the verifier cuts at the same strings itself
        verdicts.append(ours)
    assert 0 < sum(verdicts) < len(verdicts)
    assert list(BBH_UNTIL) == BBH_YAML_UNTIL == TASK_PRESETS["bbh_cot_fewshot"].defaults["until"]


def test_popqa_scoring_agrees_with_the_authors_run_model():
    v = get_verifier("popqa")
    verdicts = [v(c, a).score for c, a in POPQA_CASES]
    assert verdicts == [ref_popqa(c, a) for c, a in POPQA_CASES]
    assert 0 < sum(verdicts) < len(verdicts)

