"""SFT: the assistant-only mask in packed rows, the truncation policy, bad records, loss normalisation over
micro-batches, and a tiny end-to-end run through `moxin.run` (compose + fit) whose checkpoint and HF export can
start the next stage (init_from)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import itertools

import pytest
import torch

from moxin.config import DataError, SourceConfig
from moxin.data.sft_data import ChatSFTDataModule, collate_sft, load_conversations, truncate_chat
from moxin.presets import load_preset
from moxin.tokenizer import render_chat
from tests.helpers.compose import compose_config
from tests.helpers.tiny_overrides import TINY_MODEL

CONV_A = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]
CONV_B = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]


def _item(messages, tok, max_length=10_000):
    chat, truncated = truncate_chat(render_chat(messages, tok), max_length, tok.eos_id)
    return {"input_ids": chat.input_ids, "labels": chat.shifted_labels(), "truncated": truncated}


def test_packed_row_mask_covers_exactly_the_assistant_tokens(tok):
    batch = collate_sft(row_len=256, pad_id=tok.pad_id, pad_to_multiple_of=64)([_item(CONV_A, tok), _item(CONV_B, tok)])
    n_a = len(render_chat(CONV_A, tok))
    n_b = len(render_chat(CONV_B, tok))
    T = -(-(n_a + n_b) // 64) * 64
    assert batch["input_ids"].shape == (1, T)  # both conversations packed into one row, padded to a multiple of 64
    ids, labels, pos = batch["input_ids"][0], batch["labels"][0], batch["positions"][0]
    # positions restart at the second conversation (document mask), padding continues the last document
    assert pos[:n_a].tolist() == list(range(n_a)) and pos[n_a:n_a + n_b].tolist() == list(range(n_b))
    assert pos[n_a + n_b:].tolist() == list(range(n_b, n_b + T - n_a - n_b))
    # hand-built expectation: the targets are exactly "Paris." </s> "Rome is the capital of Italy." </s> "4" </s>
    expected = []
    for answer in ("Paris.", "Rome is the capital of Italy.", "4"):
        expected += tok.encode(answer, continuation=True) + [tok.eos_id]
    targets = labels[labels != -100].tolist()
    assert targets == expected
    # each target is the next input token, and no label crosses from conversation A into B
    idx = (labels != -100).nonzero().squeeze(1)
    assert torch.equal(ids[idx + 1], labels[idx])
    assert labels[n_a - 1] == -100 and (labels[n_a + n_b - 1:] == -100).all()
    # nothing from system / user turns or the <|assistant|> headers is a target
    text_targets = tok.decode([t for t in targets if t != tok.eos_id])
    for forbidden in ("Be brief", "Capital of France", "And of Italy", "<|assistant|>", "<|user|>"):
        assert forbidden not in text_targets
    assert batch["num_conversations"] == 2 and batch["num_truncated"] == 0


def test_truncation_keeps_whole_turns(tok):
    full = render_chat(CONV_A, tok)
    first_eos = full.input_ids.index(tok.eos_id)
    cut, truncated = truncate_chat(full, first_eos + 3, tok.eos_id)  # the second answer does not fit
    assert truncated and len(cut) == first_eos + 1 and cut.input_ids[-1] == tok.eos_id
    # not even the first answer fits: hard cut inside it, the answer's start still trained
    hard, truncated = truncate_chat(full, first_eos - 1, tok.eos_id)
    assert truncated and len(hard) == first_eos - 1 and any(hard.loss_mask)
    same, truncated = truncate_chat(full, len(full), tok.eos_id)
    assert not truncated and same.input_ids == full.input_ids


def _write(path, records):
    with open(path, "w") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def test_bad_conversations_are_counted_with_file_line(tmp_path):
    good = {"messages": CONV_B}
    recs = [good] * 30 + [
        {"messages": [{"role": "user", "content": "no answer"}]},               # line 31: no assistant turn
        {"messages": [{"role": "wizard", "content": "x"}, *CONV_B]},            # line 32: unknown role
        "{not json",                                                             # line 33
        {"text": "no messages field"},                                           # line 34
    ]
    path = _write(tmp_path / "c.jsonl", recs)
    items = load_conversations(SourceConfig(name="c", path=path), "messages", 10, 0.5)
    stats = items.stats
    assert len(items) == 30 and items.rows is None
    assert stats.bad == 4
    assert stats.reasons == {"no_assistant": 1, "unknown_role": 1, "malformed": 1, "missing_field": 1}
    assert f"{path}:31" in stats.bad_examples[0] and "no assistant turn" in stats.bad_examples[0]
    assert "unknown role 'wizard'" in stats.bad_examples[1]
    with pytest.raises(DataError, match="4 bad records out of 34"):
        load_conversations(SourceConfig(name="c", path=path), "messages", 3, 0.5)
    only_bad = _write(tmp_path / "bad.jsonl", recs[30:32])
    with pytest.raises(DataError, match="bad records|none of its"):
        load_conversations(SourceConfig(name="b", path=only_bad), "messages", 10, 1.0)


def test_sharegpt_records_are_converted_at_read_time(tmp_path, tok):
    system = "Your role as an assistant involves thoroughly exploring questions before answering."
    thought = "<|begin_of_thought|>\n\n2 + 2 = 4<|end_of_thought|>\n\n<|begin_of_solution|>\n\n4<|end_of_solution|>"
    recs = [
        # OpenThoughts-114k: a record-level system prompt, user / assistant turns
        {"system": system, "conversations": [{"from": "user", "value": "2 + 2?"}, {"from": "assistant", "value": thought}]},
        # ShareGPT's own names, a system turn of its own (kept once), an empty record-level system (ignored)
        {"system": "", "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                         {"from": "gpt", "value": "Hello."}]},
        # OpenR1-Math-220k: role/content messages next to its other columns
        {"problem": "1 + 1?", "answer": "2", "generations": ["<think>1+1</think> \\boxed{2}"],
         "messages": [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "<think>1+1</think> 2"}]},
        {"conversations": [{"from": "bot", "value": "x"}]},                                # line 4: unknown from
        {"conversations": [{"from": "user"}]},                                             # line 5: no value
        {"conversations": "user: hi"},                                                     # line 6: not a list
        {"system": 3, "conversations": [{"from": "user", "value": "q"}]},                  # line 7: system not text
        {"conversations": [{"from": "user", "value": "a"}, {"from": "human", "value": "b"},
                           {"from": "gpt", "value": "c"}]},                               # line 8: two user turns
        {"id": 9},                                                                         # line 9: neither field
    ]
    path = _write(tmp_path / "sharegpt.jsonl", recs)
    items = load_conversations(SourceConfig(name="s", path=path), "messages", 10, 1.0)
    assert len(items) == 3
    assert items[0] == [{"role": "system", "content": system}, {"role": "user", "content": "2 + 2?"},
                        {"role": "assistant", "content": thought}]
    assert [m["role"] for m in items[1]] == ["system", "user", "assistant"] and items[1][0]["content"] == "Be brief."
    assert items[2] == recs[2]["messages"]
    st = items.stats
    assert st.bad == 6 and st.reasons == {"unknown_role": 1, "invalid": 3, "role_order": 1, "missing_field": 1}
    lines = [b.split(": ", 1)[0] for b in st.bad_examples]
    assert lines == [f"{path}:{n}" for n in (4, 5, 6, 7, 8)]
    assert "unknown 'from' 'bot'" in st.bad_examples[0] and "'from' and 'value'" in st.bad_examples[1]
    # the converted conversation renders with its system prompt and trains on the assistant turn only
    chat = render_chat(items[0], tok)
    assert system in tok.decode(chat.input_ids) and chat.num_target_tokens > 0
    with pytest.raises(DataError, match=rf"{path}:4: conversations\[0\]: unknown 'from' 'bot'"):
        load_conversations(SourceConfig(name="s", path=path), "messages", 0, 1.0)


def test_sharegpt_hub_set_is_memory_mapped_and_converted_on_access(monkeypatch):
    """A hub set with a ``conversations`` column (OpenThoughts-114k's form) passes the column check and its rows
    are converted each time they are read; one with neither column stops with the columns it has."""
    datasets = pytest.importorskip("datasets")
    import moxin.data.extract as extract

    rows = [{"system": "Think.", "conversations": [{"from": "user", "value": f"q{i}"},
                                                    {"from": "assistant", "value": f"a{i}"}]} for i in range(3)]
    monkeypatch.setattr(extract, "open_hub_dataset", lambda source, streaming: datasets.Dataset.from_list(rows))
    items = load_conversations(SourceConfig(name="ot", path="open-thoughts/OpenThoughts-114k"), "messages", 10, 0.5)
    assert items.rows == [0, 1, 2] and items[2] == [{"role": "system", "content": "Think."},
                                                    {"role": "user", "content": "q2"},
                                                    {"role": "assistant", "content": "a2"}]
    monkeypatch.setattr(extract, "open_hub_dataset",
                        lambda source, streaming: datasets.Dataset.from_list([{"text": "x"}]))
    with pytest.raises(DataError, match=r"no column 'messages' or 'conversations' \(columns: \['text'\]\)"):
        load_conversations(SourceConfig(name="t", path="org/plain-text"), "messages", 10, 0.5)


def test_sft_mixes_several_sources_and_the_reasoning_recipe_lists_its_two(tmp_path, tok):
    from hydra.utils import instantiate

    from moxin.data.dpo_data import PreferenceDataModule

    qa = lambda i: [{"from": "user", "value": f"q{i}"}, {"from": "assistant", "value": f"a{i}"}]  # noqa: E731
    shared = _write(tmp_path / "ot.jsonl", [{"system": "Think.", "conversations": qa(i)} for i in range(5)])
    plain_msgs = _write(tmp_path / "r1.jsonl", [{"messages": CONV_B}] * 7)
    dm = ChatSFTDataModule(train=[{"name": "ot", "path": shared}, {"name": "r1", "path": plain_msgs}], tokenizer=tok,
                           max_length=64, batch_size=4, micro_batch_size=2, num_epochs=1, num_workers=0,
                           world_size=1, rank=0)
    assert len(dm.train_set) == 12 and dm.steps_per_epoch() == [3]
    report = dm.data_report()["train"]
    assert {k: v["items"] for k, v in report["sources"].items()} == {"ot": 5, "r1": 7}
    assert report["dropped_per_epoch"] == 0
    assert sum(b["num_conversations"].item() for b in dm.train_dataloader()) == 12
    with pytest.raises(DataError, match="source names must differ"):
        ChatSFTDataModule(train=[{"name": "a", "path": shared}, {"name": "a", "path": plain_msgs}], tokenizer=tok, world_size=1, rank=0, batch_size=8, micro_batch_size=8)
    with pytest.raises(DataError, match="a list of sources is not supported by PreferenceDataModule"):
        PreferenceDataModule(train=[shared, plain_msgs], tokenizer=tok, world_size=1, rank=0)
    # the recipe's data config: both hub sets, as published, with their hub configuration
    cfg = compose_config(["+experiment=sft_moxin_reasoning", "init_from=x"])
    rdm = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    assert [(s.path, s.hub_config, s.split) for s in rdm.train_sources] == [
        ("open-thoughts/OpenThoughts-114k", "default", "train"), ("open-r1/OpenR1-Math-220k", "default", "train")]


def test_datamodule_steps_are_exact_and_epochs_reshuffle(tmp_path, tok):
    path = _write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"q{i}"},
                                                       {"role": "assistant", "content": f"a{i}"}]} for i in range(37)])
    dm = ChatSFTDataModule(train=path, tokenizer=tok, max_length=64, batch_size=8, micro_batch_size=2, num_epochs=2,
                           num_workers=0, world_size=2, rank=0)
    assert dm.accumulate_grad_batches == 2 and dm.steps_per_epoch() == [4, 4] and dm.total_steps == 8
    assert dm.data_report()["train"]["dropped_per_epoch"] == 5
    order = {}  # (epoch, rank) -> the conversations that rank trains on, in order
    for epoch, rank in itertools.product((0, 1, 1), (0, 1)):  # epoch 1 built twice: as a resumed run rebuilds it
        dm.trainer, dm._rank = SimpleNamespace(current_epoch=epoch), rank  # the loader reads the epoch there
        loader = dm.train_dataloader()
        assert len(list(loader)) == 8  # 4 steps x 2 micro-batches on every rank
        items = [i for b in loader.batch_sampler for i in b]
        assert order.setdefault((epoch, rank), items) == items  # an epoch's order is fixed by the seed
    for epoch in (0, 1):
        both = order[epoch, 0] + order[epoch, 1]
        assert len(both) == len(set(both)) == 32  # ranks never share a conversation within an epoch
    for rank in (0, 1):
        assert order[0, rank] != order[1, rank]  # each epoch is a new shuffle, on every rank
    with pytest.raises(DataError, match="multiple of micro_batch_size"):
        ChatSFTDataModule(train=path, tokenizer=tok, batch_size=6, micro_batch_size=4, world_size=1)


def test_sft_loss_normalisation_over_micro_batches(tok):
    """Two micro-batches, one with very few targets: the step's gradient equals the gradient of the summed loss
    over all target tokens divided by their number (not the mean of the two micro-batch means)."""
    from moxin.stages.sft import SFTStage

    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa")
    stage = SFTStage(model=cfg)
    stage.optim_cfg.grad_clip = None
    stage.configure_model()
    stage._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2)  # what the base reads
    stage.log_dict = stage.log = lambda *a, **k: None
    collate = collate_sft(row_len=128, pad_id=tok.pad_id, pad_to_multiple_of=8)
    long_conv = [{"role": "user", "content": "Tell me about Rome."},
                 {"role": "assistant", "content": "Rome is the capital of Italy, founded, as legend says, in 753 BC."}]
    b1 = collate([_item(long_conv, tok), _item(CONV_A, tok)])
    b2 = collate([_item(CONV_B, tok)])  # 2 target tokens only
    for i, b in enumerate((b1, b2)):
        (stage.training_step(b, i) / 2).backward()  # Lightning divides each micro loss by accumulate
    stage.on_before_optimizer_step(SimpleNamespace(param_groups=[{"lr": 0.0}]))
    got = [p.grad.clone() for p in stage.model.parameters()]
    stage.model.zero_grad()
    total, n = 0.0, 0
    for b in (b1, b2):
        out = stage.compute_loss(b)
        total, n = total + out.loss_sum, n + int(out.n_tokens)
    (total / n).backward()
    for g, p in zip(got, stage.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)
    assert stage._sft_acc == [0.0, 0.0, 0.0]  # counters reset for the next step


def test_clipping_folds_the_token_normalisation_and_logs_the_norm_before_clipping(tok):
    """The step multiplies the gradients once, by the token normaliser times the clipping factor: the result and the
    logged train/grad_norm equal normalising first, then torch's clip_grad_norm_ (which returns the norm before)."""
    from moxin.stages.sft import SFTStage

    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa")
    stage = SFTStage(model=cfg)
    stage.optim_cfg.grad_clip = 0.05  # small enough to bite
    stage.configure_model()
    stage._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2)
    logged = {}
    stage.log_dict = lambda d, **k: logged.update(d)
    stage.log = lambda *a, **k: None
    collate = collate_sft(row_len=128, pad_id=tok.pad_id, pad_to_multiple_of=8)
    batches = [collate([_item(CONV_A, tok)]), collate([_item(CONV_B, tok)])]
    for i, b in enumerate(batches):
        (stage.training_step(b, i) / 2).backward()
    stage.on_before_optimizer_step(SimpleNamespace(param_groups=[{"lr": 0.0}]))
    got = [p.grad.clone() for p in stage.model.parameters()]
    stage.model.zero_grad()
    outs = [stage.compute_loss(b) for b in batches]
    (sum(o.loss_sum for o in outs) / sum(int(o.n_tokens) for o in outs)).backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(stage.model.parameters(), 0.05)
    assert ref_norm > 0.05 * 2  # the clip bit
    assert logged["train/grad_norm"] == pytest.approx(float(ref_norm), rel=1e-5)
    for g, p in zip(got, stage.model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-8)


