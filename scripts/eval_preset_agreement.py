"""Agreement of moxin's presets with lm-evaluation-harness's own task configs, on local jsonl copies: every request
(few-shot examples, description, delimiters, continuations) of gsm8k, mmlu (one subject), piqa, arc_challenge,
hellaswag, winogrande, truthfulqa_mc1 and truthfulqa_mc2 at the paper's few-shot counts, and of bbh_cot_fewshot
(three subtasks: prompt ids, stop strings, token budget); gsm8k's and bbh's filters and exact_match on the same
completions; truthfulqa_mc2's score on the same log-likelihoods.

    # an environment with moxin and lm-eval (no model, no network), e.g.
    #   python -m venv /tmp/lmeval-venv && /tmp/lmeval-venv/bin/pip install lm-eval==0.4.9.1
    PYTHONPATH=$PWD:/path/to/moxin/.venv/lib/python3.11/site-packages /tmp/lmeval-venv/bin/python \
        scripts/eval_preset_agreement.py

lm-eval's task yamls are read from the installed package with its own loader (``include`` and ``!function``
resolved), their dataset switched to jsonl files written here (``dataset_path: json``), built as lm-eval's
``ConfigurableTask`` with the few-shot seed ``simple_evaluate`` sets (1234), and compared with moxin's items.
Exit status 1 on any difference.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from moxin.config import EvalConfig
from moxin.eval.scoring import gsm8k_scores, truncate_at
from moxin.eval.tasks import _docs_with_prefix, _gen_doc, build_gen_items, build_mc_items, load_records, task_records
from moxin.rewards import get_verifier
from moxin.tokenizer import load_tokenizer


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _lm_task(cfg: dict):
    from lm_eval.api.task import ConfigurableTask

    return ConfigurableTask(config=cfg)


def _yaml(path: Path) -> dict:
    """lm-eval's own loader: ``include`` merged, ``!function`` resolved."""
    from lm_eval.utils import load_yaml_config

    return load_yaml_config(str(path), mode="full")


def _requests_agree(name: str, cfg: dict, files: dict, num_fewshot: int, ours_task: dict, eval_split: str,
                    shots_split: str = "train") -> int:
    """lm-eval's (context, continuation) requests of ``cfg`` over ``files`` against moxin's items of ``ours_task``."""
    cfg = {k: v for k, v in cfg.items() if k not in ("tag", "group", "include")}
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    task = _lm_task(cfg)
    task.set_config(key="num_fewshot", value=num_fewshot)
    task.set_fewshot_seed(1234)
    task.build_all_requests(rank=0, world_size=1)
    ours = EvalConfig(tasks=[{**ours_task, "path": files[eval_split], "fewshot_path": files[shots_split],
                              "num_fewshot": num_fewshot}]).tasks[0]
    items = build_mc_items(ours, load_records(files[eval_split]), load_records(files[shots_split]))
    bad = 0
    for inst in task.instances:
        it = items[inst.doc_id]
        mine = (it.contexts[inst.idx], it.continuations[inst.idx])
        if tuple(inst.args) != mine:
            bad += 1
            print(f"{name} doc {inst.doc_id} option {inst.idx}: differ\n--- lm-eval\n{inst.args!r}\n"
                  f"--- moxin\n{mine!r}")
    print(f"{name}: {len(task.instances)} requests compared ({num_fewshot}-shot)")
    return bad


