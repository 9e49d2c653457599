"""PretrainDataModule: exact resume of the stateful loader, phases, validation split, config errors."""

import json

import pytest
import torch

from moxin.config import DataError
from moxin.data.phases import Phase
from moxin.data.pretrain_data import PretrainDataModule
from tests.helpers.batches import as_list, assert_same_batches, ckpt_roundtrip
from tests.helpers.two_source_corpus import PHASES, ByteTok, make, write_corpus


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path)


def _documents(batches) -> list[str]:
    """The whole documents of one reader's micro-batches, in order: its rows' inputs laid end to end are the
    packer's token stream (a row's last label is the next row's first input), bos + bytes + eos per document. A
    document cut short (a bos before its eos) or a token outside any document is listed as a marker string, so
    it matches no text of the corpus; the stream's last document, still in the packer, is left out."""
    stream = torch.cat([b["input_ids"].flatten() for b in batches]).tolist()
    out, cur = [], None
    for t in stream:
        if t == ByteTok.bos_id:
            if cur is not None:
                out.append(f"<cut short: {bytes(cur).decode(errors='replace')!r}>")
            cur = []
        elif cur is None:
            out.append(f"<token {t} outside a document>")
        elif t == ByteTok.eos_id:
            out.append(bytes(cur).decode())
            cur = None
        else:
            cur.append(t - 3)
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_phase_is_exact(corpus, workers):
    dm = make(corpus, workers)
    assert dm.accumulate_grad_batches == 4 and dm.batches_per_rank(0) == 24
    full = as_list(dm.build_train_loader(0))
    assert len(full) == 24
    k = 9
    dm1 = make(corpus, workers)
    loader = dm1.build_train_loader(0)
    it = iter(loader)
    head = as_list(next(it) for _ in range(k))
    state = ckpt_roundtrip(loader.state_dict())
    dm_state = ckpt_roundtrip(dm1.state_dict())
    del it, loader
    dm2 = make(corpus, workers)
    dm2.load_state_dict(dm_state)
    loader2 = dm2.build_train_loader(0)
    loader2.load_state_dict(state)
    tail = as_list(loader2)
    assert_same_batches(head + tail, full)


@pytest.mark.parametrize("workers", [0, 2])
def test_phases_switch_seq_len_keep_tokens_per_step(corpus, workers):
    dm = make(corpus, workers)
    assert [dm.steps_in_phase(i) for i in (0, 1)] == [6, 4] and dm.total_steps == 10
    assert [dm.phase_for_step(s) for s in (0, 5, 6, 9, 50)] == [0, 0, 1, 1, 1]
    b0 = as_list(dm.build_train_loader(0))
    b1 = as_list(dm.build_train_loader(1))
    assert len(b0) == 6 * 4 and len(b1) == 4 * 4
    assert b0[0]["input_ids"].shape == (2, 32) and b1[0]["input_ids"].shape == (1, 64)
    acc = dm.accumulate_grad_batches
    assert acc * b0[0]["input_ids"].numel() == acc * b1[0]["input_ids"].numel() == 256
    # phase 2 continues every reader where phase 1 left it: positions, packer buffer, dedup set
    texts = {}  # document text -> (source, record index)
    for src in corpus:
        with open(src["path"]) as f:
            for i, line in enumerate(f):
                if line.startswith('{"'):  # the fixture's last line is malformed on purpose
                    texts.setdefault(json.loads(line)[src.get("text_field", "text")], (src["name"], i))
    nw = max(workers, 1)
    for w in range(nw):  # the loader takes batches from its workers in turn; worker w reads shard w
        docs = _documents(b0[w::nw] + b1[w::nw])
        assert len(docs) > 20
        assert all(d in texts and texts[d][1] % nw == w for d in docs), "a document cut or lost at the phase switch"
        assert len(set(docs)) == len(docs), "a document of phase 1 read again in phase 2"
        for name in ("prose", "code"):
            idx = [texts[d][1] for d in docs if texts[d][0] == name]
            assert idx == sorted(idx) and len(idx) > 2, (name, idx)  # each source read on, in file order
    rep = dm.data_report()
    assert rep["phase"] == "long"
    assert rep["sources"]["prose"]["dedup_dropped"] == 0  # no document met twice (a reader reset)
    assert rep["sources"]["prose"]["bad"] == 0  # the bad line is at the end, not read yet
    assert rep["tokens"] > 10 * 256 * 0.5


