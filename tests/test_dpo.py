"""DPO: pair forms and answer masks, bad pairs counted (no assistant, unknown role, identical, too long), stage
config errors, cached and frozen references agree, and a tiny end-to-end run through `moxin.run` whose second
run reuses the reference cache. The loss formulas themselves are checked by hand in tests/test_losses.py."""

from __future__ import annotations

import json

import pytest

from moxin.config import DataError
from moxin.data.dpo_data import PreferenceDataModule, collate_pairs, render_answer
from moxin.data.extract import pair_from_record, pair_problem
from moxin.presets import load_preset
from tests.helpers.compose import compose_config
from tests.helpers.tiny_overrides import TINY_MODEL

U = {"role": "user", "content": "Capital of Norway?"}


def A(text):
    return {"role": "assistant", "content": text}


def _write(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return str(path)


def test_text_form_equals_message_form_and_target_is_final_answer(tok):
    msg = pair_from_record()({"chosen": [U, A("Oslo.")], "rejected": [U, A("No idea.")]})
    txt = pair_from_record()({"prompt": "Capital of Norway?", "chosen": "Oslo.", "rejected": "No idea."})
    assert msg == txt
    multi = [U, A("Oslo."), {"role": "user", "content": "And Sweden?"}, A("Stockholm.")]
    chat = render_answer(multi, tok)
    targets = [t for t, m in zip(chat.input_ids, chat.loss_mask) if m]
    assert targets == tok.encode("Stockholm.", continuation=True) + [tok.eos_id]  # earlier answers are context
    batch = collate_pairs(tok.pad_id, 16)([
        {"chosen_ids": [1, 2, 3], "chosen_labels": [2, 3, -100], "rejected_ids": [1, 5], "rejected_labels": [5, -100],
         "pair_index": 7}])
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape == (1, 16)
    assert batch["rejected_labels"][0, 1:].eq(-100).all() and batch["pair_index"].tolist() == [7]
    assert batch["rejected_positions"][0].tolist() == list(range(16))  # padding continues positions


def test_bad_pairs_are_counted_and_too_long_dropped(tmp_path, tok):
    good = [{"chosen": [U, A(f"Oslo {i}.")], "rejected": [U, A("No.")]} for i in range(20)]
    bad = [
        {"chosen": [U], "rejected": [U, A("No.")]},                                   # no assistant answer
        {"chosen": [{"role": "robot", "content": "x"}, A("y")], "rejected": [U, A("z")]},  # unknown role
        {"chosen": [U, A("Same.")], "rejected": [U, A("Same.")]},                     # identical
    ]
    too_long = [{"chosen": [U, A("word " * 200)], "rejected": [U, A("No.")]}]
    path = _write(tmp_path / "p.jsonl", good + bad + too_long)
    dm = PreferenceDataModule(train=path, tokenizer=tok, max_length=64, batch_size=4, micro_batch_size=2,
                              num_workers=0, world_size=1, max_bad_fraction=0.5)
    assert len(dm.train_set) == 20 and dm.total_steps == 5
    rep = dm.data_report()["train"]
    assert rep["bad_by_kind"] == {"no_assistant": 1, "unknown_role": 1, "identical": 1}
    assert rep["too_long"] == 1 and "pair 20" in rep["too_long_examples"][0]
    assert f"{path}:21" in rep["bad_examples"][0]
    assert pair_problem(([U, A("a")], [U, A("a")]))[0] == "identical"
    with pytest.raises(DataError, match="bad records"):
        PreferenceDataModule(train=path, tokenizer=tok, max_length=64, batch_size=4, micro_batch_size=2,
                             world_size=1, max_bad_records=2).train_set
    with pytest.raises(DataError, match="longer than max_length"):
        PreferenceDataModule(train=_write(tmp_path / "l.jsonl", too_long), tokenizer=tok, max_length=16,
                             batch_size=1, micro_batch_size=1, world_size=1).train_set


def test_stage_config_errors():
    from moxin.stages.dpo import DPOStage

    cfg = load_preset("tiny")
    with pytest.raises(ValueError, match="reference-free"):
        DPOStage(model=cfg, loss_type="simpo", reference="cached")
    with pytest.raises(ValueError, match="needs a reference"):
        DPOStage(model=cfg, loss_type="dpo", reference="none")
    with pytest.raises(ValueError, match="choose one of"):
        DPOStage(model=cfg, loss_type="orpo")


def test_dpo_end_to_end_cache_reuse_and_frozen_reference(tmp_path):
    from moxin import run as R

    from moxin.data.sample import sample_path

    small = {}
    for name, n in (("preferences", 16), ("preferences_heldout", 6)):  # a slice of the sample keeps the test fast
        small[name] = tmp_path / f"{name}.jsonl"
        small[name].write_text("".join(open(sample_path(name)).readlines()[:n]))
    base = ["+experiment=dpo", *TINY_MODEL, f"data.train.path={small['preferences']}",
            f"data.val.path={small['preferences_heldout']}", "data.batch_size=8", "data.micro_batch_size=4", "data.num_epochs=1",
            "trainer.max_steps=2", "trainer.val_every_n_steps=2", "samples.prompts=[]", "trainer.progress_bar=none",
            "hardware.num_workers=0", "export_hf=false", f"stage.ref_cache_dir={tmp_path / 'cache'}"]
    info = R.train(compose_config(base + [f"out_dir={tmp_path / 'a'}", "run_name=a"]))
    m = info["metrics"]
    assert info["optimizer_steps"] == 2
    for k in ("dpo/loss", "dpo/margin", "dpo/accuracy", "dpo/chosen_reward", "dpo/rejected_reward",
              "val/dpo_accuracy", "val/dpo_margin"):
        assert k in m, k
    assert m["val/dpo_margin_before"] == 0.0 and abs(m["val/dpo_loss_before"] - 0.6931) < 1e-3  # policy = reference
    caches = sorted((tmp_path / "cache").glob("*/ref_logps.safetensors"))
    assert len(caches) == 2  # train and held-out pairs
    # same inputs: the cache is reused (not rewritten); frozen reference gives the same starting metrics
    mtimes = [c.stat().st_mtime_ns for c in caches]
    info_b = R.train(compose_config(base + [f"out_dir={tmp_path / 'b'}", "run_name=b", "trainer.max_steps=1"]))
    assert [c.stat().st_mtime_ns for c in caches] == mtimes
    assert len(list((tmp_path / "cache").glob("*/ref_logps.safetensors"))) == 2
    info_f = R.train(compose_config(base + [f"out_dir={tmp_path / 'f'}", "run_name=f", "trainer.max_steps=1",
                                      "stage.reference=frozen"]))
    for k in ("val/dpo_loss_before", "val/logp_accuracy_before", "val/chosen_logp_before"):
        assert abs(info_f["metrics"][k] - info_b["metrics"][k]) < 1e-4, k
    # a changed max length is a new cache
    R.train(compose_config(base + [f"out_dir={tmp_path / 'c'}", "run_name=c", "trainer.max_steps=1", "data.max_length=200"]))
    assert len(list((tmp_path / "cache").glob("*/ref_logps.safetensors"))) == 4


def test_the_dpo_step_reads_nothing_from_the_device_and_the_loss_is_unchanged():
    """The DPO batch reaches the step with the `LabelRows` of its chosen rows followed by its rejected ones and its
    pair index also on the host: the policy's and the frozen reference's heads select their rows from them, and the
    cached reference log-probs are looked up by the host's index. The loss and its statistics are bitwise those of
    the batch without them, for both references, and the step records no read of a tensor value."""
    import torch

    from moxin.stages.dpo import DPOStage
    from tests.helpers.host_reads import HostReads

    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=64, attn_backend="sdpa")
    g = torch.Generator().manual_seed(1)
    items = []
    for i, (n_prompt, n_c, n_r) in enumerate([(3, 4, 2), (5, 1, 6), (2, 7, 3)]):
        c = torch.randint(1, 64, (n_prompt + n_c,), generator=g).tolist()
        r = c[:n_prompt] + torch.randint(1, 64, (n_r,), generator=g).tolist()
        items.append({"chosen_ids": c, "chosen_labels": [-100] * (n_prompt - 1) + c[n_prompt:] + [-100],
                      "rejected_ids": r, "rejected_labels": [-100] * (n_prompt - 1) + r[n_prompt:] + [-100],
                      "pair_index": 2 * i + 1})
    batch = collate_pairs(0, 16)(items)
    for reference in ("cached", "frozen"):
        stage = DPOStage(model=cfg, reference=reference)
        stage.configure_model()
        if reference == "cached":
            stage._ref_tables = {"train": {k: torch.randn(8, dtype=torch.float64, generator=g)
                                           for k in ("chosen_logps", "rejected_logps")}}
        moved = stage.transfer_batch_to_device(batch, torch.device("cpu"), 0)
        assert moved["pair_index_host"] == [1, 3, 5] and "label_rows" not in batch
        cat = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        assert torch.equal(moved["label_rows"].rows, (cat.reshape(-1) != -100).nonzero().squeeze(1))
        outs = []
        for b in (batch, moved):
            with HostReads() as seen:
                loss, P, stats, _ = stage._pair_terms(b, "train")
            outs.append((loss, stats, seen.reads))
        assert torch.equal(outs[0][0], outs[1][0]) and P == 3
        assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])
        assert outs[1][2] == [] and outs[0][2] != []


