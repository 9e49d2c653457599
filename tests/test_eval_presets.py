"""The paper's evaluation presets: an MMLU-style few-shot task with subjects and a gsm8k-style generative task run
end to end on the tiny model from local jsonl copies (``eval.local_dir``), scored as their scorers score the recorded
completions; every conf/eval/*.yaml composes and names presets that exist."""

import json
from pathlib import Path

import pytest
import torch

import moxin.config.eval as config_eval
import moxin.eval.runner as runner
from moxin import run as R
from moxin.config import TASK_PRESETS, TaskKind
from moxin.eval import evaluate, eval_config, loglikelihoods, encode_pair
from moxin.eval.generation import GenRecord
from moxin.eval.scoring import GSM8K_UNTIL, HUMANEVAL_UNTIL, gsm8k_scores
from moxin.eval.tasks import GEN_PRESET_DOCS, PRESET_DOCS
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.rewards import VERIFIERS
from tests.helpers.compose import compose_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=512, sliding_window=None)
    return Transformer(cfg).eval()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _mmlu_rows(subject: str, n: int, tag: str) -> list[dict]:
    return [{"question": f" What is {tag} {i} of {subject}? ", "subject": subject, "answer": i % 4,
             "choices": [f"{tag}{i}a", f"{tag}{i}b", f"{tag}{i}c", f"{tag}{i}d"]} for i in range(n)]


def test_mmlu_preset_few_shot_by_subject_runs_and_scores_like_lm_eval(tmp_path, model, tok):
    """Per subject: lm-eval's description line, the first n dev examples of that subject, "A. .. D." options; acc is
    the argmax of the recorded log-likelihoods; the group score is the mean over items; lm-eval's subtask names."""
    test = _mmlu_rows("high_school_physics", 3, "t") + _mmlu_rows("anatomy", 2, "u")
    _jsonl(tmp_path / "mmlu" / "test.jsonl", [test[0], test[3], test[1], test[4], test[2]])  # subjects interleaved
    _jsonl(tmp_path / "mmlu" / "dev.jsonl", _mmlu_rows("anatomy", 3, "da") + _mmlu_rows("high_school_physics", 3, "dp"))
    cfg = {"tasks": [{"name": "mmlu", "preset": "mmlu", "num_fewshot": 2}], "local_dir": str(tmp_path)}
    from moxin.eval.tasks import build_mc_items, load_records

    task = eval_config(cfg).tasks[0]
    items = build_mc_items(task, load_records(task.path), load_records(task.fewshot_path))
    ctx = items[1].contexts[0]  # the first anatomy item
    assert items[1].subject == "anatomy" and items[1].continuations == [" A", " B", " C", " D"]
    assert ctx == ("The following are multiple choice questions (with answers) about anatomy.\n\n"
                   "What is da 0 of anatomy?\nA. da0a\nB. da0b\nC. da0c\nD. da0d\nAnswer: A\n\n"
                   "What is da 1 of anatomy?\nA. da1a\nB. da1b\nC. da1c\nD. da1d\nAnswer: B\n\n"
                   "What is u 0 of anatomy?\nA. u0a\nB. u0b\nC. u0c\nD. u0d\nAnswer:")
    assert "high school physics.\n\nWhat is dp 0" in items[0].contexts[0]

    res = evaluate(model, tok, cfg)
    r = res["tasks"]["mmlu"]
    assert r["n"] == 5 and r["task"] == "mmlu" and r["num_fewshot"] == 2
    for it, rec in zip(items, r["items"]):
        lls = [x.logprob for x in loglikelihoods(model, [encode_pair(tok, c, x) for c, x in
                                                         zip(it.contexts, it.continuations)])]
        assert rec["loglik"] == pytest.approx(lls, abs=1e-4)
        assert rec["acc"] == float(max(range(4), key=lambda j: (lls[j], -j)) == it.gold)
    assert r["metrics"]["acc"] == pytest.approx(sum(x["acc"] for x in r["items"]) / 5)
    anat = [x["acc"] for x in r["items"] if x["subject"] == "anatomy"]
    assert r["subjects"]["anatomy"]["metrics"]["acc"] == pytest.approx(sum(anat) / 2)
    phys = [x["acc"] for x in r["items"] if x["subject"] == "high_school_physics"]
    assert r["macro"]["acc"] == pytest.approx((sum(anat) / 2 + sum(phys) / 3) / 2)  # OLMES's mmlu:mc suite score
    assert set(res["results"]) == {"mmlu", "mmlu_anatomy", "mmlu_high_school_physics", "mmlu_stem"}
    assert r["groups"]["stem"]["metrics"]["acc"] == r["metrics"]["acc"]  # both subjects are STEM
    assert res["results"]["mmlu"]["acc,none"] == r["metrics"]["acc"] and res["n-shot"]["mmlu_anatomy"] == 2
    assert "acc_stderr,none" in res["results"]["mmlu"]
    md = runner.markdown_table(res)
    assert "| mmlu | mmlu | 2 | acc |" in md and "| mmlu | mmlu_stem | 2 | acc |" in md


