"""Sources, dedup, mixture, packing: fast CPU tests with tiny corpora written to tmp_path."""

import json
from collections import Counter

import pytest
import torch

from moxin.config import DataError, SourceConfig
from moxin.data.dedup import DedupFilter, normalize_text, text_hash
from moxin.data.mixture import Mixture, validate_weights
from moxin.data.packing import Packer
from moxin.data.bad_records import RecordStats
from moxin.data.documents import iter_documents, iter_records, validate_source


def write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d}) + "\n" for d in docs))
    return path


# ---- packing ----------------------------------------------------------------------------------------------
def test_packing_positions_restart_at_documents_and_labels_are_shifted():
    p = Packer(seq_len=8, bos_id=1, eos_id=2)
    docs = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28], [30]]
    for d in docs:
        p.add(d)
    stream = [t for d in docs for t in [1, *d, 2]]
    rows = []
    while (r := p.pop_row()) is not None:
        rows.append(r)
    assert len(rows) == (len(stream) - 1) // 8
    for k, r in enumerate(rows):
        chunk = stream[k * 8 : k * 8 + 9]
        assert r["input_ids"].tolist() == chunk[:-1]
        for t in range(8):  # labels are the next token, masked only where the next token is a new doc's bos
            want = -100 if chunk[t + 1] == 1 else chunk[t + 1]
            assert r["labels"][t].item() == want
        pos = r["positions"].tolist()
        for t in range(8):
            if t == 0 or r["input_ids"][t].item() == 1:
                assert pos[t] == 0
            else:
                assert pos[t] == pos[t - 1] + 1
    # row 0: [1 10 11 12 2 | 1 20 21] -> positions restart exactly at the second bos
    assert rows[0]["positions"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    # row 1 starts at row 0's last token (22, inside doc 2, no bos): positions restart at 0
    assert rows[1]["input_ids"][0].item() == 22 and rows[1]["positions"][0].item() == 0


def test_packer_state_roundtrip():
    p = Packer(seq_len=4, bos_id=1, eos_id=2)
    p.add([5, 6, 7, 8, 9, 10])
    p.pop_row()
    q = Packer(seq_len=4, bos_id=1, eos_id=2)
    q.load_state_dict(p.state_dict())
    p.add([11]), q.add([11])
    a, b = p.pop_row(), q.pop_row()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- dedup ------------------------------------------------------------------------------------------------
def test_dedup_drops_exact_and_whitespace_case_variants_and_counts():
    assert normalize_text("  Hello\n\tWORLD  ") == "hello world"
    assert normalize_text("ｆｕｌｌ") == "full"  # NFKC
    d = DedupFilter(["a", "b"])
    docs = [("a", "Hello world"), ("a", "hello   WORLD\n"), ("a", "Hello world"), ("a", "other"), ("b", "HELLO world")]
    kept = [t for s, t in docs if d.keep(text_hash(t), s)]
    assert kept == ["Hello world", "other"]
    assert d.counts() == {"a": {"seen": 4, "dropped": 2}, "b": {"seen": 1, "dropped": 1}}
    # a later pass of the source that kept it is repetition, not duplication; another source still drops it
    assert d.keep(text_hash("hello world"), "a", pass_=1)
    assert not d.keep(text_hash("hello world"), "a", pass_=1)
    assert not d.keep(text_hash("hello world"), "b", pass_=3)
    e = DedupFilter(["a", "b"])
    e.load_state_dict(d.state_dict())
    assert len(e) == len(d) and e.counts() == d.counts()
    assert not e.keep(text_hash("OTHER"), "a")


def test_dedup_state_chunks():
    d = DedupFilter(["a"])
    d.CHUNK = 4
    for i in range(10):
        d.keep(i, "a")
    st = d.state_dict()
    assert sorted(st["chunks"]) == ["0", "1", "2"]
    e = DedupFilter(["a"])
    e.load_state_dict(st)
    assert len(e) == 10 and not e.keep(7, "a")


# ---- mixture ----------------------------------------------------------------------------------------------
def test_mixture_follows_weights_and_resumes():
    m = Mixture({"a": 3, "b": 1, "c": 0}, seed=0)
    n = 20000
    c = Counter(m.choose() for _ in range(n))
    assert "c" not in c
    assert abs(c["a"] / n - 0.75) < 0.02 and abs(c["b"] / n - 0.25) < 0.02
    st = m.state_dict()
    nxt = [m.choose() for _ in range(50)]
    m2 = Mixture({"a": 3, "b": 1, "c": 0}, seed=123)
    m2.load_state_dict(st)
    assert [m2.choose() for _ in range(50)] == nxt


@pytest.mark.parametrize(
    "weights, match",
    [
        ({"a": -1, "b": 1}, "'a' is -1"),
        ({"a": 0, "b": 0}, "all mixture weights are zero"),
        ({"zzz": 1}, "unknown source 'zzz'"),
        ({}, "empty"),
        ({"a": "x"}, "not a number"),
    ],
)
def test_mixture_bad_weights(weights, match):
    with pytest.raises(DataError, match=match) as e:
        validate_weights(weights, ["a", "b"], "phase 'ctx2k'")
    assert "phase 'ctx2k'" in str(e.value)


# ---- sources ----------------------------------------------------------------------------------------------
def test_sources_formats_and_sharding(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"doc {i}" for i in range(10)]
    write_jsonl(tmp_path / "a.jsonl", docs)
    pq.write_table(pa.table({"text": docs}), tmp_path / "b.parquet")
    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"{i}.txt").write_text(f"file {i}\nline two")
    assert list(iter_documents(SourceConfig("a", str(tmp_path / "a.jsonl")))) == docs
    assert list(iter_documents(SourceConfig("b", str(tmp_path / "b.parquet")))) == docs
    assert list(iter_documents(SourceConfig("t", str(tmp_path / "t")))) == [f"file {i}\nline two" for i in range(3)]
    assert len(list(iter_documents(SourceConfig("t", str(tmp_path / "t"), txt_unit="line")))) == 6
    # shards are disjoint and cover everything; start resumes inside a shard
    src = SourceConfig("a", str(tmp_path / "a.jsonl"))
    shards = [list(iter_documents(src, k, 3)) for k in range(3)]
    assert sorted(sum(shards, [])) == sorted(docs) and shards[1] == ["doc 1", "doc 4", "doc 7"]
    assert list(iter_documents(src, 1, 3, start=2)) == ["doc 7"]
    assert [p for p, _ in iter_records(src, 1, 3)] == [1, 2, 3]