def test_dpo_training_raises_the_margin_and_accuracy_of_its_pairs():
    """Six steps of DPO on 8 pairs (4 a step, 2 micro-batches): the logged dpo/margin and dpo/accuracy rise from
    0 (policy = reference at the first step), and the implicit reward margins beta ((pc - rc) - (pr - rr)),
    recomputed by hand from the trained weights, are positive for every pair: the policy moved towards the chosen
    answers, not the rejected ones."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from moxin.model import Transformer
    from moxin.stages.dpo import DPOStage
    from tests.helpers.wiring_reference import dpo_margins
    from tests.helpers.wiring_inputs import CFG, dpo_pairs, optim

    pairs = dpo_pairs(8)
    torch.manual_seed(0)
    stage = DPOStage(CFG, optim(), loss_type="dpo", beta=0.5, reference="frozen", validate_at_start=False,
                     total_steps=6)
    stage.configure_model()
    logged = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % 2 == 0:
                logged.append({k: float(trainer.callback_metrics[f"dpo/{k}"]) for k in ("margin", "accuracy")})

    order = [[0, 1], [2, 3], [4, 5], [6, 7]] * 3
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=6, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[Record()])
    trainer.fit(stage, DataLoader(pairs, batch_sampler=order))
    assert len(logged) == 6
    assert logged[0] == {"margin": 0.0, "accuracy": 0.0}
    assert logged[-1]["margin"] > 1.0 and logged[-1]["accuracy"] >= 0.75
    policy = Transformer(CFG)
    policy.load_state_dict(stage.model.state_dict())
    margins = dpo_margins(policy, stage.ref_model, pairs, beta=0.5)
    assert float(margins.mean()) > 1.0 and bool((margins > 0).all()), margins


def test_too_long_truncate_cuts_each_side_as_open_instruct_and_drops_pairs_left_without_target(tmp_path, tok):
    """data.too_long=truncate: each side keeps its first max_length tokens (open-instruct's DPO tokenisation),
    and only a pair with a side left without target tokens is dropped; both are counted in the data report."""
    from moxin.data.dpo_data import LENGTH_POLICIES, truncate_chat

    short = [{"chosen": [U, A(f"Oslo {i}.")], "rejected": [U, A("No.")]} for i in range(4)]
    long_answer = {"chosen": [U, A("word " * 200)], "rejected": [U, A("No.")]}            # cut inside the answer
    long_prompt = {"chosen": [{"role": "user", "content": "why " * 200}, A("Yes.")],      # the prompt fills it all
                   "rejected": [{"role": "user", "content": "why " * 200}, A("No.")]}
    path = _write(tmp_path / "t.jsonl", short + [long_answer, long_prompt])
    kw = dict(train=path, tokenizer=tok, max_length=64, batch_size=1, micro_batch_size=1, num_workers=0,
              world_size=1)
    dm = PreferenceDataModule(too_long="truncate", **kw)
    assert len(dm.train_set) == 5
    rep = dm.data_report()["train"]
    assert (rep["too_long"], rep["truncated"], rep["dropped_too_long"], rep["used"]) == (2, 1, 1, 5)
    assert rep["length_policy"] == LENGTH_POLICIES["truncate"] and "no target left" in rep["too_long_examples"][1]
    item = dm.train_set[4]                                                             # the truncated pair
    full = render_answer(long_answer["chosen"], tok)
    assert len(item["chosen_ids"]) == 64 and item["chosen_ids"] == full.input_ids[:64]
    assert item["chosen_labels"] == truncate_chat(full, 64).shifted_labels()
    assert tok.eos_id not in item["chosen_ids"][-1:]                                   # the cut answer has no eos
    assert item["rejected_ids"] == render_answer(long_answer["rejected"], tok).input_ids  # the short side is whole
    assert sum(t != -100 for t in item["chosen_labels"]) > 0

    drop = PreferenceDataModule(**kw)                                                  # the default: drop
    assert len(drop.train_set) == 4
    rep_drop = drop.data_report()["train"]
    assert (rep_drop["too_long"], rep_drop["truncated"], rep_drop["dropped_too_long"], rep_drop["used"]) == (2, 0, 2, 4)
    assert [drop.train_set[i]["chosen_ids"] for i in range(4)] == [dm.train_set[i]["chosen_ids"] for i in range(4)]
    assert drop.reference_identity("train")["tokens_sha256"] != dm.reference_identity("train")["tokens_sha256"]
    assert drop.reference_identity("train")["length_policy"] != dm.reference_identity("train")["length_policy"]
    with pytest.raises(DataError, match="no target token within max_length"):
        PreferenceDataModule(**{**kw, "train": _write(tmp_path / "p.jsonl", [long_prompt])}, too_long="truncate").train_set
    with pytest.raises(ValueError, match="data.too_long='cut'"):
        PreferenceDataModule(too_long="cut", **kw)


def test_published_dpo_data_truncates_and_the_demo_drops():
    """tulu3_preference (the published experiment's data) truncates as open-instruct; the demo's data keeps dropping."""
    assert compose_config(["+experiment=dpo_moxin_instruct", "init_from=x"]).data.too_long == "truncate"
    assert compose_config(["+experiment=dpo"]).data.too_long == "drop"
