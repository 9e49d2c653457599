"""Tests for moxin.rewards: extraction, verifiers, the arithmetic task, and process-isolated batch scoring."""

import os
import time

import pytest

from moxin.data.arithmetic import ArithmeticTask, solution_text
from moxin.rewards import CombinedVerifier, ExactAnswerVerifier, FormatVerifier, RewardResult, get_verifier, score_batch
from moxin.rewards.extract import MalformedAnswer, extract_answer, last_boxed

math_verify = pytest.importorskip("math_verify")
from moxin.rewards.deepscaler import DeepScaleRVerifier, published_boxed  # noqa: E402
from moxin.rewards.math import MathVerifier  # noqa: E402


# Module-level verifiers so worker processes can unpickle them.
class SleepyVerifier:
    """Exact-answer check that hangs forever on the completion 'hang' and crashes its process on 'crash'."""

    def __call__(self, completion, reference):
        if completion == "hang":
            time.sleep(10_000)
        if completion == "crash":
            os._exit(3)
        if completion == "raise":
            raise RuntimeError("verifier bug")
        return ExactAnswerVerifier()(completion, reference)


class SlowMathVerifier(MathVerifier):
    """A MathVerifier whose check never finishes (stands in for a pathological SymPy simplification)."""

    def __call__(self, completion, reference):
        time.sleep(10_000)


# ---------------------------------------------------------------- extraction


def test_extract_last_boxed_nested_and_fallbacks():
    assert last_boxed(r"first \boxed{1} then \boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\left\{1, 2\right\}}") == r"\left\{1, 2\right\}"
    assert extract_answer("so the answer is $42$.") == "42"
    assert extract_answer("Answer: 85") == "85"
    assert extract_answer("we get 3, then 7 and finally 12") == "12"
    assert extract_answer("no digits here") is None
    assert extract_answer("7 apples", number_fallback=False) is None
    with pytest.raises(MalformedAnswer):
        extract_answer(r"thus \boxed{\frac{1}{2}")


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("answer", ["1/2", "0.5", r"\frac{1}{2}", r"\frac12"])
@pytest.mark.parametrize("reference", ["1/2", "0.5", r"\frac{1}{2}"])
def test_math_equivalent_forms(answer, reference):
    r = MathVerifier()(rf"The result is \boxed{{{answer}}}", reference)
    assert (r.score, r.reason) == (1.0, "correct"), (answer, reference, r)


def test_math_boxed_extraction_wrong_and_malformed():
    v = MathVerifier()
    r = v(r"Reasoning 3 + 4 ... \boxed{\frac{1}{2}}", "0.5")
    assert r.score == 1.0 and r.extracted == r"\frac{1}{2}"
    r = v(r"\boxed{\frac{1}{3}}", "1/2")
    assert (r.score, r.reason, r.error) == (0.0, "wrong", None)
    r = v("I am not sure, sorry.", "1/2")
    assert (r.score, r.outcome) == (0.0, "no_answer")
    r = v(r"so \boxed{\frac{1}{2}", "1/2")
    assert (r.score, r.outcome) == (0.0, "no_answer") and "unbalanced" in r.reason
    assert MathVerifier(number_fallback=False)("After 12 steps, the answer is 1/2.", "1/2").score == 1.0
    assert MathVerifier(number_fallback=False)("we get 1/2 probably", "1/2").outcome == "no_answer"


def test_math_in_worker_processes_with_a_timeout():
    comps = [r"\boxed{\frac{1}{2}}", r"\boxed{3}", "no idea"]
    results, stats = score_batch(MathVerifier(), comps, ["0.5", "4", "1"], timeout_s=30, max_workers=2)
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert stats["correct"] == 1 and stats["wrong"] == 1 and stats["no_answer"] == 1
    t0 = time.monotonic()
    results, stats = score_batch(SlowMathVerifier(), [r"\boxed{1}"], ["1"], timeout_s=1.0, max_workers=2)
    assert time.monotonic() - t0 < 15
    assert results[0].reason == "timeout" and results[0].score == 0.0 and stats["timeouts"] == 1


# ---------------------------------------------------------------- DeepScaleR's reward


def test_deepscaler_boxed_after_think_counts_inside_think_does_not():
    v = DeepScaleRVerifier()
    r = v("<think>3 + 4 = 7</think> So the sum is \\boxed{7}.", "7")
    assert (r.score, r.outcome, r.extracted) == (1.0, "correct", "7")
    assert (v("<think>3+4 \\boxed{7}</think> The sum is 7.", "7").score,
            v("<think>3+4 \\boxed{7}</think> The sum is 7.", "7").outcome) == (0.0, "no_answer")
    # no </think>: a format error, even with a correct box (the published rule); require_think=False reads it whole
    assert v("3 + 4 gives \\boxed{7}", "7").outcome == "no_answer"
    assert DeepScaleRVerifier(require_think=False)("3 + 4 gives \\boxed{7}", "7").score == 1.0
    # a second </think> closes the answer region: a box after it does not count
    assert v("<think>a</think> b </think> \\boxed{7}", "7").outcome == "no_answer"
    assert v("<think>a</think> \\boxed{8}", "7").reason == "wrong"


