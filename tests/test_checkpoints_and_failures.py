"""Runs you can trust (issue #9): the checkpoint policy (new name, complete, last.ckpt switched, retention),
resume=auto picking the newest complete checkpoint, exact resume at phase ends, a finished run's continue,
the run lock, non-finite steps, numeric config validation, init_from's architecture check, and the data
records that used to pass silently (invalid UTF-8, runaway lines, chat roles out of order)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch

from moxin import run as R
from moxin.assemble import assemble, resolve_resume
from moxin.checkpoint import policy
from moxin.checkpoint.files import read_info, step_name
from moxin.checkpoint.lock import RunLock, RunLockError
from moxin.checkpoint.policy import DiskSpaceError, apply_retention, checkpoint_bytes, point_last
from moxin.checkpoint.resume import clean_temporaries, find_resume
from moxin.config import ConfigError
from moxin.presets import load_preset
from tests.helpers.compose import compose_config, logged_train_losses
from tests.helpers.resume_state import load_checkpoint, state_diff
from tests.helpers.tiny_overrides import TINY_PRETRAIN, replaced

FAST = TINY_PRETRAIN + ["hardware.num_workers=0"]


def _rows(out: Path) -> list[tuple]:
    """(step, train/loss, val/loss) of every metrics row of every launch, in launch order."""
    rows = []
    for f in sorted(out.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1])):
        for r in csv.DictReader(open(f)):
            rows.append((int(r["step"]), r.get("train/loss") or "", r.get("val/loss") or ""))
    return rows


def _fake_ckpt(path: Path, step: int, **moxin) -> Path:
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "global_step": step, "epoch": 0, "moxin": moxin}, path)
    return path


# ---- 1, 5, 6: the policy on a real run -------------------------------------------------------------------
def test_phase_end_resume_and_finished_run(tmp_path):
    """Stop at the first phase's last step (6 of 12), resume: metrics.csv (every step's train loss, validation
    at the same steps with the same values) equals the uninterrupted run's; last.ckpt is the final state, a
    single step file; continuing the finished run says so and trains nothing."""
    R.train(compose_config(FAST + [f"out_dir={tmp_path / 'full'}", "run_name=full"]))
    R.train(compose_config(FAST + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=6"]))
    ck = tmp_path / "part" / "checkpoints"
    assert os.readlink(ck / "last.ckpt") == "step000006.ckpt"
    R.train(compose_config(FAST + [f"out_dir={tmp_path / 'part'}", "run_name=part", "resume=auto"]))
    a, b = _rows(tmp_path / "full"), _rows(tmp_path / "part")
    assert [r[0] for r in a if r[1]] == [r[0] for r in b if r[1]] == list(range(12))
    assert [(s, v) for s, _, v in a if v] == [(s, v) for s, _, v in b if v]  # same steps, same values
    assert [s for s, _, v in a if v] == [2, 5, 8, 11]  # validation on the phase ends
    for (sa, ta, _), (sb, tb, _) in zip([r for r in a if r[1]], [r for r in b if r[1]]):
        assert float(ta) == pytest.approx(float(tb), abs=1e-5), sa
    # one copy: last.ckpt is a link to the final step file, nothing else kept (keep_all_checkpoints=false)
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000012.ckpt"]
    assert os.readlink(ck / "last.ckpt") == "step000012.ckpt"
    info = read_info(ck / "last.ckpt")
    assert info.step == 12 and info.moxin["finished"] is True and info.world_size == 1
    assert stat.S_IMODE((ck / "step000012.ckpt").stat().st_mode) & 0o044, "checkpoints readable by the group"
    # the finished run's own continue command: nothing to do, no new launch, no retraining
    n_versions = len(list((tmp_path / "part" / "logs").iterdir()))
    again = R.train(compose_config(FAST + [f"out_dir={tmp_path / 'part'}", "run_name=part", "resume=auto"]))
    assert again["nothing_to_do"] and again["optimizer_steps"] == 12
    assert len(list((tmp_path / "part" / "logs").iterdir())) == n_versions
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["checkpoint"].endswith("step000012.ckpt")


def test_phase_end_resume_under_max_steps_trains_the_next_phase(tmp_path):
    """With trainer.max_steps set Lightning always restarts its loops, and a checkpoint from a phase's end once
    resumed into an 'unfinished' epoch that ended at once: the run stopped at step 6 of 9 (max_epochs reached).
    Resumed at the first phase's end with max_steps=9, it trains steps 7-9 as the uninterrupted run does and ends
    in the same state."""
    run = FAST + ["trainer.val_every_n_steps=null", "trainer.max_steps=9", "run_name=r"]
    R.train(compose_config(run + [f"out_dir={tmp_path / 'full'}"]))
    R.train(compose_config(replaced(run, "trainer.max_steps=6") + [f"out_dir={tmp_path / 'part'}"]))
    R.train(compose_config(run + [f"out_dir={tmp_path / 'part'}", "resume=auto"]))
    a, b = logged_train_losses(tmp_path / "full"), logged_train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(9))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), step
    full, part = (load_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "part"))
    # torch's generator: the resumed run restores it at the load and at the first batch, after the new phase's
    # loader drew its seed (the straight run drew it from the state the first phase left); no draw trains on it
    assert [d for d in state_diff(full, part) if not d.startswith("/moxin/rng_torch")] == []


def test_finished_run_continue_command_exits_zero(tmp_path):
    """The printed 'Continue this run' command on a completed run (here: stopped by trainer.max_steps) exits 0."""
    import subprocess
    import sys

    R.train(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=done", "trainer.max_steps=2"]))
    cmd = [sys.executable, "-m", "moxin.run"] + FAST + [f"out_dir={tmp_path}", "run_name=done", "trainer.max_steps=2",
                                                      "resume=auto"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(R.__file__).parents[1]))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "nothing left to do" in res.stderr


# ---- resume=auto: newest complete, skipping broken ones ---------------------------------------------------
def test_resume_auto_skips_incomplete_and_unreadable(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _fake_ckpt(ck / "step000010.ckpt", 10)
    good12 = _fake_ckpt(ck / "step000012.ckpt", 12)
    os.symlink("step000010.ckpt", ck / "last.ckpt")  # a stale pointer does not matter: the newest complete wins
    raw = _fake_ckpt(ck / "step000014.ckpt", 14).read_bytes()
    (ck / "step000014.ckpt").write_bytes(raw[: len(raw) // 2])  # truncated
    # a distributed checkpoint whose meta.pt never got written (killed after the shards)
    dcp = ck / "step000016.ckpt"
    dcp.mkdir()
    (dcp / ".metadata").write_bytes(b"x")
    info, skipped = find_resume(tmp_path)
    assert info.path == good12 and info.step == 12
    assert any("step000014" in s for s in skipped) and any("step000016" in s and "meta.pt" in s for s in skipped)
    cfg = compose_config(FAST + [f"out_dir={tmp_path}", "run_name=x", "resume=auto"])
    assert resolve_resume(cfg, ck) == str(good12)
    # an explicit path to a broken checkpoint is refused with the reason
    with pytest.raises(ConfigError, match="unreadable"):
        resolve_resume(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=x", f"resume={ck / 'step000014.ckpt'}"]), ck)
    # a fresh run refuses the folder even if only broken checkpoints are left
    with pytest.raises(ConfigError, match="resume=auto"):
        resolve_resume(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=x"]), ck)


def test_slurm_requeue_checkpoint_is_a_candidate(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    _fake_ckpt(tmp_path / "checkpoints" / "step000005.ckpt", 5)
    hpc = _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 7)
    assert find_resume(tmp_path)[0].path == hpc


def test_temporaries_cleaned_and_orphans_retired(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    (ck / ".tmp-step000004.ckpt").mkdir()
    (ck / ".tmp-step000004.ckpt" / "__0_0.distcp").write_bytes(b"half")
    (ck / "..step000003.ckpt.abc.tmp").write_bytes(b"half")
    (tmp_path / ".hf.tmp-123").mkdir()
    removed = clean_temporaries(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in ck.iterdir()) == []
    for s in (3, 6, 9):
        _fake_ckpt(ck / step_name(s), s)
    _fake_ckpt(ck / "last-v1.ckpt", 2)  # what Lightning's versioning used to leave
    point_last(ck, step_name(9))
    apply_retention(ck, step_name(9), keep_all=False)
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000009.ckpt"]


def test_legacy_real_last_ckpt_stays_a_candidate(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _fake_ckpt(ck / "last.ckpt", 8)
    _fake_ckpt(ck / "step000005.ckpt", 5)
    assert find_resume(tmp_path)[0].step == 8
    point_last(ck, "step000005.ckpt")  # the real file is moved aside, not overwritten
    assert (ck / "last-legacy.ckpt").is_file() and find_resume(tmp_path)[0].step == 8


def test_truncated_last_falls_back_to_newest_intact(tmp_path):
    """A kill between the step file and the pointer switch, or a truncated file: the newest intact wins."""
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    _fake_ckpt(ck / "step000004.ckpt", 4)
    point_last(ck, "step000004.ckpt")
    _fake_ckpt(ck / "step000006.ckpt", 6)  # written and renamed, killed before last.ckpt moved
    assert find_resume(tmp_path)[0].step == 6


# ---- the run lock -------------------------------------------------------------------------------------------
def test_second_run_on_the_same_folder_is_refused(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockError, match=f"pid {os.getpid()}"):
            R.train(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=x"]))
    with RunLock(tmp_path):  # released when the holder ends
        pass


# ---- 3, 4: numeric validation and the non-finite guard ------------------------------------------------------
@pytest.mark.parametrize("override, match", [
    ("stage.optim.lr=inf", "stage.optim.lr=inf must be a finite number"),
    ("stage.optim.lr=0", r"stage.optim.lr=0(\.0)? must be > 0"),
    ("stage.optim.grad_clip=0", r"stage.optim.grad_clip=0(\.0)? must be > 0"),
    ("stage.optim.grad_clip=-1", r"stage.optim.grad_clip=-1(\.0)? must be > 0"),
    ("stage.optim.betas=[0.9,1.0]", r"stage.optim.betas=\[0.9, 1.0\] must be two numbers in \[0, 1\)"),
    ("stage.optim.eps=0", r"stage.optim.eps=0(\.0)? must be > 0"),
    ("stage.optim.weight_decay=-0.1", "stage.optim.weight_decay"),
    ("stage.optim.warmup_fraction=1.5", "stage.optim.warmup_fraction"),
    ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps=0"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.max_nonfinite_steps=0", "trainer.max_nonfinite_steps=0"),
    ("trainer.limit_val_batches=-1", "trainer.limit_val_batches"),
])
def test_impossible_numbers_are_refused_naming_the_key(tmp_path, override, match):
    with pytest.raises(Exception, match=match):
        assemble(compose_config(FAST + [override, f"out_dir={tmp_path}", "run_name=x"]))
    assert not (tmp_path / "checkpoints").exists()


def test_nonfinite_training_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    """lr=1e3 diverges: non-finite steps are skipped (weights untouched), three in a row stop the run with a
    message, and every checkpoint written holds finite weights."""
    from moxin.optim import NonFiniteError

    with pytest.raises(NonFiniteError, match="non-finite loss or gradient norm"):
        R.train(compose_config(FAST + ["stage.optim.lr=1e3", "stage.optim.warmup_fraction=0", "trainer.max_nonfinite_steps=3",
                                 "trainer.checkpoint_every_n_steps=1", f"out_dir={tmp_path}", "run_name=nan"]))
    info, _ = find_resume(tmp_path)
    assert info is not None
    sd = torch.load(info.path, weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in sd.values())
    assert not (tmp_path / "hf").exists()


# ---- 7: init_from checks the architecture -------------------------------------------------------------------
def test_init_from_hf_with_another_architecture_is_refused(tmp_path):
    from moxin.model import Transformer, save_hf
    from moxin.checkpoint.weights import load_init_weights

    base = load_preset("tiny")
    src = Transformer(base.replace(rope_theta=1e6, norm_eps=1e-6, sliding_window=4096))
    save_hf(src, tmp_path / "hf")
    with pytest.raises(ValueError) as e:
        load_init_weights(Transformer(base), str(tmp_path / "hf"))
    msg = str(e.value)
    assert "rope_theta" in msg and "norm_eps" in msg and "sliding_window" in msg and "model." in msg
    same = Transformer(base.replace(rope_theta=1e6, norm_eps=1e-6, sliding_window=4096))
    load_init_weights(same, str(tmp_path / "hf"))  # the matching config loads
    assert torch.equal(same.layers[0].attention.wq.weight, src.layers[0].attention.wq.weight)


def test_init_from_ckpt_checks_the_recorded_config(tmp_path):
    import dataclasses

    from moxin.model import Transformer
    from moxin.checkpoint.weights import load_init_weights

    cfg = load_preset("tiny")
    m = Transformer(cfg.replace(rope_theta=5e5))
    torch.save({"state_dict": {f"model.{k}": v for k, v in m.state_dict().items()}, "global_step": 3, "epoch": 0,
                "moxin": {"model_config": dataclasses.asdict(m.cfg)}}, tmp_path / "a.ckpt")
    with pytest.raises(ValueError, match="rope_theta"):
        load_init_weights(Transformer(cfg), str(tmp_path / "a.ckpt"))
    load_init_weights(Transformer(cfg.replace(rope_theta=5e5)), str(tmp_path / "a.ckpt"))


# ---- 8: records that used to pass silently -------------------------------------------------------------------
def test_invalid_utf8_and_oversized_records_are_counted(tmp_path):
    from moxin.config import SourceConfig
    from moxin.data.bad_records import RecordStats
    from moxin.data.documents import iter_records

    f = tmp_path / "c.jsonl"
    good = [json.dumps({"text": f"document {i}"}).encode() for i in range(6)]
    lines = good[:2] + [b'{"text": "caf\xe9 bad bytes"}'] + good[2:4] + [json.dumps({"text": "x" * 5000}).encode()] \
        + good[4:]
    f.write_bytes(b"\n".join(lines) + b"\n")
    st = RecordStats()
    src = SourceConfig(name="c", path=str(f), max_record_bytes=1000, max_bad_fraction=1.0)
    texts = [t for _, t in iter_records(src, stats=st)]
    assert texts == [f"document {i}" for i in range(6)]
    assert st.bad == 2 and st.records == 8
    assert any("invalid UTF-8" in b for b in st.bad_examples) and any("max_record_bytes" in b for b in st.bad_examples)


def test_chat_roles_out_of_order_are_counted(tmp_path):
    from moxin.config import SourceConfig
    from moxin.data.sft_data import load_conversations

    ok = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    bad = [
        [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}],
        [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(json.dumps({"messages": m}) for m in [ok] * 5 + bad) + "\n")
    stats = load_conversations(SourceConfig(name="chat", path=str(f)), "messages", 10, 1.0).stats
    assert stats.kept == 5 and stats.reasons == {"role_order": 3}
    assert "role 'assistant' where 'user' is expected" in stats.bad_examples[0]


def test_a_checkpoint_becomes_last_only_once_its_step_and_validation_are_logged(tmp_path, monkeypatch):
    """Lightning logs a step's metrics after its on_train_batch_end hooks, and validates after that: a checkpoint
    switched to `last` there could be resumed from by a run whose log never got that step's loss or validation
    (a kill in between: the resumed run starts after it, the curve keeps a hole; a CI kill loop hit it). At
    every switch of last.ckpt the step's train row, and its validation where one is due, are in metrics.csv."""
    out = tmp_path / "run"
    seen = []
    real = point_last

    def spy(ckpt_dir, name):
        step = int(name[len("step"):-len(".ckpt")])
        rows = _rows(out)
        seen.append((step, any(s == step - 1 and t for s, t, _ in rows), any(s == step - 1 and v for s, _, v in rows)))
        real(ckpt_dir, name)

    monkeypatch.setattr(policy, "point_last", spy)
    R.train(compose_config(FAST + ["trainer.checkpoint_every_n_steps=1", "trainer.val_every_n_steps=3",
                             f"out_dir={out}", "run_name=run"]))
    assert [s for s, _, _ in seen] == list(range(1, 13))
    assert all(train for _, train, _ in seen), seen
    assert [s for s, _, val in seen if val] == [3, 6, 9, 12], seen
    assert os.readlink(out / "checkpoints" / "last.ckpt") == "step000012.ckpt"
    assert not list((out / "checkpoints").glob(".*"))