def test_missing_path_names_source(tmp_path):
    src = SourceConfig("web", str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"'web'.*nope.jsonl.*does not exist"):
        validate_source(src)


def test_a_source_without_documents_is_refused_by_name(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"'empty'.*no document"):
        validate_source(SourceConfig("empty", str(tmp_path / "e.jsonl")))
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"'dir'.*holds no jsonl"):
        validate_source(SourceConfig("dir", str(tmp_path / "d")))


def test_missing_text_field_names_file_line_and_keys(tmp_path):
    f = tmp_path / "code.jsonl"
    f.write_text("\n" + json.dumps({"content": "x = 1", "lang": "py"}) + "\n")
    with pytest.raises(DataError) as e:
        validate_source(SourceConfig("code", str(f)))
    msg = str(e.value)
    assert "'code'" in msg and f"{f}:2" in msg and "'content'" in msg and "'lang'" in msg and "text_field" in msg


def test_parquet_missing_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet has no column 'text' \(columns: \['body'\]\)"):
        validate_source(SourceConfig("pq", str(tmp_path / "x.parquet")))


def test_malformed_lines_counted_then_threshold(tmp_path):
    f = tmp_path / "m.jsonl"
    lines = [json.dumps({"text": f"d{i}"}) for i in range(20)]
    lines[3] = "{not json"
    lines[7] = json.dumps(["a list"])
    f.write_text("\n".join(lines) + "\n")
    stats = RecordStats()
    out = list(iter_documents(SourceConfig("m", str(f), max_bad_records=5), stats=stats))
    assert len(out) == 18 and stats.bad == 2 and stats.records == 20
    assert stats.bad_examples[0].startswith(f"{f}:4: malformed JSON")
    assert f"{f}:8" in stats.bad_examples[1]
    with pytest.raises(DataError, match=r"'m': 2 bad records.*max_bad_records=1") as e:
        list(iter_documents(SourceConfig("m", str(f), max_bad_records=1)))
    assert f"{f}:4" in str(e.value)


def test_hub_source_that_cannot_be_reached_names_the_source_and_the_fix():
    """The real loading path for hub names, exercised offline: a clear DataError, not a traceback from deep inside."""
    from tests.conftest import run_hub_offline

    out = run_hub_offline(
        "from moxin.config import DataError, SourceConfig\nfrom moxin.data.reader import open_hub_dataset\n"
        "try:\n    open_hub_dataset(SourceConfig(name='slim', path='cerebras/SlimPajama-627B'), streaming=True)\n"
        "except DataError as e:\n    print(e)\n")
    assert "data source 'slim'" in out and "cerebras/SlimPajama-627B" in out and "local jsonl / parquet" in out
