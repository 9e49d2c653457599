"""The instruct suite's BBH, PopQA and TruthfulQA MC1 presets end to end on the tiny model from local jsonl fixtures
(no downloads): prompts laid out as the references lay them out, recorded completions scored, per-subtask results
under lm-eval's task names; BBH's hub loading reads one config per subtask."""

import json
from pathlib import Path

import pytest
import torch

import moxin.eval.runner as runner
import moxin.eval.tasks as tasks
from moxin.config import DataError
from moxin.eval import eval_config, evaluate
from moxin.eval.generation import GenRecord
from moxin.eval.tasks import POPQA_PROP_IDS, bbh_prompts, build_gen_items, load_records, task_records
from moxin.model import Transformer
from moxin.presets import load_preset


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=4096, sliding_window=None)
    return Transformer(cfg).eval()


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _items(task, tok):
    records, shots = task_records(task)
    return build_gen_items(task, records, tok, shots)


def _recorded(monkeypatch, tok, completions: list[str]) -> list[dict]:
    """generate_all replaced by the recorded completions (in item order); returns the calls' keyword arguments."""
    calls = []

    def fake(model, prompts, **kw):
        calls.append(kw)
        return [GenRecord(tok.encode(c), False) for c in completions[:len(prompts)]]

    monkeypatch.setattr(runner, "generate_all", fake)
    return calls


BBH_TEST = [{"input": "not ( True ) and ( True ) is", "target": "False", "subtask": "boolean_expressions"},
            {"input": "Question: Fidel lies. Does Fidel tell the truth?", "target": "No", "subtask": "web_of_lies"},
            {"input": "True and not False is", "target": "True", "subtask": "boolean_expressions"}]


def test_bbh_prompt_is_lm_evals_cot_fewshot_layout_and_scores_per_subtask(tmp_path, model, tok, monkeypatch):
    _jsonl(tmp_path / "bbh_cot_fewshot" / "test.jsonl", BBH_TEST)
    cfg = {"tasks": [{"name": "bbh_cot_fewshot", "preset": "bbh_cot_fewshot"}], "local_dir": str(tmp_path),
           "verifier_workers": 0}
    task = eval_config(cfg).tasks[0]
    assert task.num_fewshot == 3 and task.until == ["</s>", "Q", "\n\n"] and task.max_new_tokens == 1024
    assert len(bbh_prompts()) == 27 and all(len(p["samples"]) == 3 for p in bbh_prompts().values())
    items = _items(task, tok)
    for it, rec in zip(items, BBH_TEST):
        p = bbh_prompts()[rec["subtask"]]
        shots = "".join(f"Q: {s['input']}\nA: Let's think step by step.\n{s['target']}\n\n" for s in p["samples"])
        want = p["description"] + shots + f"Q: {rec['input']}\nA: Let's think step by step.\n"
        assert it.prompt_ids == tok.encode(want, bos=True)
        assert it.subject == rec["subtask"] and it.answer == rec["target"]

    calls = _recorded(monkeypatch, tok, ["Not True is False. So the answer is False.",
                                         "Fidel lies.\n\nSo the answer is No.",  # cut at "\n\n": no answer
                                         "So the answer is False."])  # wrong
    res = evaluate(model, tok, cfg)
    assert calls[0]["stop_strings"] == ("</s>", "Q", "\n\n")
    r = res["tasks"]["bbh_cot_fewshot"]
    assert [x["greedy_scores"]["exact_match,get-answer"] for x in r["items"]] == [1.0, 0.0, 0.0]
    assert r["items"][1]["greedy"] == "Fidel lies."
    assert r["metrics"]["exact_match,get-answer"] == pytest.approx(1 / 3)
    assert r["metrics"]["no_answer"] == pytest.approx(1 / 3)
    assert r["subjects"]["boolean_expressions"]["metrics"]["exact_match,get-answer"] == pytest.approx(1 / 2)
    assert r["subjects"]["web_of_lies"]["n"] == 1
    lm = res["results"]
    assert lm["bbh_cot_fewshot"]["exact_match,get-answer"] == pytest.approx(1 / 3)
    assert lm["bbh_cot_fewshot_boolean_expressions"]["alias"] == "bbh_cot_fewshot_boolean_expressions"
    assert res["n-shot"]["bbh_cot_fewshot_web_of_lies"] == 3
    assert "| bbh_cot_fewshot | bbh_cot_fewshot | 3 | exact_match,get-answer | 0.3333 |" in runner.markdown_table(res)


