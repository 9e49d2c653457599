"""The DPO reference cache: values equal a direct computation; the key changes with the data, the checkpoint,
the max length and the tokenizer, and stays put when nothing changed; a stale or damaged cache is rebuilt."""

from __future__ import annotations

import json
import time

import pytest
import torch

from moxin.data.dpo_data import PreferenceDataModule
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.stages import refcache
from moxin.tokenizer import load_tokenizer, mistral_model_path


def _pairs(path, n=6, word="Oslo"):
    with open(path, "w") as fh:
        for i in range(n):
            u = {"role": "user", "content": f"Question {i}?"}
            fh.write(json.dumps({"chosen": [u, {"role": "assistant", "content": f"{word} {i}."}],
                                 "rejected": [u, {"role": "assistant", "content": "No."}]}) + "\n")
    return str(path)


def _dm(path, tok, max_length=64):
    return PreferenceDataModule(train=path, tokenizer=tok, max_length=max_length, batch_size=2, micro_batch_size=2,
                                num_workers=0, world_size=1)


def _key(dm, ckpt):
    _ = dm.train_set
    return refcache.cache_key({"reference": refcache.checkpoint_identity(ckpt), "data": dm.reference_identity("train"),
                               "loss_type": "dpo_norm"})


def test_key_changes_with_every_input(tmp_path, tok):
    data = _pairs(tmp_path / "p.jsonl")
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"weights v1")
    k0 = _key(_dm(data, tok), str(ckpt))
    assert _key(_dm(data, tok), str(ckpt)) == k0  # nothing changed: same key
    # data
    data2 = _pairs(tmp_path / "p2.jsonl", word="Bergen")
    assert _key(_dm(data2, tok), str(ckpt)) != k0
    # data edited in place
    _pairs(tmp_path / "p.jsonl", word="Oslo!")
    assert _key(_dm(data, tok), str(ckpt)) != k0
    _pairs(tmp_path / "p.jsonl")
    assert _key(_dm(data, tok), str(ckpt)) == k0
    # checkpoint rewritten (size / mtime) or another checkpoint
    time.sleep(0.01)
    ckpt.write_bytes(b"weights v2!")
    assert _key(_dm(data, tok), str(ckpt)) != k0
    other = tmp_path / "hf"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"x")
    (other / "config.json").write_text("{}")
    assert _key(_dm(data, tok), str(other)) not in (k0, _key(_dm(data, tok), str(ckpt)))
    ckpt_key = _key(_dm(data, tok), str(ckpt))
    # max length
    assert _key(_dm(data, tok, max_length=32), str(ckpt)) != ckpt_key
    # tokenizer (same model file loaded by path: a different identity, so a new key)
    assert _key(_dm(data, load_tokenizer(mistral_model_path())), str(ckpt)) != ckpt_key


def test_values_match_direct_computation_and_cache_is_reused_or_rebuilt(tmp_path, tok):
    dm = _dm(_pairs(tmp_path / "p.jsonl", n=5), tok)
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa")).eval()
    tables = refcache.compute_reference_logps(model, dm.reference_dataloader("train"), len(dm.train_set), "cpu")
    from moxin.losses import token_logprobs

    for i in range(len(dm.train_set)):
        item = dm.train_set[i]
        for side in ("chosen", "rejected"):
            ids = torch.tensor([item[f"{side}_ids"]])
            labels = torch.tensor([item[f"{side}_labels"]])
            with torch.no_grad():
                lp = token_logprobs(model(ids, return_hidden=True), model.output.weight, labels)
            assert abs(float(lp.sum()) - float(tables[f"{side}_logps"][i])) < 1e-3
            assert int(tables[f"{side}_lengths"][i]) == int((labels != -100).sum())
    calls = []

    def build():
        calls.append(1)
        return tables

    parts = {"a": 1}
    t1, reused, path = refcache.load_or_build(tmp_path / "c", parts, 5, build)
    t2, reused2, path2 = refcache.load_or_build(tmp_path / "c", parts, 5, build)
    assert (reused, reused2, len(calls), path == path2) == (False, True, 1, True)
    torch.testing.assert_close(t2["chosen_logps"], tables["chosen_logps"])
    _, reused3, path3 = refcache.load_or_build(tmp_path / "c", {"a": 2}, 5, build)
    assert not reused3 and path3 != path and len(calls) == 2
    # a damaged file or a tampered meta.json is never used
    path.write_bytes(b"garbage")
    _, reused4, _ = refcache.load_or_build(tmp_path / "c", parts, 5, build)
    assert not reused4 and len(calls) == 3
    meta = path.with_name("meta.json")
    meta.write_text(meta.read_text().replace('"a": 1', '"a": 9'))
    _, reused5, _ = refcache.load_or_build(tmp_path / "c", parts, 5, build)
    assert not reused5 and len(calls) == 4