def check_base_table(tmp: Path, tasks_dir: Path) -> int:
    """ARC-C 25-shot, HellaSwag 10-shot, Winogrande 5-shot (the paper's few-shot columns), PIQA few-shot."""
    arc = [{"id": f"q{i}", "question": f"Which item {i} conducts heat?",
            "choices": {"text": [f"wood {i}", f"iron {i}", f"glass {i}", f"cloth {i}"][: 3 + i % 2],
                        "label": ["A", "B", "C", "D"][: 3 + i % 2] if i % 3 else ["1", "2", "3", "4"][: 3 + i % 2]},
            "answerKey": "B" if i % 3 else "2"} for i in range(30)]
    hs = [{"ind": i, "activity_label": f"Sport {i}", "ctx_a": f"A man walks to the field {i}.",
           "ctx_b": "he picks up a ball", "ctx": "", "source_id": "x", "split": "train", "split_type": "indomain",
           "endings": [f"and throws it [title] far {i}.", "and sits.", "then  runs.", "and waits."],
           "label": str(i % 4)} for i in range(14)]
    wg = [{"sentence": f"The trophy {i} did not fit in the case because _ was too big.", "option1": "the trophy",
           "option2": "the case", "answer": str(1 + i % 2)} for i in range(9)]
    piqa = [{"goal": f"Keep bread {i} fresh", "sol1": f"Seal it in a bag {i}.", "sol2": "Leave it open.",
             "label": i % 2} for i in range(12)]
    bad = 0
    cases = (("piqa", piqa, 5, "piqa/piqa.yaml", "validation"),
             ("arc_challenge", arc, 25, "arc/arc_challenge.yaml", "test"),
             ("hellaswag", hs, 10, "hellaswag/hellaswag.yaml", "validation"),
             ("winogrande", wg, 5, "winogrande/default.yaml", "validation"))
    for name, rows, shots, path, split in cases:
        n_eval = 3
        files = {"train": _jsonl(tmp / f"{name}_train.jsonl", rows[n_eval:]),
                 split: _jsonl(tmp / f"{name}_{split}.jsonl", rows[:n_eval])}
        bad += _requests_agree(name, _yaml(tasks_dir / path), files, shots, {"name": name, "preset": name}, split)
    return bad


GSM8K_TRAIN = [{"question": f"Sam has {i} pens and finds {i + 2}. How many now?",
                "answer": f"{i} + {i + 2} = {2 * i + 2}\n#### {2 * i + 2}"} for i in range(12)]
GSM8K_TEST = [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
              {"question": "What is 10 * 100?", "answer": "10 * 100 = 1000\n#### 1,000"},
              {"question": "A shop sells 3 pens for $4.50. Price of one?", "answer": "4.50 / 3 = 1.5\n#### 1.5"},
              {"question": "What is 7 - 10?", "answer": "7 - 10 = -3\n#### -3"}]


def check_gsm8k(tmp: Path, tasks_dir: Path) -> int:
    files = {"train": _jsonl(tmp / "gsm8k_train.jsonl", GSM8K_TRAIN),
             "test": _jsonl(tmp / "gsm8k_test.jsonl", GSM8K_TEST)}
    cfg = _yaml(tasks_dir / "gsm8k" / "gsm8k.yaml")
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs={"data_files": files})
    task = _lm_task(cfg)
    task.set_fewshot_seed(1234)  # what simple_evaluate does (fewshot_random_seed=1234)
    task.build_all_requests(rank=0, world_size=1)
    insts = sorted(task.instances, key=lambda x: x.doc_id)
    ours = EvalConfig(tasks=[{"name": "gsm8k", "preset": "gsm8k", "path": files["test"],
                              "fewshot_path": files["train"]}]).tasks[0]
    pairs = _docs_with_prefix(ours, load_records(files["test"]), load_records(files["train"]), _gen_doc,
                              lambda t, d: d.text + t.target_delimiter + d.target)
    bad = 0
    for inst, (doc, prefix) in zip(insts, pairs):
        if inst.args[0] != prefix + doc.text:
            bad += 1
            print(f"gsm8k doc {inst.doc_id}: contexts differ\n--- lm-eval\n{inst.args[0]!r}\n"
                  f"--- moxin\n{prefix + doc.text!r}")
    completions = [" 2 + 3 = 5\n#### 5", " so 10 * 100 is 1,000 apples.", " one pen costs $1.50.\n#### 1.50",
                   " 7 - 10 = -3\n#### -3\n\nQuestion: 9\n#### 9"]
    for inst, comp in zip(insts, completions):
        inst.resps = [comp.split("Question:")[0]]  # lm-eval's model cuts at `until` before the filters
    for f in task._filters:
        f.apply(task.instances)
    for inst, comp in zip(insts, completions):
        ref = {f"exact_match,{name}": task.process_results(inst.doc, [inst.filtered_resps[name]])["exact_match"]
               for name in ("strict-match", "flexible-extract")}
        mine = gsm8k_scores(comp, inst.doc["answer"])
        status = "ok" if ref == mine else "DIFF"
        bad += ref != mine
        print(f"gsm8k doc {inst.doc_id}: lm-eval {ref} moxin {mine} {status}")
    print(f"gsm8k: {len(insts)} contexts compared (5-shot), filters on {len(completions)} completions")
    return bad