def test_val_split_is_held_out_and_report_counts(corpus, tmp_path):
    phases = [Phase("all", 32, 64 * 400, {"prose": 1})]
    dm = PretrainDataModule(corpus, phases, tokenizer=ByteTok(), tokens_per_step=64, micro_batch_tokens=64,
                            max_seq_len=64, num_workers=0, val_percent=30, val_tokens=128, world_size=1)
    dm.setup("fit")
    train = torch.cat([b["input_ids"].flatten() for b in dm.build_train_loader(0)])
    val = torch.cat([b["input_ids"].flatten() for b in dm.val_dataloader()])
    assert val.numel() == 128
    dec = lambda t: bytes((t[t > 2] - 3).tolist()).decode(errors="replace")
    train_text, val_text = dec(train), dec(val)
    val_docs = [s for s in val_text.split("prose document ") if s.strip()]
    assert val_docs
    for d in val_docs[1:-1]:  # whole documents in the middle of the val stream
        assert ("prose document " + d) not in train_text
    rep = dm.data_report()["sources"]["prose"]
    assert rep["dedup_dropped"] >= 18  # 20 exact copies + 1 case variant, minus the held-out ones
    assert rep["bad"] >= 1 and "prose.jsonl:322: malformed JSON" in rep["bad_examples"][0]
    assert dm.data_report()["val_held_out"] > 0


def test_loaders_leave_the_global_generator_alone(corpus):
    """Building and reading the train and validation loaders draws nothing from torch's global generator (each
    loader has its own, `loader_generator`), so the generator state a checkpoint records does not depend on how
    many loaders a run built: a run resumed from a checkpoint that a validation pass followed builds them again."""
    phases = [Phase("all", 32, 64 * 400, {"prose": 1})]
    dm = PretrainDataModule(corpus, phases, tokenizer=ByteTok(), tokens_per_step=64, micro_batch_tokens=64,
                            max_seq_len=64, num_workers=0, val_percent=30, val_tokens=128, world_size=1)
    dm.setup("fit")
    before = torch.get_rng_state()
    train = dm.build_train_loader(0)
    next(iter(train))
    as_list(dm.val_dataloader())
    as_list(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), before)
    assert train.generator is not None


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(max_seq_len=48), r"phase 'long': seq_len 64 is beyond the model's max_seq_len 48"),
        (dict(tokens_per_step=288), r"tokens_per_step=288 is not a multiple of micro_batch_tokens \* world_size"),
        (dict(micro_batch_tokens=96, tokens_per_step=96 * 4), r"phase 'long'.*micro_batch_tokens=96 is not a multiple of seq_len=64"),
        (dict(world_size=3), r"not a multiple"),
    ],
)
def test_inconsistent_batch_and_phase_settings_are_refused(corpus, kw, match):
    with pytest.raises(DataError, match=match):
        make(corpus, **kw)


def test_phase_mixture_errors(corpus):
    bad = [dict(PHASES[0], mixture={"prose": 1, "web": 1})]
    with pytest.raises(DataError, match=r"phase 'short': mixture names unknown source 'web'"):
        PretrainDataModule(corpus, bad, tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, world_size=1)
    bad = [dict(PHASES[0], mixture={"prose": 0, "code": 0})]
    with pytest.raises(DataError, match=r"phase 'short': all mixture weights are zero"):
        PretrainDataModule(corpus, bad, tokenizer=ByteTok(), tokens_per_step=256, micro_batch_tokens=64, world_size=1)


def test_connect_hands_in_the_run_objects_and_rechecks(corpus):
    dm = make(corpus, tokenizer=None, world_size=None, max_seq_len=None)
    with pytest.raises(DataError, match=r"no tokenizer: hand it in with connect"):
        dm.tokenizer
    tok = ByteTok()
    dm.connect(tok, world_size=2, max_seq_len=128)
    assert dm.tokenizer is tok and dm.accumulate_grad_batches == 2
    with pytest.raises(DataError, match=r"phase 'long': seq_len 64 is beyond the model's max_seq_len 48"):
        dm.connect(tok, max_seq_len=48)


def test_setup_validates_sources(corpus, tmp_path):
    corpus[1]["text_field"] = "text"
    dm = make(corpus)
    with pytest.raises(DataError, match=r"'code'.*code.jsonl:1 has no field 'text' \(fields: \['content'\]\)"):
        dm.setup("fit")