def test_a_failure_before_the_step_is_logged_keeps_the_previous_checkpoint(tmp_path):
    """A step whose validation fails: its checkpoint (written, not yet published) is dropped and the one
    before stays last; nothing temporary is left behind."""
    import lightning as L

    class FailVal(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            if trainer.global_step == 3:  # mid-phase: step 3's checkpoint is written, not yet published
                raise RuntimeError("validation failed")

    cfg = compose_config(FAST + ["trainer.checkpoint_every_n_steps=1", "trainer.val_every_n_steps=3",
                           f"out_dir={tmp_path}", "run_name=run"])
    trainer, stage, dm, ckpt_path, _ = assemble(cfg)
    trainer.callbacks.append(FailVal())
    with pytest.raises(RuntimeError, match="validation failed"):
        trainer.fit(stage, datamodule=dm)
    ck = tmp_path / "checkpoints"
    assert os.readlink(ck / "last.ckpt") == "step000002.ckpt"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000002.ckpt"]


def test_a_failure_at_the_end_of_training_keeps_the_final_checkpoint_unpublished(tmp_path):
    """The final checkpoint is published at on_train_end, after the other callbacks' (an eval.after=stage
    evaluation): where one of them fails, it is dropped, so resume=auto trains the last steps again and
    exports, instead of calling a run finished that never exported."""
    import lightning as L

    class FailEnd(L.Callback):
        def on_train_end(self, trainer, pl_module):
            raise RuntimeError("stage evaluation failed")

    args = FAST + [f"out_dir={tmp_path}", "run_name=run"]
    trainer, stage, dm, _, _ = assemble(compose_config(args))
    trainer.callbacks.insert(0, FailEnd())
    with pytest.raises(RuntimeError, match="stage evaluation failed"):
        trainer.fit(stage, datamodule=dm)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000009.ckpt"]
    res = R.train(compose_config(args + ["resume=auto", "export_hf=true"]))
    assert res["optimizer_steps"] == 12 and (tmp_path / "hf").is_dir()
    assert read_info(ck / "last.ckpt").moxin["finished"]


@pytest.mark.parametrize("at, last", [(4, 4), (3, 2)])
def test_sigterm_keeps_a_written_checkpoint_only_once_its_step_is_on_record(tmp_path, at, last):
    """Lightning turns SIGTERM into SIGTERMException at the end of the optimizer step (after its logs and
    validation) or inside a validation. At step 4 (no validation) the step is on record: its checkpoint, written
    but not yet published, becomes last. At step 3 the exception comes from inside step 3's validation: that
    checkpoint is dropped and step 2 stays last."""
    import signal

    import lightning as L

    class Term(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == at:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler notes it; the loop raises

    out = tmp_path / "run"
    trainer, stage, dm, _, _ = assemble(compose_config(FAST + ["trainer.checkpoint_every_n_steps=1",
                                                        "trainer.val_every_n_steps=3", f"out_dir={out}",
                                                        "run_name=run", "+logger.csv.flush_logs_every_n_steps=1"]))
    trainer.callbacks.append(Term())
    with pytest.raises(SystemExit):  # SIGTERMException
        trainer.fit(stage, datamodule=dm)
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", f"step{last:06d}.ckpt"]
    assert {s for s, t, _ in _rows(out) if t} >= set(range(last))  # every step up to the checkpoint on record


def test_a_phase_evaluation_is_on_record_before_its_checkpoint_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """+eval=sample eval.after=phase: the phase-end checkpoint becomes last only after that phase's evaluation is
    in eval.json (a kill during the evaluation redoes it on resume), and a resumed run's eval.json keeps the
    evaluations of the launches before it (it was rewritten with the resumed launch's alone)."""
    out = tmp_path / "run"
    seen = {}
    real = point_last

    def spy(ckpt_dir, name):
        f = out / "eval.json"
        seen[name] = [e["step"] for e in json.loads(f.read_text())["evaluations"]] if f.exists() else []
        real(ckpt_dir, name)

    monkeypatch.setattr(policy, "point_last", spy)
    ev = ["+eval=sample", "eval.after=phase", "eval.verifier_workers=0", "+eval.tasks.0.limit=2",
          "+eval.tasks.1.limit=2", "eval.tasks.1.samples=1", "eval.tasks.1.k=[1]", "trainer.val_every_n_steps=null",
          f"out_dir={out}", "run_name=run"]
    R.train(compose_config(FAST + ev + ["trainer.max_steps=8"]))  # phase a ends at step 6; the stop at 8 evaluates too
    assert seen["step000006.ckpt"] == [6] and seen["step000008.ckpt"] == [6, 8]
    R.train(compose_config(FAST + ev + ["resume=auto"]))
    assert seen["step000012.ckpt"] == [6, 8, 12]  # the final one after the last phase's evaluation
    saved = json.loads((out / "eval.json").read_text())["evaluations"]
    assert [(e["step"], e["when"]) for e in saved] == [(6, "phase 0"), (8, "phase 1"), (12, "phase 1")]


# ---- SLURM: SIGUSR1 before the time limit -------------------------------------------------------------------
def test_sigusr1_saves_at_a_step_boundary_and_resume_is_exact(tmp_path):
    """What `#SBATCH --signal=SIGUSR1@120` does: the run finishes its step, saves a complete checkpoint, exits 0
    without exporting; resume=auto then continues exactly (every step's loss as in the uninterrupted run)."""
    import signal
    import subprocess
    import sys
    import time

    full = R.train(compose_config(FAST + ["trainer.val_every_n_steps=null", f"out_dir={tmp_path / 'full'}", "run_name=full"]))
    args = FAST + ["trainer.val_every_n_steps=null", "trainer.checkpoint_every_n_steps=100", "export_hf=true",
                   "+logger.csv.flush_logs_every_n_steps=1", f"out_dir={tmp_path / 'part'}", "run_name=part"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(R.__file__).parents[1]))
    p = subprocess.Popen([sys.executable, "-m", "moxin.run"] + args, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None and not any(r[1] for r in _rows(tmp_path / "part")):
        time.sleep(0.2)
    p.send_signal(signal.SIGUSR1)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    info = read_info(tmp_path / "part" / "checkpoints" / "last.ckpt")
    assert 0 < info.step < 12 and f"saved optimizer step {info.step}" in err
    assert not (tmp_path / "part" / "hf").exists()
    R.train(compose_config(args[:-3] + ["+logger.csv.flush_logs_every_n_steps=1", f"out_dir={tmp_path / 'part'}",
                                  "run_name=part", "resume=auto"]))
    a = {s: float(t) for s, t, _ in _rows(tmp_path / "full") if t}
    b = {s: float(t) for s, t, _ in _rows(tmp_path / "part") if t}
    assert sorted(a) == sorted(b) == list(range(12)) and full["optimizer_steps"] == 12
    assert all(b[s] == pytest.approx(a[s], abs=1e-5) for s in a), (a, b)


# ---- GRPO: a verifier that cannot score stops the run ------------------------------------------------------
def test_grpo_stops_when_the_verifier_fails_on_most_completions(tmp_path, monkeypatch):
    import moxin.rewards as rewards_pkg
    from tests.helpers.tiny_grpo import arithmetic_prompts, fit_one_epoch, tiny_grpo_stage

    class Down:
        def __call__(self, completion, reference):
            raise TimeoutError("verifier service unreachable")

    monkeypatch.setitem(rewards_pkg.VERIFIERS, "down", Down)
    stage, tok = tiny_grpo_stage("down", max_new_tokens=6, micro_batch_size=4)
    with pytest.raises(RuntimeError, match="max_verifier_failure_fraction"):
        fit_one_epoch(stage, arithmetic_prompts(tok, steps=2), tmp_path)
    assert stage.history == []  # stopped at the first step, before any update was logged


def test_a_full_disk_stops_the_run_with_the_sizes_before_any_step(tmp_path, monkeypatch):
    """Too little free space for one checkpoint: the run stops before its first step with a message naming the
    folder, the size needed and the space free (torch's own error for a full disk, mid-run, is
    'inline_container.cc: unexpected pos'); with room at the start and none at a later save, that save is
    refused the same way and last.ckpt stays the previous complete checkpoint."""
    import collections

    from moxin.errors import user_message

    usage = collections.namedtuple("usage", "total used free")
    free = {"bytes": 1024}
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, free["bytes"]))
    with pytest.raises(DiskSpaceError) as e:
        R.train(compose_config(FAST + [f"out_dir={tmp_path / 'a'}", "run_name=a"]))
    msg = user_message(e.value)
    assert f"{tmp_path / 'a' / 'checkpoints'}" in msg and "step 0" in msg and "0.0 GiB are free" in msg
    assert "out_dir" in msg and not (tmp_path / "a" / "checkpoints").exists()

    free["bytes"] = 10**12
    calls = {"n": 0}

    def shrinking(p):  # room at the start and for the step-4 checkpoint, none afterwards
        calls["n"] += 1
        return usage(10**12, 0, 10**12 if calls["n"] <= 2 else 1024)

    monkeypatch.setattr(shutil, "disk_usage", shrinking)
    with pytest.raises(DiskSpaceError, match="checkpoint of step 6"):
        R.train(compose_config(FAST + [f"out_dir={tmp_path / 'b'}", "run_name=b", "trainer.checkpoint_every_n_steps=4"]))
    assert os.readlink(tmp_path / "b" / "checkpoints" / "last.ckpt") == "step000004.ckpt"