GSM_TRAIN = [{"question": f"Tom has {i} apples and buys {i + 1}. How many?",
              "answer": f"He has {i} + {i + 1} = {2 * i + 1} apples.\n#### {2 * i + 1}"} for i in range(4)]
GSM_TEST = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
            {"question": "What is 10 * 100?", "answer": "10 * 100 = 1000\n#### 1,000"},
            {"question": "What is 7 - 1?", "answer": "7 - 1 = 6\n#### 6"}]


def test_gsm8k_preset_few_shot_generation_runs_end_to_end_on_the_tiny_model(tmp_path, model, tok):
    """lm-eval's gsm8k prompt (plain text after bos, seeded few-shot examples from train, "\\n\\n" between), greedy
    decoding; both filters' exact_match reported, each equal to gsm8k_scores of the recorded completion."""
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN)
    cfg = {"tasks": [{"name": "gsm8k", "preset": "gsm8k", "num_fewshot": 2, "max_new_tokens": 6}],
           "local_dir": str(tmp_path), "verifier_workers": 0}
    from moxin.eval.tasks import build_gen_items, load_records

    task = eval_config(cfg).tasks[0]
    assert task.until == list(GSM8K_UNTIL) and task.verifier == "gsm8k" and not task.chat
    items = build_gen_items(task, load_records(task.path), tok, load_records(task.fewshot_path))
    text = tok.decode(items[0].prompt_ids)
    assert text.startswith("Question: Tom has") and text.endswith("\n\nQuestion: What is 2 + 3?\nAnswer:")
    assert text.count("Question:") == 3 and "#### " in text and items[0].prompt_ids[0] == tok.bos_id

    res = evaluate(model, tok, cfg)
    r = res["tasks"]["gsm8k"]
    assert set(r["metrics"]) >= {"exact_match,strict-match", "exact_match,flexible-extract"}
    for name in ("strict-match", "flexible-extract"):
        want = [gsm8k_scores(x["greedy"], x["answer"])[f"exact_match,{name}"] for x in r["items"]]
        assert [x["greedy_scores"][f"exact_match,{name}"] for x in r["items"]] == want
        assert r["metrics"][f"exact_match,{name}"] == pytest.approx(sum(want) / 3)
    assert res["results"]["gsm8k"]["alias"] == "gsm8k" and "exact_match,strict-match" in res["results"]["gsm8k"]
    assert "exact_match_stderr,flexible-extract" in res["results"]["gsm8k"]