def test_bbh_reads_each_subtask_config_from_the_hub(monkeypatch):
    asked = []

    def fake_load(path, split="test", hub_config=None, data_files=None, name="eval"):
        asked.append((path, split, hub_config))
        return [{"input": f"{hub_config} 1", "target": "x"}]

    monkeypatch.setattr(tasks, "load_records", fake_load)
    task = eval_config({"tasks": [{"name": "bbh", "preset": "bbh_cot_fewshot"}]}).tasks[0]
    records, shots = task_records(task)
    assert asked == [("SaylorTwift/bbh", "test", sub) for sub in bbh_prompts()]
    assert [r["subtask"] for r in records] == list(bbh_prompts())
    assert len(shots) == 81 and {s["subtask"] for s in shots} == set(bbh_prompts())


def test_bbh_refuses_a_record_of_an_unknown_subtask(tmp_path, tok):
    _jsonl(tmp_path / "bbh_cot_fewshot" / "test.jsonl", [{**BBH_TEST[0], "subtask": "chess"}])
    task = eval_config({"tasks": [{"name": "b", "preset": "bbh_cot_fewshot"}], "local_dir": str(tmp_path)}).tasks[0]
    with pytest.raises(DataError, match="subject 'chess' is not one of preset 'bbh_cot_fewshot'"):
        _items(task, tok)


def _popqa_rows() -> list[dict]:
    return [{"id": 100 * k + j, "prop_id": pid, "question": f"Who is r{pid} of e{k}?", "obj": f"O{pid}.{k}",
             "possible_answers": json.dumps([f"O{pid}.{k}", f"alias {pid}.{k}"])}
            for k in range(2) for j, pid in enumerate(POPQA_PROP_IDS)]


def test_popqa_prompt_draws_one_example_per_other_relation_and_scores_the_first_line(tmp_path, model, tok,
                                                                                      monkeypatch):
    rows = _popqa_rows()
    _jsonl(tmp_path / "popqa" / "test.jsonl", rows)
    cfg = {"tasks": [{"name": "popqa", "preset": "popqa", "limit": 3}], "local_dir": str(tmp_path),
           "verifier_workers": 0}
    task = eval_config(cfg).tasks[0]
    assert task.num_fewshot == 15 and task.max_new_tokens == 15 and not task.chat
    items = _items(task, tok)
    assert len(items) == 3
    by_text = {f"Q: {r['question']} A: {r['obj']}": r for r in rows}
    orders = []
    for it, rec in zip(items, rows):
        parts = tok.decode(it.prompt_ids).split("\n\n")
        assert len(parts) == 16 and parts[-1] == f"Q: {rec['question']} A:"
        shots = [by_text[p] for p in parts[:-1]]
        assert sorted(s["prop_id"] for s in shots) == sorted(p for p in POPQA_PROP_IDS if p != rec["prop_id"])
        orders.append([s["prop_id"] for s in shots])
    assert any(o != sorted(o, key=POPQA_PROP_IDS.index) for o in orders)  # shuffled, as the reference does
    assert [i.prompt_ids for i in _items(task, tok)] == [i.prompt_ids for i in items]

    _recorded(monkeypatch, tok, [" O22.0 is right", "\n\nalias 218.0\nO999", " nobody"])
    r = evaluate(model, tok, cfg)["tasks"]["popqa"]
    assert [x["greedy_score"] for x in r["items"]] == [1.0, 1.0, 0.0]
    assert r["metrics"]["exact_match"] == pytest.approx(2 / 3)


def test_popqa_refuses_a_shot_count_that_is_not_a_multiple_of_15(tmp_path, tok):
    _jsonl(tmp_path / "popqa" / "test.jsonl", _popqa_rows())
    task = eval_config({"tasks": [{"name": "p", "preset": "popqa", "num_fewshot": 14}],
                        "local_dir": str(tmp_path)}).tasks[0]
    with pytest.raises(DataError, match="not a multiple of 15"):
        _items(task, tok)


def test_truthfulqa_mc1_scores_the_first_option(tmp_path, model, tok):
    rows = [{"question": f"Can pigs {i} fly?", "mc1_targets": {"choices": ["No.", "Yes.", "Sometimes."],
                                                                "labels": [1, 0, 0]},
             "mc2_targets": {"choices": ["No."], "labels": [1]}} for i in range(3)]
    _jsonl(tmp_path / "truthfulqa_mc1" / "validation.jsonl", rows)
    res = evaluate(model, tok, {"tasks": [{"name": "truthfulqa_mc1", "preset": "truthfulqa_mc1"}],
                                "local_dir": str(tmp_path)})
    r = res["tasks"]["truthfulqa_mc1"]
    for x in r["items"]:
        assert x["gold"] == 0 and x["acc"] == float(max(range(3), key=lambda j: (x["loglik"][j], -j)) == 0)
    assert res["results"]["truthfulqa_mc1"]["acc,none"] == pytest.approx(sum(x["acc"] for x in r["items"]) / 3)
    assert load_records(str(tmp_path / "truthfulqa_mc1" / "validation.jsonl"))[0]["question"] == "Can pigs 0 fly?"
