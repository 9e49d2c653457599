"""Phase-3 enhancement data (data=moxin_enhance): benchmark records rendered as text through the source machinery,
local copies for offline machines, and n-gram decontamination against eval splits in the preparation (exactly the
planted records dropped or flagged, the report's counts)."""

import json

import numpy as np
import pyarrow as pa
from omegaconf import OmegaConf
import pyarrow.parquet as pq
import pytest

from moxin.config import TASK_PRESETS, DataError, DecontaminateConfig, SourceConfig
from moxin.data import decontaminate
from moxin.data.bad_records import RecordStats
from moxin.data.decontaminate import (REPORT, Decontaminator, EvalNgrams, SourceCounts, eval_splits, format_table,
                                      ngram_hashes, normalized_words)
from moxin.data.documents import iter_documents, validate_source
from moxin.data.enhance import TEMPLATES
from moxin.data.pretrain_data import PretrainDataModule
from moxin.prepare import PrepareOptions, merge, prepare, run_part

QUIET = dict(log=lambda *_: None)


class ByteTok:
    """Picklable stand-in tokenizer: bytes + 3, bos 1, eos 2."""

    bos_id, eos_id, vocab_size = 1, 2, 260

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + 3 for b in text.encode()] + [2] * eos


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- templates ---------------------------------------------------------------------------------------------------
RECORDS = {
    "mmlu": ({"train": {"question": " What is 2+2? ", "subject": "", "choices": ["3", "4", "5", "6"], "answer": 1}},
             "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B"),
    "hellaswag": ({"activity_label": "Baking", "ctx_a": "She mixes flour.", "ctx_b": "then she",
                   "endings": ["sings [title] loudly.", "bakes the dough."], "label": "1"},
                  "Baking: She mixes flour. Then she bakes the dough."),
    "arc": ({"question": "Which is a mammal?", "choices": {"text": ["Shark", "Whale"], "label": ["A", "B"]},
             "answerKey": "B"}, "Question: Which is a mammal?\nAnswer: Whale"),
    "piqa": ({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             "Question: Open a jar\nAnswer: Twist the lid."),
    "winogrande": ({"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                    "option2": "the table", "answer": "2"}, "The cup fell off the table because the table was tilted."),
    "gsm8k": ({"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = 2\n#### 2"},
              "Question: Tom has 3 apples and eats 1. How many are left?\nAnswer: 3 - 1 = 2\n#### 2"),
    "math": ({"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
             "Problem:\nCompute $1+1$.\n\nSolution:\nIt is $\\boxed{2}$."),
}


def test_every_template_renders_question_then_gold_answer(tmp_path):
    assert set(RECORDS) == set(TEMPLATES)
    for name, (rec, text) in RECORDS.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [rec])
        src = SourceConfig(name, str(path), template=name)
        assert list(iter_documents(src)) == [text], name


def test_templated_source_counts_records_that_do_not_fit(tmp_path):
    good = {"question": "Q?", "answer": "A"}
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [good, {"question": "no answer"}, good, {"answer": "no question"}])
    stats = RecordStats()
    src = SourceConfig("gsm8k", str(path), template="gsm8k")
    assert list(iter_documents(src, stats=stats)) == ["Question: Q?\nAnswer: A"] * 2
    assert stats.records == 4 and stats.kept == 2 and stats.bad == 2
    assert "no field 'answer'" in stats.bad_examples[0] and "gsm8k.jsonl:2" in stats.bad_examples[0]
    with pytest.raises(DataError, match="template 'gsmk' unknown; choose one of"):
        list(iter_documents(SourceConfig("x", str(path), template="gsmk")))


def test_local_copy_replaces_the_hub_and_parquet_reads_every_column(tmp_path):
    rows = [{"question": f"Question {i}?", "choices": {"text": ["no", "yes"], "label": ["A", "B"]}, "answerKey": "B"}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc_easy.parquet")
    src = SourceConfig("arc_easy", "allenai/ai2_arc", hub_config="ARC-Easy", template="arc", local_dir=str(tmp_path))
    assert src.path == str(tmp_path / "arc_easy.parquet") and src.hub_config is None and src.local_dir is None
    assert validate_source(src)["kind"] == "local"
    assert list(iter_documents(src)) == [f"Question: Question {i}?\nAnswer: yes" for i in range(3)]
    with pytest.raises(DataError, match=r"holds no copy of 'openai/gsm8k' \(looked for .*gsm8k.jsonl"):
        SourceConfig("gsm8k", "openai/gsm8k", hub_config="main", local_dir=str(tmp_path))


# ---- n-grams -----------------------------------------------------------------------------------------------------
def test_ngrams_of_normalised_words():
    assert normalized_words("The CAT, sat; on-the mat!") == ["the", "cat", "sat", "onthe", "mat"]
    a = ngram_hashes(normalized_words("one two three four"), 3)
    b = ngram_hashes(normalized_words("ONE two, three! four"), 3)
    assert a.dtype == np.uint64 and len(a) == 2 and np.array_equal(a, b)
    assert len(ngram_hashes(["a", "b"], 3)) == 0
    c = ngram_hashes(["two", "three", "four"], 3)
    assert c[0] == a[1] and c[0] != a[0]  # the same words give the same hash wherever they stand
    idx = EvalNgrams(3)
    idx.add("t1", [{"q": "one two three four", "short": "x y"}])
    idx.add("t2", [{"q": ["two three four five"]}])
    pos, masks = idx.match(ngram_hashes(normalized_words("zero one two three four five"), 3))
    assert pos.tolist() == [1, 2, 3] and masks.tolist() == [1, 3, 2]
    assert idx.meta["t1"] == {"records": 1, "ngrams": 2, "shorter_than_n": 0}


def test_eval_splits_of_the_paper_presets_each_once(tmp_path):
    splits = eval_splits(DecontaminateConfig(eval=["paper_base"], local_dir=str(tmp_path)))
    assert [s.name for s in splits] == ["arc_challenge", "hellaswag", "mmlu", "winogrande", "arc_easy", "piqa"]
    assert splits[0].path == f"{tmp_path}/arc_challenge/test.jsonl"
    hub = {s.name: (s.path, s.split, s.hub_config) for s in eval_splits(DecontaminateConfig(eval=["paper_instruct"]))}
    assert hub["gsm8k"] == ("openai/gsm8k", "test", "main") and hub["mmlu_mc"] == ("cais/mmlu", "test", "all")
    assert hub["bbh_cot_fewshot"] == ("SaylorTwift/bbh", "test", None)  # read config by config (hub_configs)
    with pytest.raises(DataError, match="'paper_nope' is no eval config"):
        eval_splits(DecontaminateConfig(eval=["paper_nope"]))


BBH_TEXT = "Today is Christmas Eve of the year nineteen thirty seven what is the date tomorrow in the usual format"


def test_multi_config_hub_datasets_are_read_config_by_config(tmp_path, monkeypatch):
    """BBH and MATH have one hub config per subtask and none without a name (datasets raises): every config is read,
    its records counted under their subtask in the report; MMLU's single "all" config keeps its own subjects."""
    asked = []

    def fake_hub(src, streaming):
        asked.append((src.path, src.hub_config))
        if src.path == "cais/mmlu":
            return [{"question": "What bone is the femur?", "subject": "anatomy", "choices": ["a", "b"], "answer": 0},
                    {"question": "What is a virus?", "subject": "virology", "choices": ["a", "b"], "answer": 1}]
        if src.hub_config is None:
            raise DataError(f"{src.path}: Config name is missing; pick one of its configs")
        text = BBH_TEXT if src.hub_config == "date_understanding" else f"An item of {src.hub_config}"
        return [{"input": text, "target": "(A)"}] * (2 if src.hub_config == "navigate" else 1)

    monkeypatch.setattr(decontaminate, "open_hub_dataset", fake_hub)
    (tmp_path / "eval.yaml").write_text("tasks:\n  - {name: bbh, preset: bbh_cot_fewshot}\n"
                                        "  - {name: math, preset: hendrycks_math}\n  - {name: mmlu, preset: mmlu}\n")
    decon = Decontaminator.from_config(DecontaminateConfig(eval=[str(tmp_path / "eval.yaml")]), **QUIET)
    bbh_configs, math_configs = (TASK_PRESETS[p].defaults["hub_configs"] for p in ("bbh_cot_fewshot", "hendrycks_math"))
    assert asked == ([("SaylorTwift/bbh", c) for c in bbh_configs] + [("EleutherAI/hendrycks_math", c)
                     for c in math_configs] + [("cais/mmlu", "all")])
    bbh = decon.index.meta["bbh_cot_fewshot"]
    assert bbh["hub_configs"] == bbh_configs and bbh["records"] == 28
    assert bbh["subjects"] == {c: 2 if c == "navigate" else 1 for c in sorted(bbh_configs)}
    assert decon.index.meta["hendrycks_math"]["subjects"] == dict.fromkeys(math_configs, 1)
    mmlu = decon.index.meta["mmlu"]
    assert mmlu["subjects"] == {"anatomy": 1, "virology": 1} and "hub_configs" not in mmlu
    counts = SourceCounts()
    assert decon.check("Q: " + BBH_TEXT.upper() + "?", counts, "train:1")
    assert list(counts.tasks) == ["bbh_cot_fewshot"] and counts.examples[0]["tasks"] == ["bbh_cot_fewshot"]
    # offline: the local copy is one file whose records carry the subtask; the hub is not asked
    asked.clear()
    write_jsonl(tmp_path / "ev" / "bbh_cot_fewshot" / "test.jsonl",
                [{"input": BBH_TEXT, "target": "(A)", "subtask": "date_understanding"},
                 {"input": "x", "target": "y", "subtask": "snarks"}])
    (tmp_path / "bbh.yaml").write_text("tasks:\n  - {name: bbh, preset: bbh_cot_fewshot}\n")
    local = Decontaminator.from_config(DecontaminateConfig(eval=[str(tmp_path / "bbh.yaml")],
                                                           local_dir=str(tmp_path / "ev")), **QUIET)
    meta = local.index.meta["bbh_cot_fewshot"]
    assert asked == [] and meta["subjects"] == {"date_understanding": 1, "snarks": 1} and "hub_configs" not in meta


# ---- decontamination in the preparation --------------------------------------------------------------------------
EVAL_ARC = "Which of these processes moves water from the ocean surface into the air above the sea on a warm day"
EVAL_GSM = "Natalia sold clips to forty eight of her friends in April and then she sold half as many clips in May"


@pytest.fixture
def planted(tmp_path):
    """Eval copies (arc_challenge, gsm8k) and two training sources; the planted records share a 13-gram with an
    eval record (different case and punctuation), a near miss shares only 12 words."""
    ev = tmp_path / "eval"
    write_jsonl(ev / "arc_challenge" / "test.jsonl", [
        {"id": "1", "question": EVAL_ARC + "?", "choices": {"text": ["evaporation", "melting"], "label": ["A", "B"]},
         "answerKey": "A"},
        {"id": "2", "question": "Short one?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}])
    write_jsonl(ev / "gsm8k" / "test.jsonl", [{"question": EVAL_GSM + ".", "answer": "72"}])
    (tmp_path / "eval.yaml").write_text(
        "tasks:\n  - {name: arc_c, preset: arc_challenge}\n  - {name: arc_c25, preset: arc_challenge, num_fewshot: 25}"
        "\n  - {name: gsm8k, preset: gsm8k}\n")
    words = EVAL_ARC.split()
    arc = [{"question": f"Filler question number {i} about rocks and rivers?", "choices": {"text": ["x", "y"],
            "label": ["A", "B"]}, "answerKey": "A"} for i in range(12)]
    arc[3]["question"] = "Teacher asks: " + " ".join(words[2:15]).upper() + ", explain."    # 13 words: planted
    arc[7]["choices"]["text"][0] = "; ".join(words[5:18])                                    # planted in an answer
    arc[9]["question"] = " ".join(words[0:12]) + " quickly"                                 # 12 words: near miss
    gsm = [{"question": f"Sam has {i} pens and buys {i + 2} more. How many now?", "answer": f"#### {2 * i + 2}"}
           for i in range(8)]
    gsm[5]["question"] = EVAL_GSM.lower() + "?"                                              # planted
    d = tmp_path / "enhance"
    write_jsonl(d / "arc_challenge.jsonl", arc)
    write_jsonl(d / "gsm8k.jsonl", gsm)
    write_jsonl(d / "prose.jsonl", [{"text": f"Prose {i}. " + EVAL_ARC} for i in range(3)])  # not checked
    sources = [SourceConfig("prose", str(d / "prose.jsonl")),
               SourceConfig("arc_challenge", "allenai/ai2_arc", hub_config="ARC-Challenge", template="arc",
                            local_dir=str(d)),
               SourceConfig("gsm8k", "openai/gsm8k", hub_config="main", template="gsm8k", local_dir=str(d))]
    cfg = {"eval": [str(tmp_path / "eval.yaml")], "local_dir": str(ev)}
    return sources, cfg


def prepare_checked(sources, decon, out, parts=1):
    opts = PrepareOptions(parts=parts, shard_tokens=4000)
    checker = Decontaminator.from_config(decon, **QUIET)
    for i in range(parts):
        run_part(sources, ByteTok(), out, i, opts, decon=checker, **QUIET)
    return merge(sources, ByteTok(), out, opts, decon=decon, **QUIET)


def test_exactly_the_planted_records_are_dropped_and_reported(planted, tmp_path):
    sources, cfg = planted
    decon = DecontaminateConfig(**cfg)
    manifest = prepare_checked(sources, decon, tmp_path / "out", parts=2)
    docs = {n: m["documents"] for n, m in manifest["sources"].items()}
    assert docs == {"prose": 3, "arc_challenge": 10, "gsm8k": 7}
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["eval_tasks"]["arc_challenge"]["records"] == 2  # 0-shot and 25-shot read one split: once
    assert report["eval_tasks"]["arc_challenge"]["shorter_than_n"] == 1 and set(report["eval_tasks"]) == {
        "arc_challenge", "gsm8k"}
    arc, gsm = report["sources"]["arc_challenge"], report["sources"]["gsm8k"]
    assert (arc["checked"], arc["contaminated"], arc["dropped"], arc["flagged"]) == (12, 2, 2, 0)
    assert arc["tasks"] == {"arc_challenge": {"records": 2, "ngrams": 1 + 1}}
    assert (gsm["checked"], gsm["dropped"]) == (8, 1)
    assert gsm["tasks"] == {"gsm8k": {"records": 1, "ngrams": len(EVAL_GSM.split()) - 13 + 1}}
    assert [e["where"].rsplit(":", 1)[1] for e in arc["examples"]] == ["4", "8"]
    assert arc["examples"][0]["ngram"] == " ".join(EVAL_ARC.lower().split()[2:15])
    assert "prose" not in report["sources"]
    assert manifest["decontamination"]["sources"]["gsm8k"] == {"checked": 8, "contaminated": 1, "dropped": 1,
                                                               "flagged": 0}
    table = format_table(report)
    assert "arc_challenge    arc_challenge" in table and "dropped" in table


def test_flag_keeps_the_records_and_a_run_needs_the_checked_preparation(planted, tmp_path):
    sources, cfg = planted
    decon = DecontaminateConfig(**cfg, action="flag", n=12)
    manifest = prepare_checked(sources, decon, tmp_path / "out")
    assert {n: m["documents"] for n, m in manifest["sources"].items()} == {"prose": 3, "arc_challenge": 12, "gsm8k": 8}
    report = json.loads((tmp_path / "out" / REPORT).read_text())
    assert report["sources"]["arc_challenge"]["flagged"] == 3  # at n=12 the near miss overlaps too
    phases = [{"name": "p", "seq_len": 32, "tokens": 256, "mixture": {"arc_challenge": 1, "gsm8k": 1}}]
    args = dict(tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, num_workers=0, val_percent=0,
                world_size=1, rank=0)
    with pytest.raises(DataError, match="the sources are read raw: benchmark training splits would be trained on"):
        PretrainDataModule(sources, phases, decontaminate=cfg, **args).setup("fit")
    with pytest.raises(DataError, match="was prepared with decontamination .*'n': 12"):
        PretrainDataModule(sources, phases, decontaminate=cfg, prepared=str(tmp_path / "out"), **args).setup("fit")
    dm = PretrainDataModule(sources, phases, decontaminate=decon, prepared=str(tmp_path / "out"), **args)
    dm.setup("fit")
    batch = next(iter(dm.build_train_loader(0)))  # trains on the checked preparation
    assert tuple(batch["input_ids"].shape) == (2, 32)


def test_parts_prepared_with_other_settings_do_not_merge(planted, tmp_path):
    sources, cfg = planted
    decon = DecontaminateConfig(**cfg)
    opts = PrepareOptions(parts=1)
    run_part(sources, ByteTok(), tmp_path / "out", 0, opts, **QUIET)
    with pytest.raises(DataError, match="was prepared with data.decontaminate None, the merge has"):
        merge(sources, ByteTok(), tmp_path / "out", opts, decon=decon, **QUIET)
    with pytest.raises(DataError, match="names \\['nope'\\], which the data config does not list"):
        Decontaminator(DecontaminateConfig(sources=["nope"]), EvalNgrams(13)).checked_sources(sources)
    counts = SourceCounts()
    assert not Decontaminator(decon, EvalNgrams(13)).check("any text at all", counts, "x") and counts.checked == 1


def test_prepare_entry_reads_the_data_configs_decontaminate_block(planted, tmp_path):
    """`python -m moxin.prepare data=...`'s function: the data config's block runs the check and writes the report."""
    sources, cfg = planted
    lines = []
    conf = OmegaConf.create({"out": str(tmp_path / "out"), "tokenizer": "mistral",
                             "prepare": {"parts": 1, "shard_tokens": 4096},
                             "data": {"sources": [vars(s) for s in sources], "decontaminate": cfg}})
    manifest = prepare(conf, log=lines.append)
    assert manifest["sources"]["gsm8k"]["decontaminated"] == 1
    assert manifest["sources"]["arc_challenge"]["documents"] == 10
    assert (tmp_path / "out" / REPORT).is_file() and any("(any)" in line for line in lines)
    assert any(line.startswith("decontamination: gsm8k") for line in lines)