def test_save_checkpoints_false_writes_none_and_needs_no_room(tmp_path, monkeypatch):
    """trainer.save_checkpoints=false (benchmarks, metric-only sweeps): the run trains to its end on a disk with no
    room for a checkpoint, writes no checkpoint folder, and still writes its summary; a non-boolean is refused."""
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, 1024))
    R.train(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=n", "trainer.max_steps=3",
                             "trainer.checkpoint_every_n_steps=1", "trainer.save_checkpoints=false"]))
    assert not (tmp_path / "checkpoints").exists()
    info = json.loads((tmp_path / "summary.json").read_text())
    assert info["optimizer_steps"] == 3 and info["checkpoint"] is None
    with pytest.raises(ConfigError, match="trainer.save_checkpoints='no'.*expected bool"):
        R.train(compose_config(FAST + [f"out_dir={tmp_path / 'x'}", "trainer.save_checkpoints=no"]))


def test_checkpoint_size_estimate_covers_what_is_written(tmp_path):
    """The estimate the disk check uses is at least the size of the checkpoint file actually written."""
    R.train(compose_config(FAST + [f"out_dir={tmp_path}", "run_name=s", "trainer.max_steps=2"]))
    from hydra.utils import instantiate

    from moxin.model import Transformer

    model = Transformer(instantiate(compose_config(FAST).model))
    written = (tmp_path / "checkpoints" / "step000002.ckpt").stat().st_size
    assert written <= checkpoint_bytes(model) * 1.02 + 16 * 2**20
    assert checkpoint_bytes(model) == 3 * 4 * sum(p.numel() for p in model.parameters())