def test_gsm8k_filters_and_stop_strings_on_recorded_completions(tmp_path, model, tok, monkeypatch):
    """Completions cut at lm-eval's ``until`` before scoring; strict-match needs "#### N", flexible-extract takes the
    last number; the metrics are gsm8k_scores' verdicts on the recorded (cut) completions."""
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", GSM_TEST)
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", GSM_TRAIN + GSM_TRAIN[:1])  # the preset's 5 shots
    completions = [" 2 + 3 = 5\n#### 5\n\nQuestion: What is 9?\nAnswer: #### 9",  # right, both filters
                   " 10 * 100 is 1,000 apples.",  # flexible only ("1,000" == "1,000" after removing ",")
                   " #### 7\nQuestion: #### 6"]  # wrong: the right answer comes after the stop string
    monkeypatch.setattr(runner, "generate_all", lambda m, prompts, **kw: [
        GenRecord(tok.encode(c), False) for c in completions[:len(prompts)]])
    res = evaluate(model, tok, {"tasks": [{"name": "gsm8k", "preset": "gsm8k"}], "local_dir": str(tmp_path),
                                "verifier_workers": 0})
    r = res["tasks"]["gsm8k"]
    assert [x["greedy"] for x in r["items"]] == [tok.decode(tok.encode(c)).split("Question:")[0] for c in completions]
    for x in r["items"]:
        assert x["greedy_scores"] == gsm8k_scores(x["greedy"], x["answer"])
    assert r["metrics"]["exact_match,strict-match"] == pytest.approx(1 / 3)
    assert r["metrics"]["exact_match,flexible-extract"] == pytest.approx(2 / 3)
    assert r["metrics"]["truncated"] == pytest.approx(1 / 3)  # the second ran to max_new_tokens, no stop string
    md = (tmp_path / "out" / "eval.md")
    runner.write_results(res, tmp_path / "out" / "eval.json")
    assert "| gsm8k | gsm8k | 5 | exact_match,strict-match | 0.3333 |" in md.read_text()


def test_humaneval_preset_runs_the_program_in_the_sandbox(tmp_path, model, tok, monkeypatch):
    """The prompt is the record's prompt as plain text (its trailing newline kept); a completion is cut at lm-eval's
    ``until`` and run with the tests in a sandboxed child; the verifier's deadline is above the sandbox's."""
    rec = {"task_id": "t/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
           "canonical_solution": "    return a + b\n", "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    _jsonl(tmp_path / "humaneval" / "test.jsonl", [rec, dict(rec, task_id="t/1")])
    completions = ["    return a + b\n\ndef unrelated():\n    raise SystemExit(1)\n", "    return a - b\n"]
    seen = {}

    def fake(m, prompts, **kw):
        seen["prompts"] = prompts
        return [GenRecord(tok.encode(c), True) for c in completions]

    monkeypatch.setattr(runner, "generate_all", fake)
    cfg = eval_config({"tasks": [{"name": "humaneval", "preset": "humaneval"}], "local_dir": str(tmp_path),
                       "verifier_workers": 0})
    assert cfg.tasks[0].verifier_timeout_s > VERIFIERS["humaneval"]().timeout_s
    assert cfg.tasks[0].until == list(HUMANEVAL_UNTIL)
    r = evaluate(model, tok, cfg)["tasks"]["humaneval"]
    assert seen["prompts"][0] == tok.encode(rec["prompt"], bos=True)
    assert [x["greedy_score"] for x in r["items"]] == [1.0, 0.0] and r["metrics"]["pass@1"] == 0.5


def test_mmlu_has_lm_evals_57_subjects_and_refuses_others(tmp_path):
    from moxin.eval.tasks import MMLU_SUBJECTS, build_mc_items

    assert len(MMLU_SUBJECTS) == 57 and sorted(set(MMLU_SUBJECTS.values())) == [
        "humanities", "other", "social_sciences", "stem"]
    task = eval_config({"tasks": [{"name": "mmlu", "preset": "mmlu", "path": "x.jsonl"}]}).tasks[0]
    with pytest.raises(Exception, match="subject 'astrology' is not one of preset 'mmlu'"):
        build_mc_items(task, _mmlu_rows("astrology", 2, "x"))


def test_preset_settings_match_the_scorers_and_a_task_overrides_them():
    assert config_eval._GSM8K_UNTIL == list(GSM8K_UNTIL) and config_eval._HUMANEVAL_UNTIL == list(HUMANEVAL_UNTIL)
    for name, p in TASK_PRESETS.items():
        docs = GEN_PRESET_DOCS if p.kind == TaskKind.generation else PRESET_DOCS
        assert name in docs, name
    t = eval_config({"tasks": [{"name": "g", "preset": "gsm8k", "num_fewshot": 0, "max_new_tokens": 9}]}).tasks[0]
    assert (t.num_fewshot, t.max_new_tokens, t.verifier, t.path, t.fewshot_split) == (0, 9, "gsm8k", "openai/gsm8k",
                                                                                       "train")


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(R.CONF_DIR) / "eval").glob("*.yaml")))
def test_every_eval_config_composes_and_its_tasks_resolve(name):
    """conf/eval/NAME.yaml composes under +experiment=eval, builds (no data is read), and every task names a preset
    with a record mapping or a local path; generation tasks name a registered verifier."""
    cfg = eval_config(compose_config(["+experiment=eval", f"eval={name}"]).eval)
    for t in cfg.tasks:
        if t.preset:
            assert t.preset in (GEN_PRESET_DOCS if t.kind == TaskKind.generation else PRESET_DOCS), (name, t.name)
        else:
            assert "${" not in t.path, (name, t.name)
        if t.kind == TaskKind.generation:
            assert t.verifier in VERIFIERS


