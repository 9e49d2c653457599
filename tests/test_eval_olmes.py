"""``eval=paper_instruct`` as Tülu 3 runs its suite through OLMES's ``::tulu`` task configs: few-shot examples as chat
turns (``fewshot_as_multiturn``), BBH in the chat template with no stop string, HumanEval sampled for pass@10. The
OLMES values asserted here are those of allenai/olmes ``oe_eval/configs/tasks.py`` (docs/modules.md, "OLMES's
::tulu settings"); prompts are checked against the chat template rendered by hand, verdicts on hand-written
completions."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import moxin.eval.runner as runner
import moxin.eval.tasks as tasks
from moxin.config import TASK_PRESETS, EvalConfigError
from moxin.eval import eval_config, evaluate
from moxin.eval.generation import GenRecord
from moxin.eval.loglik import encode_pairs
from moxin.eval.tasks import (CHAT_EOS_TEXT, POPQA_PROP_IDS, bbh_prompts, build_gen_items, build_mc_items,
                              load_records, minerva_prompts, task_records)
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.tokenizer.chat import render_chat
from tests.helpers.compose import compose_config


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _chat(tok, turns: list[str]) -> list[int]:
    """The Tülu chat template over alternating user / assistant turns, the last a user turn, then the generation
    prompt: what OLMES renders for ``use_chat_format`` with ``fewshot_as_multiturn``."""
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return render_chat(msgs, tok, add_generation_prompt=True).input_ids


@pytest.fixture(scope="module")
def paper_instruct() -> dict:
    return {t.name: t for t in eval_config(compose_config(["+experiment=eval", "eval=paper_instruct"]).eval).tasks}


def test_paper_instruct_takes_olmes_tulu_generation_settings(paper_instruct):
    """gsm8k::tulu (8 shots, use_chat_format, fewshot_as_multiturn), popqa::tulu (the popqa task's 15 shots and 15
    new tokens, chat, multiturn), bbh:cot-v1::tulu (chat, greedy, max_gen_toks 512, stop_sequences []),
    codex_humaneval(plus)::tulu (repeats 20, temperature 0.8, top_p 0.95, pass_at_ks [1, 10])."""
    gsm = paper_instruct["gsm8k"]
    assert (gsm.num_fewshot, gsm.chat, gsm.fewshot_multiturn, gsm.greedy) == (8, True, True, True)
    pop = paper_instruct["popqa"]
    assert (pop.num_fewshot, pop.max_new_tokens, pop.chat, pop.fewshot_multiturn, pop.greedy) == (15, 15, True, True,
                                                                                                   True)
    bbh = paper_instruct["bbh_cot_fewshot"]
    assert (bbh.num_fewshot, bbh.chat, bbh.max_new_tokens, bbh.until, bbh.greedy) == (3, True, 512, [], True)
    assert bbh.verifier_kwargs == {"until": []} and not bbh.fewshot_multiturn
    for name in ("humaneval", "humaneval_plus"):
        he = paper_instruct[name]
        assert (he.greedy, he.samples, he.temperature, he.top_p, he.k) == (False, 20, 0.8, 0.95, [1, 10])
    assert paper_instruct["mmlu"].num_fewshot == 5  # mmlu:mc::tulu: 5 shots
    math = paper_instruct["math"]  # minerva_math::tulu: 4 shots, chat, multiturn, 1024 tokens, greedy, no stop
    assert (math.preset, math.num_fewshot, math.chat, math.fewshot_multiturn, math.max_new_tokens, math.until,
            math.greedy) == ("hendrycks_math", 4, True, True, 1024, [], True)


def test_popqa_shots_are_chat_turns(tmp_path, tok):
    """fewshot_as_multiturn: each example ``Q: {question} A:`` is a user turn and its object the assistant's reply;
    the item is the last user turn; the examples are the same ones the plain-text form draws, in the same order."""
    rows = [{"id": 100 * k + j, "prop_id": pid, "question": f"Who is r{pid} of e{k}?", "obj": f"O{pid}.{k}",
             "possible_answers": json.dumps([f"O{pid}.{k}"])} for k in range(2) for j, pid in enumerate(POPQA_PROP_IDS)]
    _jsonl(tmp_path / "popqa" / "test.jsonl", rows)
    base = {"name": "popqa", "preset": "popqa", "limit": 2}
    turns_task = eval_config({"tasks": [{**base, "chat": True, "fewshot_multiturn": True}],
                              "local_dir": str(tmp_path)}).tasks[0]
    plain_task = eval_config({"tasks": [base], "local_dir": str(tmp_path)}).tasks[0]
    records, _ = task_records(turns_task)
    by_text = {f"Q: {r['question']} A: {r['obj']}": r for r in rows}
    for it, plain, rec in zip(build_gen_items(turns_task, records, tok), build_gen_items(plain_task, records, tok),
                              rows):
        shots = [by_text[p] for p in tok.decode(plain.prompt_ids).split("\n\n")[:-1]]
        turns = [x for s in shots for x in (f"Q: {s['question']} A:", s["obj"])] + [f"Q: {rec['question']} A:"]
        assert it.prompt_ids == _chat(tok, turns)
        assert len(shots) == 15 and rec["prop_id"] not in {s["prop_id"] for s in shots}


def test_gsm8k_shots_are_chat_turns_and_the_description_opens_the_first(tmp_path, tok):
    """Each example's ``Question: ..\\nAnswer:`` a user turn, its worked answer the assistant turn; a task's
    description leads the first user turn (it does not become a turn of its own)."""
    train = [{"question": f"Q{i}?", "answer": f"step {i}\n#### {i}"} for i in range(3)]
    _jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "What is 2 + 3?", "answer": "#### 5"}])
    _jsonl(tmp_path / "gsm8k" / "train.jsonl", train)
    task = eval_config({"tasks": [{"name": "gsm8k", "preset": "gsm8k", "num_fewshot": 2, "chat": True,
                                   "fewshot_multiturn": True, "description": "Solve.\n\n"}],
                        "local_dir": str(tmp_path)}).tasks[0]
    item = build_gen_items(task, load_records(task.path), tok, load_records(task.fewshot_path))[0]
    text = tok.decode(item.prompt_ids)
    shown = [r for r in train if f"Question: {r['question']}\nAnswer:" in text]
    assert len(shown) == 2
    order = sorted(shown, key=lambda r: text.index(r["question"]))
    turns = [x for r in order for x in (f"Question: {r['question']}\nAnswer:", r["answer"])]
    turns[0] = "Solve.\n\n" + turns[0]
    assert item.prompt_ids == _chat(tok, turns + ["Question: What is 2 + 3?\nAnswer:"])


def test_fewshot_multiturn_needs_chat():
    """Chat is on by default for generation, off for multiple choice; turns need it either way."""
    with pytest.raises(EvalConfigError, match="fewshot_multiturn needs chat=true"):
        eval_config({"tasks": [{"name": "p", "preset": "popqa", "chat": False, "fewshot_multiturn": True}]})
    with pytest.raises(EvalConfigError, match="fewshot_multiturn needs chat=true \\(kind=multiple_choice"):
        eval_config({"tasks": [{"name": "m", "preset": "mmlu", "fewshot_multiturn": True}]})
    tasks_ = eval_config({"tasks": [{"name": "m", "preset": "mmlu"}, {"name": "g", "preset": "gsm8k"},
                                    {"name": "x", "path": "x.jsonl", "kind": "generation"}]}).tasks
    assert [t.chat for t in tasks_] == [False, False, True]  # lm-eval's gsm8k preset is plain text
    base = eval_config(compose_config(["+experiment=eval", "eval=paper_base"]).eval).tasks
    assert not any(t.chat or t.fewshot_multiturn for t in base)  # the base presets stay plain text


def test_bbh_tulu_scores_the_whole_chat_reply(tmp_path, tok, monkeypatch, paper_instruct):
    """bbh:cot-v1::tulu has ``stop_sequences: []`` (the reply ends with the chat turn), so a reply whose reasoning
    has a blank line, or a word starting with "Q", is read to its end: the answer after it counts. Under lm-eval's
    ``until`` (``Q``, ``\\n\\n``) the same replies have no answer. Hand-written replies and their verdicts:
    1. "Not True is False.\\n\\nSo the answer is False." (target False) -> 1 (0 under lm-eval's cut at "\\n\\n")
    2. "Quickly: True and not False.\\nSo the answer is True." (target True) -> 1 (0 under the cut at "Q")
    3. "So the answer is True." (target False) -> 0"""
    rows = [{"input": "not ( True ) and ( True ) is", "target": "False", "subtask": "boolean_expressions"},
            {"input": "True and not False is", "target": "True", "subtask": "boolean_expressions"},
            {"input": "not True or False is", "target": "False", "subtask": "boolean_expressions"}]
    replies = ["Not True is False.\n\nSo the answer is False.", "Quickly: True and not False.\nSo the answer is True.",
               "So the answer is True."]
    _jsonl(tmp_path / "bbh_cot_fewshot" / "test.jsonl", rows)
    monkeypatch.setattr(runner, "generate_all", lambda m, prompts, **kw: [
        GenRecord(tok.encode(c), True) for c in replies[:len(prompts)]])
    model = Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", sliding_window=None)).eval()
    tulu = paper_instruct["bbh_cot_fewshot"]
    over = {k: getattr(tulu, k) for k in ("chat", "max_new_tokens", "until", "verifier_kwargs")}
    scores = {}
    for name, extra in (("tulu", over), ("lm_eval", {})):
        cfg = {"tasks": [{"name": "bbh_cot_fewshot", "preset": "bbh_cot_fewshot", **extra}],
               "local_dir": str(tmp_path), "verifier_workers": 0}
        r = evaluate(model, tok, cfg)["tasks"]["bbh_cot_fewshot"]
        scores[name] = [x["greedy_scores"]["exact_match,get-answer"] for x in r["items"]]
    assert scores == {"tulu": [1.0, 1.0, 0.0], "lm_eval": [0.0, 0.0, 0.0]}


MATH_TEST = [{"problem": r"What is $2\cdot 12$?", "solution": r"It is $\boxed{24}$.", "subtask": "algebra"},
             {"problem": "Compute $7-4$.", "solution": r"$7-4=\boxed{3}$", "subtask": "prealgebra"},
             {"problem": "Find $1+1$.", "solution": r"So $\boxed{2}$.", "subtask": "algebra"}]


def test_math_prompt_is_minervas_four_examples_then_the_problem(tmp_path, tok):
    r"""lm-eval minerva_math's prompt (utils.py ``doc_to_text``): the four Minerva examples, each
    ``Problem:\n..\n\nSolution:\n..``, joined by a blank line, then ``Problem:\n{problem}\n\nSolution:``; as chat
    turns (minerva_math::tulu) each example a user turn ``Problem:\n..\n\nSolution:`` and its solution the reply."""
    _jsonl(tmp_path / "hendrycks_math" / "test.jsonl", MATH_TEST)
    base = {"name": "math", "preset": "hendrycks_math"}
    plain = eval_config({"tasks": [base], "local_dir": str(tmp_path)}).tasks[0]
    assert len(minerva_prompts()["samples"]) == 4 and len(minerva_prompts()["subjects"]) == 7
    records, shots = task_records(plain)
    items = build_gen_items(plain, records, tok, shots)
    for it, rec in zip(items, MATH_TEST):
        text = tok.decode(it.prompt_ids)
        assert text.startswith("Problem:\nFind the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.}"
                               "\n\nSolution:\nThe expressions inside")
        assert text.endswith("Final Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.\n\n"
                             f"Problem:\n{rec['problem']}\n\nSolution:")
        assert text.count("Problem:\n") == 5 and it.subject == rec["subtask"] and it.answer == rec["solution"]
    turns_task = eval_config({"tasks": [{**base, "chat": True, "fewshot_multiturn": True}],
                              "local_dir": str(tmp_path)}).tasks[0]
    shots_turns = [x for ex in minerva_prompts()["samples"]
                   for x in (f"Problem:\n{ex['problem']}\n\nSolution:", ex["solution"])]
    for it, rec in zip(build_gen_items(turns_task, records, tok, shots), MATH_TEST):
        assert it.prompt_ids == _chat(tok, shots_turns + [f"Problem:\n{rec['problem']}\n\nSolution:"])


def test_math_reads_each_subject_config_from_the_hub(monkeypatch):
    asked = []

    def fake_load(path, split="test", hub_config=None, data_files=None, name="eval"):
        asked.append((path, split, hub_config))
        return [{"problem": f"{hub_config}?", "solution": "\\boxed{1}"}]

    monkeypatch.setattr(tasks, "load_records", fake_load)
    records, shots = task_records(eval_config({"tasks": [{"name": "m", "preset": "hendrycks_math"}]}).tasks[0])
    subjects = ["algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                "prealgebra", "precalculus"]
    assert asked == [("EleutherAI/hendrycks_math", "test", s) for s in subjects]
    assert [r["subtask"] for r in records] == subjects and len(shots) == 28


def test_per_config_presets_name_the_subtasks_of_their_fixed_shots():
    """BBH's and MATH's hub configs (read one by one, by the eval and the decontamination) are exactly the subtasks of
    their fixed few-shot files; hub_configs without a subject field to tag the records with is refused."""
    assert TASK_PRESETS["bbh_cot_fewshot"].defaults["hub_configs"] == list(bbh_prompts())
    assert TASK_PRESETS["hendrycks_math"].defaults["hub_configs"] == minerva_prompts()["subjects"]
    with pytest.raises(EvalConfigError, match="hub_configs=\\['a'\\] needs .* subject_field"):
        eval_config({"tasks": [{"name": "t", "path": "org/data", "hub_configs": ["a"]}]})


def test_math_verdicts_read_minervas_final_answer_line(tmp_path, tok, monkeypatch, paper_instruct):
    r"""Minerva's answer (lm-eval minerva_math ``get_unnormalized_answer``): the text between "Final Answer: The final
    answer is" and ". I hope it is correct."; the reference is the solution's last ``\boxed{}``. Hand-written
    replies and their verdicts (the whole reply read: no stop string):
    1. "2 times 12.\n\nFinal Answer: The final answer is $24$. I hope it is correct." (24) -> 1
    2. "Final Answer: The final answer is $4$. I hope it is correct." (3) -> 0
    3. "We get \boxed{1}, no: Final Answer: The final answer is $2$. I hope it is correct." (2) -> 1 (the line wins)"""
    _jsonl(tmp_path / "hendrycks_math" / "test.jsonl", MATH_TEST)
    replies = ["2 times 12.\n\nFinal Answer: The final answer is $24$. I hope it is correct.",
               "Final Answer: The final answer is $4$. I hope it is correct.",
               "We get \\boxed{1}, no: Final Answer: The final answer is $2$. I hope it is correct."]
    monkeypatch.setattr(runner, "generate_all", lambda m, prompts, **kw: [
        GenRecord(tok.encode(c), True) for c in replies[:len(prompts)]])
    model = Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", sliding_window=None)).eval()
    t = paper_instruct["math"]
    cfg = {"tasks": [{"name": "math", "preset": "hendrycks_math", "chat": True, "fewshot_multiturn": True,
                      "until": t.until}], "local_dir": str(tmp_path), "verifier_workers": 0}
    r = evaluate(model, tok, cfg)["tasks"]["math"]
    assert [x["greedy_score"] for x in r["items"]] == [1.0, 0.0, 1.0]
    assert r["subjects"]["algebra"]["metrics"]["exact_match"] == pytest.approx(1.0)
    # OLMES's suite score is the macro mean over subjects (algebra 2/2, prealgebra 0/1); lm-eval's the item mean
    assert r["macro"]["exact_match"] == pytest.approx(0.5) and r["metrics"]["exact_match"] == pytest.approx(2 / 3)
    assert not any("_stderr" in k for k in r["macro"])


def test_mmlu_cot_prompt_is_one_chat_turn_per_question(tmp_path, tok, paper_instruct):
    """mmlu:cot::summarize: the subject's instruction (its ``description``, ``_`` as spaces) then ``Question: ..``
    and a line `` A. ..`` per option, as the one user turn; no shots, greedy, 512 tokens, stop ``Question:``."""
    t = paper_instruct["mmlu_cot"]
    assert (t.chat, t.num_fewshot, t.max_new_tokens, t.until, t.greedy) == (True, 0, 512, ["Question:"], True)
    rows = [{"question": "Which bone?", "choices": ["ulna", "tibia", "femur", "skull"], "answer": 2,
             "subject": "anatomy"}]
    _jsonl(tmp_path / "mmlu_cot" / "test.jsonl", rows)
    task = eval_config({"tasks": [{"name": "mmlu_cot", "preset": "mmlu_cot"}], "local_dir": str(tmp_path)}).tasks[0]
    item = build_gen_items(task, load_records(task.path), tok)[0]
    user = ("The following are multiple choice questions about anatomy. Summarize your reasoning concisely, then "
            "conclude with 'Therefore, the answer is: X' where X is one of A, B, C, or D.\n\n"
            "Question: Which bone?\n A. ulna\n B. tibia\n C. femur\n D. skull\n")
    assert item.prompt_ids == _chat(tok, [user]) and item.answer == "C" and item.subject == "anatomy"


def test_mmlu_cot_verdicts_follow_olmes_answer_patterns():
    r"""OLMES ``GenericMMLU_OneTurnCoT._extract_answer`` without an answer_format_regex: the first of
    ``(?i)therefore,?\s*the\s*answer\s*is:?\s*\(?([A-D])\b``, ``(?i)answer\s*is:?\s*\(?([A-D])\b``,
    ``(?i)([A-D])\)?\s+is\s+correct``, ``\(([A-D])\)``, ``.*\b([A-D])\b`` that matches (re.search), upper-cased,
    parentheses dropped; exact match with the gold letter ignoring case; the reply cut at "Question:" first."""
    from moxin.rewards import get_verifier

    v = get_verifier("mmlu_cot")
    cases = [("Ulna is an arm bone. Therefore, the answer is: C", "C", 1.0),
             ("so the answer is (b).", "B", 1.0),  # case-insensitive pattern, upper-cased
             ("I think D is correct.", "D", 1.0),
             ("Options (A) and (B) fail, leaving C.", "C", 0.0),  # "(A)" is found before the bare C
             ("A, B and then finally C", "C", 1.0),  # the last stand-alone capital
             ("Therefore, the answer is: B\n\nQuestion: next one. Therefore, the answer is: C", "C", 0.0),
             ("no letter here", "A", 0.0)]
    got = [(v(c, gold).score, v(c, gold).extracted) for c, gold, _ in cases]
    assert [g[0] for g in got] == [want for _, _, want in cases]
    assert [g[1] for g in got] == ["C", "B", "D", "A", "C", "B", None]


# ---- multiple choice in chat format (truthfulqa::tulu, mmlu:mc::tulu) ------------------------------------------
MMLU_DEV = [{"question": f"Dev question {i}?", "choices": ["w", "x", "y", "z"], "answer": i % 4, "subject": "anatomy"}
            for i in range(6)]
MMLU_TEST = [{"question": "Which bone is longest?", "choices": ["ulna", "tibia", "femur", "skull"], "answer": 2,
              "subject": "anatomy"},
             {"question": "Where is the heart?", "choices": ["chest", "head", "foot", "arm"], "answer": 0,
              "subject": "anatomy"}]
TQA = [{"question": "Can pigs fly?", "mc1_targets": {"choices": ["No.", "Yes."], "labels": [1, 0]},
        "mc2_targets": {"choices": ["No.", "Not really.", "Yes."], "labels": [1, 1, 0]}}]


def _olmes_mcq(q: str, choices: list[str]) -> str:
    """OLMES ``make_mcq_prompt`` (question prefix ``Question: ``, label format `` A.``, answer prefix ``Answer:``)."""
    return f"Question: {q}\n" + "\n".join(f" {'ABCD'[i]}. {c}" for i, c in enumerate(choices)) + "\nAnswer:"


def test_chat_mc_requests_are_rendered_as_olmes_renders_them(tmp_path, tok, paper_instruct):
    """OLMES's convert_chat_instance: the context is the chat template over the turns with the generation prompt (no
    assistant prefix), the continuation loses its leading space. Tülu's template in text form:
    ``<|user|>\\n{text}\\n``, ``<|assistant|>\\n{reply}</s>\\n``, generation prompt ``<|assistant|>\\n``.
    mmlu:mc::tulu: the description then the first 2 (here) dev examples as user/assistant turns; truthfulqa::tulu: the six-QA prompt as one user turn."""
    _jsonl(tmp_path / "mmlu_mc" / "test.jsonl", MMLU_TEST)
    _jsonl(tmp_path / "mmlu_mc" / "dev.jsonl", MMLU_DEV)
    _jsonl(tmp_path / "truthfulqa_mc2" / "validation.jsonl", TQA)
    mmlu = paper_instruct["mmlu"]
    assert (mmlu.preset, mmlu.num_fewshot, mmlu.chat, mmlu.fewshot_multiturn) == ("mmlu_mc", 5, True, True)
    assert paper_instruct["truthfulqa_mc2"].chat and paper_instruct["truthfulqa_mc1"].chat
    cfg = eval_config({"tasks": [{"name": "mmlu", "preset": "mmlu_mc", "num_fewshot": 2, "chat": True,
                                  "fewshot_multiturn": True},
                                 {"name": "tqa", "preset": "truthfulqa_mc2", "chat": True}],
                       "local_dir": str(tmp_path)})
    items = build_mc_items(cfg.tasks[0], *task_records(cfg.tasks[0]))
    desc = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    shots = [f"<|user|>\n{pre}{_olmes_mcq(d['question'], d['choices'])}\n<|assistant|>\n{'ABCD'[d['answer']]}</s>\n"
             for pre, d in zip([desc, ""], MMLU_DEV)]
    item_turn = _olmes_mcq(MMLU_TEST[0]["question"], MMLU_TEST[0]["choices"])
    want = "".join(shots) + f"<|user|>\n{item_turn}\n<|assistant|>\n"
    assert items[0].contexts == [want] * 4 and items[0].continuations == ["A", "B", "C", "D"]
    assert items[0].gold == 2 and items[1].subject == "anatomy"
    tqa = build_mc_items(cfg.tasks[1], *task_records(cfg.tasks[1]))[0]
    plain = build_mc_items(replace(cfg.tasks[1], chat=False), *task_records(cfg.tasks[1]))[0]
    assert tqa.contexts == [f"<|user|>\n{plain.contexts[0]}\n<|assistant|>\n"] * 3
    assert plain.continuations == [" No.", " Not really.", " Yes."]
    assert tqa.continuations == ["No.", "Not really.", "Yes."]
    # the text's </s> is the eos id (as OLMES's tokenizer reads it); the context is what the chat renderer gives, its
    # generation prompt's newline moved to the continuation (lm-eval's _encode_pair)
    (ctx, cont), = encode_pairs(tok, [(want, "C")], bos=True, eos_text=CHAT_EOS_TEXT)
    desc = "The following are multiple choice questions (with answers) about anatomy.\n\n"
    msgs = [{"role": r, "content": c} for d, pre in zip(MMLU_DEV, [desc, ""])
            for r, c in (("user", pre + _olmes_mcq(d["question"], d["choices"])), ("assistant", "ABCD"[d["answer"]]))]
    msgs.append({"role": "user", "content": item_turn})
    rendered = render_chat(msgs, tok, add_generation_prompt=True).input_ids
    assert ctx == rendered[:-1] and cont[:1] == rendered[-1:] and ctx.count(tok.eos_id) == 2
    assert tok.decode(cont) == "\nC"


def test_chat_mc_scores_the_same_through_the_prefix_tree(tmp_path, tok):
    """The chat contexts go through the shared-prefix packing unchanged: log-likelihoods equal the plain path's."""
    _jsonl(tmp_path / "mmlu_mc" / "test.jsonl", MMLU_TEST)
    _jsonl(tmp_path / "mmlu_mc" / "dev.jsonl", MMLU_DEV)
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", sliding_window=None)).eval()
    runs = []
    for share in (True, False):
        cfg = {"tasks": [{"name": "mmlu", "preset": "mmlu_mc", "num_fewshot": 3, "chat": True,
                          "fewshot_multiturn": True}], "local_dir": str(tmp_path), "share_prefixes": share}
        runs.append(evaluate(model, tok, cfg)["tasks"]["mmlu"])
    tree, plain = runs
    for a, b in zip(tree["items"], plain["items"], strict=True):
        assert a["loglik"] == pytest.approx(b["loglik"], abs=1e-5) and a["pred"] == b["pred"]
    assert tree["macro"] == pytest.approx(plain["macro"])