def test_a_fused_optimizer_applies_the_step_factor_as_it_reads_the_gradients(tok):
    """With fused AdamW the token normaliser x clipping factor rides into the optimizer step (`grad_scale`) instead of
    a separate multiply of every gradient, and nothing before the step reads the device: the step's values reach the
    host (logs, counters) in `optimizer_step`, after the step. Three steps give the same weights, gradients and
    logged norms as the multiply; under fp16's GradScaler (which owns `grad_scale`) the stage multiplies itself."""
    import copy

    from moxin.stages.sft import SFTStage

    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa")
    stages, opts, logs = [], [], []
    for _ in range(2):
        st = SFTStage(model=cfg)
        st.optim_cfg.grad_clip = 0.05  # bites on some steps
        stages.append(st)
    stages[0].configure_model()
    stages[1].model = copy.deepcopy(stages[0].model)
    stages[1].optim_step.allow_fused = False  # the reference: multiply the gradients, then step
    seen = []  # (grad_scale, found_inf) as the fused optimizer's step saw them
    for st in stages:
        st._trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2, precision_plugin=None, global_step=0)
        logs.append([])
        st.log_dict = lambda d, _l=logs[-1], **k: _l.append(dict(d))
        st.log = lambda *a, **k: None
        opts.append(torch.optim.AdamW(st.model.parameters(), lr=1e-3, fused=True))  # fused runs on the CPU too
    step0 = opts[0].step
    opts[0].step = lambda *a, **k: (seen.append((opts[0].grad_scale, opts[0].found_inf)), step0(*a, **k))[1]
    collate = collate_sft(row_len=128, pad_id=tok.pad_id, pad_to_multiple_of=8)
    batches = [collate([_item(CONV_A, tok)]), collate([_item(CONV_B, tok)])]
    for _ in range(3):
        for st, opt, log in zip(stages, opts, logs):
            for i, b in enumerate(batches):
                (st.training_step(b, i) / 2).backward()
            n_logs = len(log)
            st.on_before_optimizer_step(opt)
            assert (len(log) == n_logs) == (st is stages[0])  # the fused path logs only after the step
            st.optimizer_step(0, 1, opt)
            assert len(log) > n_logs and all(v.device.type == "cpu" for d in log for v in d.values())
        scale, inf = seen[-1]
        assert scale is not None and float(inf) == 0.0 and opts[0].grad_scale is None  # cleared after the step
        assert getattr(opts[1], "grad_scale", None) is None
        for a, b in zip(stages[0].model.parameters(), stages[1].model.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-9)  # fused AdamW stores them scaled
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        for opt in opts:
            opt.zero_grad()
    norms = [[float(d["train/grad_norm"]) for d in log if "train/grad_norm" in d] for log in logs]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-5)
    assert any(n > 0.05 for n in norms[0])  # the clip bit at least once
    assert [float(d["sft/conversations"]) for d in logs[0] if "sft/conversations" in d] == [2.0] * 3

    # a non-finite step on the fused path: the step itself skips the update (found_inf), the host counts it after
    st, opt = stages[0], opts[0]
    weights = [p.detach().clone() for p in st.model.parameters()]
    moments = [opt.state[p]["exp_avg"].clone() for p in st.model.parameters()]
    steps = [opt.state[p]["step"].clone() for p in st.model.parameters()]
    for i, b in enumerate(batches):
        (st.training_step(b, i) / 2).backward()
    next(st.model.parameters()).grad[0, 0] = float("nan")
    st.on_before_optimizer_step(opt)
    st.optimizer_step(0, 1, opt)
    assert float(seen[-1][1]) == 1.0 and st.optim_step.nonfinite_steps == 1
    for p, w, m, k in zip(st.model.parameters(), weights, moments, steps):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["exp_avg"], m) and torch.equal(opt.state[p]["step"], k)
    opt.zero_grad()

    # fp16 training: GradScaler sets `grad_scale` itself, so the stage multiplies the gradients in place
    st._trainer.precision_plugin = SimpleNamespace(scaler=object())
    for i, b in enumerate(batches):
        (st.training_step(b, i) / 2).backward()
    before = [p.grad.clone() for p in st.model.parameters()]
    st.on_before_optimizer_step(opts[0])
    assert opts[0].grad_scale is None  # none set
    assert any(not torch.equal(g, p.grad) for g, p in zip(before, st.model.parameters()))


