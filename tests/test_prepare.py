"""Prepared pretraining data (moxin.prepare + data.prepared): same stream as the raw path, exact resume, readers'
disjoint ranges, refusals, dedup across sources and parts; hub sources read by file."""

import json
import random

import pytest

from moxin.config import DataError, SourceConfig
from moxin.data.prepared import PreparedData, reader_range
from moxin.data.pretrain_data import PretrainDataModule
from moxin.data.reader import read_positioned
from moxin.prepare import PrepareOptions, merge, run_part
from moxin.tokenizer import load_tokenizer
from tests.helpers.batches import as_list, assert_same_batches, ckpt_roundtrip


class ByteTok:
    """Picklable stand-in tokenizer: bytes + shift, bos 1, eos 2 (``shift`` makes another tokenizer)."""

    bos_id, eos_id, vocab_size = 1, 2, 260

    def __init__(self, shift=3):
        self.shift = shift

    def encode(self, text, bos=False, eos=False):
        return [1] * bos + [b + self.shift for b in text.encode()] + [2] * eos


PHASES = [
    {"name": "short", "seq_len": 32, "tokens": 6 * 256, "mixture": {"prose": 3, "code": 1}},
    {"name": "long", "seq_len": 64, "tokens": 4 * 256, "mixture": {"prose": 1, "code": 1}},
]


@pytest.fixture
def corpus(tmp_path):
    prose = [f"prose document {i} " + "word " * (i % 13) for i in range(300)]
    prose += prose[:20] + ["PROSE   document 5 " + "word " * 5]  # exact copies and a case/space variant
    code = [f"def f{i}():\n    return {i}" + " " * (i % 5) for i in range(200)]
    d = tmp_path / "raw"
    d.mkdir()
    (d / "prose.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose) + "{bad line\n")
    (d / "code.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in code))
    return [SourceConfig("prose", str(d / "prose.jsonl")), SourceConfig("code", str(d / "code.jsonl"), "content")]


def prepare_dir(sources, out, tok=None, parts=1, **kw):
    tok = tok or ByteTok()
    opts = PrepareOptions(parts=parts, shard_tokens=kw.pop("shard_tokens", 2000), **kw)
    for i in range(parts):
        run_part(sources, tok, out, i, opts, log=lambda *_: None)
    return merge(sources, tok, out, opts, log=lambda *_: None)


def make(sources, workers=0, **kw):
    args = dict(tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, max_seq_len=128, num_workers=workers,
                seed=7, val_percent=10, val_tokens=128, world_size=1)
    args.update(kw)
    dm = PretrainDataModule(sources, PHASES, **args)
    dm.setup("fit")
    return dm


def test_prepared_and_raw_give_the_same_token_stream(corpus, tmp_path):
    man = prepare_dir(corpus, tmp_path / "prep", parts=2)
    assert man["sources"]["prose"]["dup_exact"] == 21 and man["sources"]["prose"]["stats"]["bad"] == 1
    assert man["sources"]["prose"]["documents"] == 300 and man["sources"]["code"]["documents"] == 200
    raw, prep = make(corpus), make([], prepared=str(tmp_path / "prep"))
    for phase in (0, 1):
        assert_same_batches(as_list(prep.build_train_loader(phase)), as_list(raw.build_train_loader(phase)))
    assert_same_batches(as_list(prep.val_dataloader()), as_list(raw.val_dataloader()))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_prepared_data_is_exact_mid_phase_and_across_the_phase_change(corpus, tmp_path, workers):
    prepare_dir(corpus, tmp_path / "prep")
    dm = make([], workers, prepared=str(tmp_path / "prep"))
    full = as_list(dm.build_train_loader(0)) + as_list(dm.build_train_loader(1))
    n0 = len(full) - dm.batches_per_rank(1)
    for k in (9, n0 + 5):  # mid phase 0; mid phase 1 (the readers carried across the change)
        phase = int(k >= n0)
        dm1 = make([], workers, prepared=str(tmp_path / "prep"))
        head = as_list(dm1.build_train_loader(0)) if phase else []
        loader = dm1.build_train_loader(phase)
        it = iter(loader)
        head += as_list(next(it) for _ in range(k - len(head)))
        state, dm_state = ckpt_roundtrip(loader.state_dict()), ckpt_roundtrip(dm1.state_dict())
        del it, loader
        dm2 = make([], workers, prepared=str(tmp_path / "prep"))
        dm2.load_state_dict(dm_state)
        loader2 = dm2.build_train_loader(phase)
        loader2.load_state_dict(state)
        tail = as_list(loader2) + ([] if phase else as_list(dm2.build_train_loader(1)))
        assert_same_batches(head + tail, full)


def test_two_ranks_by_two_workers_read_disjoint_ranges_covering_every_document_once(corpus, tmp_path):
    prepare_dir(corpus, tmp_path / "prep", shard_tokens=500)
    data = PreparedData(tmp_path / "prep")
    assert len(data.sources["prose"]["shards"]) > 4
    world, workers = 2, 2
    total = sum(sh["bin_bytes"] + sh["idx_bytes"] for s in data.sources.values() for sh in s["shards"])
    for name in ("prose", "code"):
        seen = []
        for rank in range(world):
            for worker in range(workers):
                shard = rank * workers + worker  # as PackedDataset numbers its readers
                reader = PreparedData(tmp_path / "prep")
                docs = list(reader.iter_docs(name, shard, world * workers))
                lo, hi = reader_range(data.num_docs(name), shard, world * workers)
                assert [p for p, _, _ in docs] == list(range(1, hi - lo + 1))
                seen += [(h, bytes(ids.tolist())) for _, h, ids in docs]
                assert reader.bytes_read < 0.4 * total  # about its quarter of one source, never the whole corpus
        assert len(seen) == data.num_docs(name) == len(set(seen))


def test_a_changed_tokenizer_or_a_missing_shard_is_refused(corpus, tmp_path):
    man = prepare_dir(corpus, tmp_path / "prep")
    with pytest.raises(DataError, match=r"tokenized with 'ByteTok'.*this run's tokenizer.*prepare the corpus again"):
        make([], prepared=str(tmp_path / "prep"), tokenizer=ByteTok(shift=4))
    files = 2 * sum(len(s["shards"]) for s in man["sources"].values())  # a .bin and an .idx a shard
    assert PreparedData(tmp_path / "prep").verify_checksums() == files
    shard = tmp_path / "prep" / man["sources"]["code"]["shards"][0]["bin"]
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"1 file\(s\) differ from .*manifest.json: \[.*code/00000-0000.bin"):
        PreparedData(tmp_path / "prep").verify_checksums()
    shard.unlink()
    with pytest.raises(DataError, match=r"shard file .*code/00000-0000.bin is missing.*source 'code'"):
        make([], prepared=str(tmp_path / "prep"))
    with pytest.raises(DataError, match=r"no manifest.json.*python -m moxin.prepare"):
        make([], prepared=str(tmp_path))


def test_merge_refuses_until_every_part_is_done(corpus, tmp_path):
    opts = PrepareOptions(parts=3)
    run_part(corpus, ByteTok(), tmp_path, 1, opts, log=lambda *_: None)
    with pytest.raises(DataError, match=r"2 of 3 parts are not done.*prepare.part=i prepare.parts=3 \(i in \[0, 2\]\)"):
        merge(corpus, ByteTok(), tmp_path, opts)


def _words(rng, n):
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "zeta"])
                    + str(rng.randrange(1000)) for _ in range(n))


