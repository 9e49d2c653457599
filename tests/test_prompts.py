"""Prompt data module: local jsonl / parquet records, bad records counted, the chat template applied, the built-in
task deterministic, per-rank batches disjoint."""

from __future__ import annotations

import json

import pytest

from moxin.config import DataError
from moxin.data.grpo_data import DEFAULT_INSTRUCTIONS, PromptDataModule
from moxin.tokenizer.chat import render_chat


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


GOOD = [json.dumps({"problem": f"What is {i} + 1?", "answer": str(i + 1), "solution": f"{i} + 1 = {i + 1}"})
        for i in range(20)]


def test_reads_jsonl_and_counts_bad_records(tok, tmp_path):
    bad = ["{not json", json.dumps(["a list"]), json.dumps({"problem": "no answer"}),
           json.dumps({"question": "x?", "answer": ""}), json.dumps({"answer": "3"})]
    path = write_jsonl(tmp_path / "p.jsonl", GOOD + bad + [json.dumps({"question": "Int answer?", "answer": 7})])
    dm = PromptDataModule(source=path, prompts_per_step=4, verifier="math", tokenizer=tok, max_bad_fraction=0.5)
    dm.setup()
    rep = dm.data_report()
    assert rep["records"] == 26 and rep["bad"] == 5 and rep["kept"] == 21
    assert any(":21:" in e and "malformed JSON" in e for e in rep["bad_examples"])
    assert dm.total_steps == 21 // 4
    batch = dm.rank_batches(0)[0]
    assert len(batch) == 4
    r = batch[0]
    user = r["messages"][-1]["content"]
    assert user.endswith(DEFAULT_INSTRUCTIONS["math"])
    assert r["prompt_ids"] == render_chat(r["messages"], tok, add_generation_prompt=True).input_ids
    assert tok.decode(r["prompt_ids"]).rstrip().endswith("<|assistant|>")
    assert {x["answer"] for b in dm.rank_batches(0) for x in b} <= {str(i + 1) for i in range(20)} | {"7"}


def test_too_many_bad_records_stop_the_run(tok, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", GOOD[:5] + ["{bad"] * 5)
    dm = PromptDataModule(source=path, prompts_per_step=2, tokenizer=tok)
    with pytest.raises(DataError, match="bad records"):
        dm.setup()
    empty = write_jsonl(tmp_path / "e.jsonl", ["{bad"])
    with pytest.raises(DataError):
        PromptDataModule(source=empty, prompts_per_step=2, tokenizer=tok, max_bad_fraction=1.0).setup()


def test_reads_parquet_and_drops_long_prompts(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"problem": "Short?", "answer": "1", "solution": None},
            {"problem": "long " * 200, "answer": "2", "solution": None},
            {"problem": "Also short?", "answer": "3", "solution": "x"}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    dm = PromptDataModule(source=str(path), prompts_per_step=1, tokenizer=tok, max_prompt_tokens=64,
                          max_bad_fraction=0.5)
    dm.setup()
    rep = dm.data_report()
    assert rep["kept"] == 2 and rep["too_long"] == 1 and rep["bad"] == 0
    answers = sorted(b[0]["answer"] for b in dm.rank_batches(0))
    assert answers == ["1", "3"]


def test_arithmetic_is_deterministic_and_ranks_are_disjoint(tok):
    kw = dict(source="arithmetic", prompts_per_step=4, steps=3, tokenizer=tok, seed=5)
    a = PromptDataModule(**kw).rank_batches(0)
    b = PromptDataModule(**kw).rank_batches(0)
    assert [[x["answer"] for x in s] for s in a] == [[x["answer"] for x in s] for s in b]
    assert len(a) == 3 and all(len(s) == 4 for s in a) and a[0][0]["solution"]
    r0 = PromptDataModule(**kw, world_size=2).rank_batches(0)
    r1 = PromptDataModule(**kw, world_size=2).rank_batches(1)
    assert len(r0[0]) == 2
    assert [x["messages"][-1]["content"] for x in r0[0] + r1[0]] == [x["messages"][-1]["content"] for x in a[0]]
    dm = PromptDataModule(**kw)
    assert dm.accumulate_grad_batches == 1 and dm.num_epochs == 1 and dm.total_steps == 3
    with pytest.raises(DataError):
        PromptDataModule(source="arithmetic", prompts_per_step=3, steps=1, world_size=2, tokenizer=tok)


def test_arithmetic_pool_cycles_and_warmup_is_disjoint(tok):
    dm = PromptDataModule(source="arithmetic", prompts_per_step=4, steps=4, tokenizer=tok,
                          task={"pool": 8, "max_digits": 2, "solution": "answer"})
    b = dm.rank_batches(0)
    text = lambda s: [x["messages"][-1]["content"] for x in s]  # noqa: E731
    assert text(b[0]) == text(b[2]) and text(b[1]) == text(b[3])  # RL steps revisit the pool of 8
    assert text(b[0]) != text(b[1])
    # the SFT warm-up's conversations (moxin/warmup.py): the RL prompt form answered with the solution, from other
    # problems than the pool's
    convs = dm.solution_conversations(10)
    assert len(convs) == 10 and len({c["messages"][0]["content"] for c in convs}) == 10
    for c in convs:
        user, asst = c["messages"]
        assert user["role"] == "user" and user["content"].endswith(DEFAULT_INSTRUCTIONS["exact"])
        assert asst["role"] == "assistant" and asst["content"].startswith("Answer: ")
    assert not {c["messages"][0]["content"] for c in convs} & set(text(b[0]) + text(b[1]))


def test_file_solution_conversations(tok, tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"problem": "One?", "answer": "1", "solution": "It is 1."},
                                                       {"problem": "Two?", "answer": "2"}]) + "\n")
    dm = PromptDataModule(source=str(path), prompts_per_step=1, tokenizer=tok, max_bad_fraction=0.5)
    convs = dm.solution_conversations(3)  # only the record with a solution, cycling
    assert [c["messages"][-1]["content"] for c in convs] == ["It is 1."] * 3
    dm = PromptDataModule(source=str(path), prompts_per_step=1, tokenizer=tok, solution_field=None)
    with pytest.raises(DataError, match="no record has a solution"):
        dm.solution_conversations(1)