def test_deepscaler_no_fallbacks_and_malformed_boxes():
    v = DeepScaleRVerifier()
    for text in ["<think>x</think> The answer is 7.", "<think>x</think> Answer: 7", "<think>x</think> 7",
                 "<think>x</think> \\boxed 7", "<think>x</think> \\fbox{7}", "<think>x</think> \\boxed{7",
                 "<think>x</think> \\boxed{}"]:
        r = v(text, "7")
        assert (r.score, r.outcome) == (0.0, "no_answer"), (text, r)
    # the published reward values are configurable (DeepScaleR's training run: 1 / 0 / 0)
    strict = DeepScaleRVerifier(incorrect_reward=-1.0, format_error_reward=-1.0)
    assert [strict(t, "7").score for t in ["</think>\\boxed{7}", "</think>\\boxed{6}", "</think>7"]] == [1, -1, -1]


def test_deepscaler_nested_braces_equivalence_and_last_box():
    v = DeepScaleRVerifier()
    assert published_boxed("\\boxed{\\frac{1}{\\sqrt{2}}} end") == "\\frac{1}{\\sqrt{2}}"
    assert published_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    r = v("<think>halves</think> $\\boxed{\\frac{1}{2}}$", "0.5")
    assert (r.score, r.extracted) == (1.0, "\\frac{1}{2}")
    assert v("<think>t</think> \\boxed{0.5}", "\\frac{1}{2}").score == 1.0
    assert v("<think>t</think> \\boxed{\\frac{2}{\\sqrt{8}}}", "\\frac{1}{\\sqrt{2}}").score == 1.0
    # several boxes: the last one counts (first right, last wrong -> 0; first wrong, last right -> 1)
    assert v("<think>t</think> \\boxed{7} or maybe \\boxed{8}", "7").score == 0.0
    assert v("<think>t</think> \\boxed{8}, no: \\boxed{7}", "7").score == 1.0
    # a broken last box is not rescued by an earlier good one
    assert v("<think>t</think> \\boxed{7} then \\boxed{7", "7").outcome == "no_answer"
    # a boxed reference is reduced to its content
    assert v("<think>t</think> \\boxed{7}", "The answer is \\boxed{7}").score == 1.0


def test_deepscaler_in_worker_processes_and_registry():
    assert isinstance(get_verifier("deepscaler", require_think=True), DeepScaleRVerifier)
    comps = ["<think>t</think> \\boxed{\\frac{1}{2}}", "<think>t \\boxed{3}</think>", "no idea"]
    results, stats = score_batch(get_verifier("deepscaler"), comps, ["0.5", "3", "1"], timeout_s=30, max_workers=2)
    assert [r.score for r in results] == [1.0, 0.0, 0.0]
    assert stats["correct"] == 1 and stats["no_answer"] == 2
    with pytest.raises(ValueError, match="think_end"):
        DeepScaleRVerifier(think_end="")


# ---------------------------------------------------------------- batch scoring