def test_dedup_finds_planted_exact_and_near_duplicates_across_sources_and_parts(tmp_path):
    pytest.importorskip("datasketch")
    rng = random.Random(0)
    a = [_words(rng, 200) for _ in range(60)]
    exact = [a[i].upper().replace(" ", "  ") for i in range(0, 20, 2)]  # 10 exact copies (normalised text)
    near = []
    for i in range(1, 20, 2):  # 10 near copies: one word of 200 changed
        w = a[i].split()
        w[100] = "changed"
        near.append(" ".join(w))
    b = [_words(rng, 200) for _ in range(40)] + exact + near
    for name, docs in (("a", a), ("b", b)):
        for f in range(4):  # four files a source, so two parts split each
            (tmp_path / f"{name}{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[f::4]))
    sources = [SourceConfig("a", str(tmp_path / "a*.jsonl")), SourceConfig("b", str(tmp_path / "b*.jsonl"))]
    man = prepare_dir(sources, tmp_path / "prep", parts=2, near_dedup=True, threshold=0.8, num_perm=128)
    assert man["sources"]["a"]["dup_exact"] == 0 and man["sources"]["a"]["dup_near"] == 0
    assert man["sources"]["b"]["dup_exact"] == 10 and man["sources"]["b"]["dup_near"] == 10
    assert man["sources"]["b"]["documents"] == 40 and man["sources"]["b"]["dead_tokens"] > 0
    data = PreparedData(tmp_path / "prep")
    kept = {bytes(ids.tolist()) for _, _, ids in data.iter_docs("b", 0, 1)}
    assert kept == {bytes(ByteTok().encode(t)) for t in b[:40]}


def test_hub_source_is_read_by_file_each_reader_its_own_and_resumes_by_seeking(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for f in range(5):
        pq.write_table(pa.table({"text": [f"file {f} doc {i}" for i in range(7)]}),
                       tmp_path / "hub" / "data" / f"train-{f:05d}.parquet")
    src = SourceConfig("h", str(tmp_path / "hub"), format="hub")
    texts = []
    for shard in range(2):
        got = list(read_positioned(src, shard=shard, num_shards=2, columns=["text"]))
        files = {int(r["text"].split()[1]) for _, _, r in got}
        assert files == set(range(shard, 5, 2))  # its own files, whole
        texts += [r["text"] for _, _, r in got]
        pos = got[9][0]
        assert pos == [1, 3]  # 7 records a file: the 10th record is the 3rd of the reader's 2nd file
        rest = list(read_positioned(src, shard=shard, num_shards=2, start=pos, columns=["text"]))
        assert [r for _, _, r in rest] == [r for _, _, r in got[10:]]
    assert sorted(texts) == sorted(f"file {f} doc {i}" for f in range(5) for i in range(7))
    man = prepare_dir([src], tmp_path / "prep", parts=2)  # prepare splits the hub files between its parts
    assert man["sources"]["h"]["documents"] == 35


def test_prepare_command_composes_and_writes_data_the_run_accepts(tmp_path):
    from hydra import compose, initialize_config_dir

    from moxin.paths import conf_dir
    from moxin.prepare import prepare

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(40)))
    src = f"[{{name: c, path: '{tmp_path / 'c.jsonl'}'}}]"
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("prepare", overrides=[f"out={tmp_path / 'prep'}", f"data.sources={src}", "prepare.parts=2"])
    man = prepare(cfg, log=lambda *_: None)
    assert man["sources"]["c"]["documents"] == 40 and man["tokenizer"]["name"] == "mistral"
    dm = PretrainDataModule([], [{"name": "p", "seq_len": 16, "tokens": 64, "mixture": {"c": 1}}],
                            tokenizer=load_tokenizer("mistral"),
                            tokens_per_step=64, micro_batch_tokens=32, num_workers=0, val_percent=0, world_size=1,
                            prepared=str(tmp_path / "prep"))
    dm.setup("fit")  # a separately loaded "mistral" has the manifest's fingerprint
    assert len(list(dm.build_train_loader(0))) == 2
    with pytest.raises(DataError, match=r"manifest.json exists"):
        prepare(cfg, log=lambda *_: None)
    said = []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base=None):
        cfg = compose("prepare", overrides=[f"out={tmp_path / 'prep'}", "prepare.verify=true"])
    assert prepare(cfg, log=said.append) is None and "sha256 of all 2 shard and index files match" in said[0]