BBH_TEST = {"boolean_expressions": [{"input": "not ( True and False ) is", "target": "True"},
                                    {"input": "False or not True is", "target": "False"}],
            "web_of_lies": [{"input": "Question: Fidel lies. Ka says Fidel lies. Does Ka tell the truth?",
                             "target": "Yes"}],
            "date_understanding": [{"input": "Today is 1/2/2020. What is the date tomorrow?\nOptions:\n(A) 01/03/2020"
                                             "\n(B) 01/04/2020", "target": "(A)"}]}
BBH_COMPLETIONS = ["not (True and False) = not False = True. So the answer is True.",
                   "False or False = False. So the answer is False",  # no full stop: the last character is lost
                   "Ka tells the truth.\n\nSo the answer is Yes.",  # cut at the blank line first
                   "Tomorrow is 01/03/2020. So the answer is (A). Q: next"]  # cut at "Q": "(A)." is taken


def check_bbh(tmp: Path, tasks_dir: Path) -> int:
    """bbh_cot_fewshot: each subtask's prompt ids (description, the three CoT examples, the question), its
    ``until`` and ``max_gen_toks``; the get-answer filter and exact_match on the same completions."""
    tok = load_tokenizer("mistral")
    rows = [{**r, "subtask": sub} for sub, rs in BBH_TEST.items() for r in rs]
    ours = EvalConfig(tasks=[{"name": "bbh", "preset": "bbh_cot_fewshot",
                              "path": _jsonl(tmp / "bbh_all.jsonl", rows)}]).tasks[0]
    records, shots = task_records(ours)
    items = build_gen_items(ours, records, tok, shots)
    verifier = get_verifier("bbh")
    bad, n = 0, 0
    for sub, recs in BBH_TEST.items():
        cfg = {k_: v for k_, v in _yaml(tasks_dir / "bbh" / "cot_fewshot" / f"{sub}.yaml").items()
               if k_ not in ("tag", "group", "include")}
        cfg.update(dataset_path="json", dataset_name=None,
                   dataset_kwargs={"data_files": {"test": _jsonl(tmp / f"bbh_{sub}.jsonl", recs)}})
        task = _lm_task(cfg)
        task.set_fewshot_seed(1234)
        task.build_all_requests(rank=0, world_size=1)
        insts = sorted(task.instances, key=lambda x: x.doc_id)
        for inst in insts:
            it = items[n]
            n += 1
            ctx, gen_kwargs = inst.args
            if tok.encode(ctx, bos=True) != it.prompt_ids or it.subject != sub:
                bad += 1
                print(f"bbh {sub} doc {inst.doc_id}: prompts differ\n--- lm-eval\n{ctx!r}\n"
                      f"--- moxin\n{tok.decode(it.prompt_ids)!r}")
            if list(gen_kwargs["until"]) != ours.until or gen_kwargs["max_gen_toks"] != ours.max_new_tokens:
                bad += 1
                print(f"bbh {sub}: generation settings differ: lm-eval {gen_kwargs}, moxin until={ours.until} "
                      f"max_new_tokens={ours.max_new_tokens}")
            inst.completion = BBH_COMPLETIONS[(n - 1) % len(BBH_COMPLETIONS)]
            inst.resps = [truncate_at(inst.completion, gen_kwargs["until"])]  # what lm-eval's model returns
        for f in task._filters:
            f.apply(task.instances)
        for inst in insts:
            comp = inst.completion
            ref = task.process_results(inst.doc, [inst.filtered_resps["get-answer"]])["exact_match"]
            mine = verifier(truncate_at(comp, tuple(ours.until)), inst.doc["target"]).score
            bad += ref != mine
            print(f"bbh {sub} doc {inst.doc_id}: lm-eval exact_match {ref} moxin {mine} "
                  f"{'ok' if ref == mine else 'DIFF'}")
    print(f"bbh_cot_fewshot: {n} prompts compared (3-shot CoT, {len(BBH_TEST)} subtasks)")
    return bad