def test_through_the_trainer_the_fused_step_reads_its_values_after_the_step_and_trains_alike():
    """Through `L.Trainer` (fused AdamW forced on the CPU, gradient accumulation, clipping that bites): Lightning calls
    the stage's `optimizer_step`, which reads the step's values after the step; every step is logged once, with the
    same loss and norm as the path that reads them before the step and multiplies the gradients; the weights and
    `tokens_seen` agree."""
    import lightning as L

    from moxin.config import OptimConfig
    from moxin.stages.pretrain import PretrainStage

    class Fused(PretrainStage):
        def configure_optimizers(self):
            out = super().configure_optimizers()
            opt = out["optimizer"]  # as torch.optim.AdamW(..., fused=True) sets itself up (the stage: on CUDA only)
            for group in opt.param_groups:
                group["fused"] = True
            opt.defaults["fused"] = opt._step_supports_amp_scaling = opt._need_device_dtype_check_for_fused = True
            return out

    class Rec(L.Callback):
        def __init__(self):
            self.rows = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(self.rows) < trainer.global_step:
                m = trainer.callback_metrics
                self.rows.append((float(m["train/loss"]), float(m["train/grad_norm"]), pl_module.tokens_seen))

    cfg = load_preset("tiny", vocab_size=128, attn_backend="sdpa")
    g = torch.Generator().manual_seed(0)
    batches = []
    for i in range(8):
        ids = torch.randint(0, 128, (2, 33), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : 3 * (i % 3)] = -100
        batches.append({"input_ids": ids[:, :-1].clone(), "labels": labels,
                        "positions": torch.cat([torch.arange(20), torch.arange(12)]).expand(2, 32).clone()})
    runs = []
    for fused_factor in (True, False):
        torch.manual_seed(0)
        stage = Fused(model=cfg, optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.5))
        seen = []
        if fused_factor:
            finish = stage.optim_step.finish  # returns the step's values where they were read after the step
            stage.optim_step.finish = lambda *a: (lambda v: (seen.append(v is not None), v)[1])(finish(*a))
        else:
            stage.optim_step.allow_fused = False
        rec = Rec()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=4, accumulate_grad_batches=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[rec], num_sanity_val_steps=0)
        trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
        assert trainer.optimizers[0].defaults["fused"] and len(rec.rows) == 4
        if fused_factor:
            assert seen.count(True) == 4  # the values of each step were read after it, in optimizer_step
        runs.append((rec.rows, [p.detach().clone() for p in stage.model.parameters()]))
    (rows_a, w_a), (rows_b, w_b) = runs
    per_step = [int((b["labels"] != -100).sum()) + int((c["labels"] != -100).sum())
                for b, c in zip(batches[::2], batches[1::2])]
    assert [r[2] for r in rows_a] == [r[2] for r in rows_b] == list(itertools.accumulate(per_step))
    for a, b in zip(rows_a, rows_b):
        assert a[:2] == pytest.approx(b[:2], rel=1e-5)
    assert any(r[1] > 0.5 for r in rows_a)  # the clip bit
    for a, b in zip(w_a, w_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_sft_end_to_end_and_init_from_sft_checkpoint_and_hf_dir(tmp_path):
    from moxin import run as R

    base = ["+experiment=sft", *TINY_MODEL, "data.batch_size=8", "data.micro_batch_size=4", "data.num_epochs=1",
            "trainer.max_steps=2", "trainer.val_every_n_steps=2", "samples.prompts=[]", "trainer.progress_bar=none",
            "data.max_length=128", "hardware.num_workers=0"]
    cfg = compose_config(base + [f"out_dir={tmp_path / 'a'}", "run_name=a", "export_hf=true"])
    info = R.train(cfg)
    assert info["optimizer_steps"] == 2
    m = info["metrics"]
    assert "val/loss_before" in m and "val/loss" in m and m["val/loss"] < m["val/loss_before"]
    assert m["sft/conversations"] == 8 and info["data"]["train"]["kept"] == 160
    # a second SFT run starts from the first one's checkpoint, and from its Hugging Face export
    for init in (info["checkpoint"], info["hf_export"]):
        cfg2 = compose_config(base + [f"out_dir={tmp_path / 'b'}_{len(init)}", "run_name=b", "export_hf=false",
                                "trainer.max_steps=1", f"init_from={init}"])
        info2 = R.train(cfg2)
        # starting from the trained weights, the held-out loss before training is the first run's last one
        assert abs(info2["metrics"]["val/loss_before"] - m["val/loss"]) < 1e-3


def test_the_stage_sends_document_bounds_from_the_host_and_the_loss_is_unchanged(tok):
    """The batch reaches the training step with `DocBounds` of its positions and `LabelRows` of its labels,
    computed before it was sent; the loss and its gradients are the same with and without them. DPO's bounds are
    those of the chosen rows followed by the rejected ones, as its forward joins them."""
    from moxin.model.attention import DocBounds
    from moxin.stages.dpo import DPOStage
    from moxin.stages.sft import SFTStage

    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa")
    stage = SFTStage(model=cfg)
    stage.configure_model()
    batch = collate_sft(row_len=128, pad_id=tok.pad_id, pad_to_multiple_of=8)([_item(CONV_A, tok), _item(CONV_B, tok)])
    moved = stage.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    bounds = moved["doc_bounds"]
    assert "doc_bounds" not in batch and not bounds.one_doc_per_row  # the two conversations share a packed row
    ref = DocBounds.from_positions(batch["positions"])
    assert torch.equal(bounds.cu_seqlens, ref.cu_seqlens) and bounds.max_len == ref.max_len
    targets = moved["label_rows"]
    assert torch.equal(targets.rows, (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1))
    assert torch.equal(targets.targets, batch["labels"][batch["labels"] != -100])
    grads = []
    for b in (batch, moved):
        stage.model.zero_grad()
        loss = stage.compute_loss(b).loss_sum
        loss.backward()
        grads.append([p.grad.clone() for p in stage.model.parameters()])
    assert torch.equal(stage.compute_loss(batch).loss_sum, stage.compute_loss(moved).loss_sum)
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    pos = {"chosen_positions": torch.arange(6).expand(2, 6), "rejected_positions": torch.arange(6).expand(2, 6)}
    dpo_bounds = DPOStage.doc_bounds(None, pos)
    assert (dpo_bounds.batch, dpo_bounds.seq_len, dpo_bounds.one_doc_per_row) == (4, 6, True)