def test_score_batch_survives_hang_crash_and_exceptions():
    comps = ["Answer: 5", "hang", "Answer: 7", "crash", "raise", "nothing", "Answer: 9"]
    refs = ["5", "1", "8", "1", "1", "1", "9"]
    t0 = time.monotonic()
    results, stats = score_batch(SleepyVerifier(), comps, refs, timeout_s=1.5, max_workers=2)
    assert time.monotonic() - t0 < 20  # returns promptly although one item never finishes
    assert [r.score for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert results[1].reason == "timeout" and "timeout" in results[1].error
    assert results[2].reason == "wrong" and results[2].error is None
    assert "crashed" in results[3].error
    assert "verifier bug" in results[4].error
    assert results[5].reason == "no_answer"
    assert stats == {"n": 7, "correct": 2, "wrong": 1, "no_answer": 1, "errors": 2, "timeouts": 1,
                     "mean_score": pytest.approx(2 / 7)}
    # the pool replaced the killed workers and still works
    results, stats = score_batch(SleepyVerifier(), ["Answer: 1"], ["1"], timeout_s=5, max_workers=2)
    assert results[0].score == 1.0 and stats["correct"] == 1


def test_score_batch_inline_and_errors():
    results, stats = score_batch(ExactAnswerVerifier(), ["Answer: 3", "4"], ["3", "5"], max_workers=0)
    assert [r.reason for r in results] == ["correct", "wrong"]
    assert score_batch(ExactAnswerVerifier(), [], [], max_workers=2)[0] == []
    with pytest.raises(ValueError, match="same length"):
        score_batch(ExactAnswerVerifier(), ["a"], [], max_workers=0)


# ---------------------------------------------------------------- arithmetic task, exact, format, registry


def test_arithmetic_task_deterministic_small_and_correct():
    task = ArithmeticTask(seed=1)
    a, b = task.sample(50), ArithmeticTask(seed=1).sample(50)
    assert a == b and a != ArithmeticTask(seed=2).sample(50)
    assert task.sample(5, start=10) == a[10:15]
    for p in a:
        x, op, y = p["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(x) < 100 and int(y) < 100 and op in "+-"
        assert int(p["answer"]) == (int(x) + int(y) if op == "+" else int(x) - int(y)) >= 0
        sol = solution_text(p)
        assert sol.endswith(f"Answer: {p['answer']}")
        assert ExactAnswerVerifier()(sol, p["answer"]).score == 1.0
        assert FormatVerifier()(sol, p["answer"]).score == 1.0
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops=("*",))


def test_arithmetic_heldout_part_is_never_a_training_problem():
    """heldout=0.25 reserves a fixed quarter of the distinct problems: problem() (RL and the warm-up) never returns
    one, heldout_problems() returns only them, the same set every time; heldout=0 leaves the problems unchanged."""
    task = ArithmeticTask(seed=5, min_digits=1, max_digits=1, ops=("+",), heldout=0.25)
    held = task.heldout_problems(64)
    sums = {f"What is {a} + {b}?" for a in range(10) for b in range(10)}
    assert {p["prompt"] for p in held} == {p for p in sums if task.is_heldout(p)}  # the whole part: fewer than 64
    assert 10 <= len(held) <= 40 and held == task.heldout_problems(64) and task.heldout_problems(3) == held[:3]
    train = {task.problem(i)["prompt"] for i in range(2000)} | {task.problem(10**7 + i)["prompt"] for i in range(2000)}
    assert train == sums - {p["prompt"] for p in held}  # every other sum is trained on, no held-out one
    for p in held:
        x, _, y = p["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(p["answer"]) == int(x) + int(y)
    big = ArithmeticTask(seed=5, min_digits=3, max_digits=3, heldout=0.1)  # too many to count: n of them drawn
    assert len(big.heldout_problems(8)) == 8 and all(big.is_heldout(p["prompt"]) for p in big.heldout_problems(8))
    # operands 0..19 (the CPU demo's task): 400 sums, a quarter reserved, drawn as the training problems are drawn
    teens = ArithmeticTask(seed=5, min_digits=1, max_digits=2, ops=("+",), heldout=0.25, max_operand=19)
    held = teens.heldout_problems(1000)
    all_sums = {f"What is {a} + {b}?" for a in range(20) for b in range(20)}
    assert {p["prompt"] for p in held} == {p for p in all_sums if teens.is_heldout(p)} and 70 <= len(held) <= 130
    train = {teens.problem(i)["prompt"] for i in range(3000)}
    assert train == all_sums - {p["prompt"] for p in held}
    assert teens.heldout_problems(10) == held[:10] and all(int(p["answer"]) <= 38 for p in held)
    with pytest.raises(ValueError, match="max_operand=123"):
        ArithmeticTask(max_digits=2, max_operand=123)
    assert ArithmeticTask(seed=1, heldout=0.0).sample(20) == ArithmeticTask(seed=1).sample(20)
    with pytest.raises(ValueError, match="heldout"):
        ArithmeticTask(heldout=1.0)
    with pytest.raises(ValueError, match="heldout > 0"):
        ArithmeticTask().heldout_problems(4)


def test_exact_verifier_forms():
    v = ExactAnswerVerifier()
    assert v(r"so \boxed{85}", "85").score == 1.0
    assert v("Answer: 085.", "85").score == 1.0
    assert v("37 + 48 = 85", "85").score == 1.0  # last-integer fallback
    assert v("Answer: 84", "85").reason == "wrong"
    assert v("", "85").reason == "no_answer"
    assert ExactAnswerVerifier(number_fallback=False)("37 + 48 = 85", "85").reason == "no_answer"


def test_format_combined_and_registry():
    assert FormatVerifier()("1 + 2 = 3. Answer: 3", "").score == 1.0
    assert FormatVerifier()("Answer: 3 and more text", "").score == 0.0
    combo = CombinedVerifier([("exact", 1.0), ("format", 0.1)])
    r = combo("Answer: 3", "3")
    assert r.score == pytest.approx(1.1) and r.outcome == "correct" and "format=1" in r.reason
    r = combo("I think 4", "3")
    assert r.score == 0.0 and r.outcome == "wrong"
    assert isinstance(get_verifier("math"), MathVerifier)
    assert isinstance(get_verifier("exact", number_fallback=False), ExactAnswerVerifier)
    with pytest.raises(KeyError, match="unknown verifier 'nope'"):
        get_verifier("nope")
    assert isinstance(RewardResult(1.0, "correct"), RewardResult)


def test_solution_text_styles_end_in_the_verified_answer():
    p = ArithmeticTask(seed=3).problem(5)
    worked, short = solution_text(p), solution_text(p, "answer")
    assert short == f"Answer: {p['answer']}" and worked.endswith(short)
    assert ExactAnswerVerifier()(short, p["answer"]).score == 1.0
    with pytest.raises(ValueError, match="worked"):
        solution_text(p, "essay")