def test_hellaswag_style_presets_draw_one_few_shot_example_more_like_lm_eval():
    """lm-eval draws num_fewshot + 1 from the train pool when its task has neither fewshot_split nor test_split
    (scripts/eval_preset_agreement.py compares with lm-eval itself): the n kept are the first n of each n + 1 draw."""
    import random

    from moxin.eval.tasks import build_mc_items

    rows = [{"sentence": f"Box {i} is heavier than _ so.", "option1": "the cup", "option2": "the pen",
             "answer": str(1 + i % 2)} for i in range(12)]
    task = eval_config({"tasks": [{"name": "w", "preset": "winogrande", "path": "x.jsonl", "num_fewshot": 3}]}).tasks[0]
    assert task.fewshot_extra_draw is True
    items = build_mc_items(task, rows[:4], rows[4:])
    rnd = random.Random(1234)
    for it in items:
        drawn = rnd.sample(range(8), 4)[:3]
        shots = "".join(rows[4 + j]["sentence"].replace("_", rows[4 + j]["option" + rows[4 + j]["answer"]]) + "\n\n"
                        for j in drawn)
        assert it.contexts[0].startswith(shots)


def test_truthfulqa_mc2_scores_the_true_options_probability_share(tmp_path, model, tok):
    """lm-eval truthfulqa_mc2: the fixed six-QA prompt, then the question; acc is the normalised probability of the
    options labelled 1, from the recorded log-likelihoods (scripts/eval_preset_agreement.py checks lm-eval's)."""
    import math

    rows = [{"question": f"Do bats {i} see?", "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]},
             "mc2_targets": {"choices": [f"Yes {i}.", "They do.", "No."], "labels": [1, 1, 0]}} for i in range(2)]
    _jsonl(tmp_path / "truthfulqa_mc2" / "validation.jsonl", rows)
    res = evaluate(model, tok, {"tasks": [{"name": "tqa", "preset": "truthfulqa_mc2"}], "local_dir": str(tmp_path)})
    r = res["tasks"]["tqa"]
    assert set(r["metrics"]) == {"acc", "acc_stderr"}
    for x in r["items"]:
        p = [math.exp(v) for v in x["loglik"]]
        assert x["acc"] == pytest.approx((p[0] + p[1]) / sum(p), rel=1e-9)
    from moxin.eval.tasks import build_mc_items, load_records

    task = eval_config({"tasks": [{"name": "tqa", "preset": "truthfulqa_mc2", "path": "x"}]}).tasks[0]
    ctx = build_mc_items(task, load_records(str(tmp_path / "truthfulqa_mc2" / "validation.jsonl")))[0].contexts[0]
    assert ctx.startswith("Q: What is human life expectancy") and ctx.endswith("\n\nQ: Do bats 0 see?\nA:")