def check_mmlu(tmp: Path, tasks_dir: Path) -> int:
    subj = "high_school_physics"
    rows = [{"question": f" Q{i} about {subj}? ", "subject": subj, "choices": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"],
             "answer": i % 4} for i in range(8)]
    files = {"dev": _jsonl(tmp / "mmlu_dev.jsonl", rows[:5]), "test": _jsonl(tmp / "mmlu_test.jsonl", rows[5:])}
    return _requests_agree(f"mmlu_{subj}", _yaml(tasks_dir / "mmlu" / "default" / f"mmlu_{subj}.yaml"), files, 5,
                           {"name": "mmlu", "preset": "mmlu"}, "test", shots_split="dev")


def check_truthfulqa(tmp: Path, tasks_dir: Path) -> int:
    """truthfulqa_mc1 / mc2 requests, and mc2's score on the same log-likelihoods."""
    import random

    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    from moxin.eval.runner import _mc2

    rows = [{"question": f"Do bats {i} see?", "mc1_targets": {"choices": [f"Yes {i}.", "No.", "Never."],
                                                              "labels": [1, 0, 0]},
             "mc2_targets": {"choices": [f"Yes {i}.", "They do.", "No.", "Never."], "labels": [1, 1, 0, 0]}}
            for i in range(3)]
    files = {"validation": _jsonl(tmp / "tqa.jsonl", rows), "train": _jsonl(tmp / "tqa_train.jsonl", rows)}
    bad = 0
    for name in ("truthfulqa_mc1", "truthfulqa_mc2"):
        bad += _requests_agree(name, _yaml(tasks_dir / "truthfulqa" / f"{name}.yaml"), files, 0,
                               {"name": name, "preset": name}, "validation")
    rnd = random.Random(0)
    for doc in rows:
        lls = [rnd.uniform(-30, -1) for _ in range(4)]
        ref = float(process_results_mc2(doc, [(x, False) for x in lls])["acc"])
        mine = _mc2(lls, doc["mc2_targets"]["labels"])
        bad += abs(ref - mine) > 1e-12
        print(f"truthfulqa_mc2 score: lm-eval {ref:.12f} moxin {mine:.12f}")
    return bad


def main() -> int:
    import lm_eval

    tasks_dir = Path(lm_eval.__file__).parent / "tasks"
    print(f"lm-eval {getattr(lm_eval, '__version__', '?')} at {tasks_dir}")
    with tempfile.TemporaryDirectory() as d:
        bad = check_gsm8k(Path(d), tasks_dir) + check_mmlu(Path(d), tasks_dir) + check_base_table(Path(d), tasks_dir)
        bad += check_truthfulqa(Path(d), tasks_dir) + check_bbh(Path(d), tasks_dir)
    print("agreement: all equal" if not bad else f"agreement: {bad} differences")
    return int(bad > 0)


if __name__ == "__main__":
    sys.exit(main())