@pytest.mark.slow
def test_data_bench_smoke(tmp_path):
    """scripts/bench/data.py end to end on a 3 MB corpus (both paths, near dedup); no assertion on speed."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "data.json"
    r = subprocess.run([sys.executable, str(root / "scripts" / "bench" / "data.py"), "--smoke", "--corpus",
                        str(tmp_path / "c"), "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["slice"]["rows"][0]["raw"] >= 0.99  # every raw reader reads the whole corpus
    assert data["full"]["rows"][0]["ours"] < 0.25  # a prepared reader reads about its eighth
    assert data["near"]["exact_dropped"] == data["near"]["exact_planted"]
    assert data["full"]["exact_dropped"] == data["full"]["exact_planted"]


def test_resume_of_a_hub_source_read_by_file_is_exact(tmp_path, monkeypatch):
    """The [file, record] position travels through the loader and checkpoint state like a record count."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "hub").mkdir()
    for f in range(3):
        pq.write_table(pa.table({"text": [f"hub file {f} document {i} " + "x" * (i % 7) for i in range(30)]}),
                       tmp_path / "hub" / f"train-{f:05d}.parquet")
    src = [{"name": "h", "path": str(tmp_path / "hub"), "format": "hub"}]
    phases = [{"name": "p", "seq_len": 32, "tokens": 8 * 256, "mixture": {"h": 1}}]
    kw = dict(tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, max_seq_len=64, num_workers=0,
              seed=7, val_percent=0, world_size=1)
    full = as_list(PretrainDataModule(src, phases, **kw).build_train_loader(0))
    dm1 = PretrainDataModule(src, phases, **kw)
    loader = dm1.build_train_loader(0)
    it = iter(loader)
    head = as_list(next(it) for _ in range(20))
    state, dm_state = ckpt_roundtrip(loader.state_dict()), ckpt_roundtrip(dm1.state_dict())
    assert dm_state["readers"][0][0]["sources"]["h"]["pos"][0] >= 1  # inside the second file or later
    del it, loader
    dm2 = PretrainDataModule(src, phases, **kw)
    dm2.load_state_dict(dm_state)
    loader2 = dm2.build_train_loader(0)
    loader2.load_state_dict(state)
    assert_same_batches(head + as_list(loader2), full)
