"""Async distributed checkpoints (``trainer.async_checkpoint=true``, FSDP2 on 2 gloo processes): the folders are
the synchronous save's, tensor for tensor; a run resumed from them continues the straight run bit for bit; and
``last.ckpt`` never points at a folder whose write is still in flight (the writes are held back for two step
boundaries, so training demonstrably goes on meanwhile), also after a SIGUSR1 stop."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

from moxin.assemble import build_strategy
from moxin.checkpoint.files import read_info
from moxin.config import ConfigError
from tests.conftest import torchrun
from tests.helpers.compose import compose_config, logged_train_losses
from tests.helpers.kill_loop import TINY
from tests.helpers.resume_state import load_checkpoint, state_diff
from tests.helpers.tiny_overrides import replaced

ROOT = Path(__file__).resolve().parents[1]
WATCH = ROOT / "tests" / "helpers" / "async_watch.py"
# 12 steps in two phases of 6; a checkpoint every 3 steps (step 6 is phase a's end), all kept; no validation (a
# straight run validates after a checkpoint that a resumed one starts from, which moves the RNG and Lightning's
# validation counters: tests/test_run.py's resume test leaves it out for the same reason)
RUN = replaced(TINY, "trainer.checkpoint_every_n_steps=3", "trainer.val_every_n_steps=null") + [
    "hardware=fsdp_cpu", "trainer.keep_all_checkpoints=true"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _launch(out: Path, *extra: str, watch: Path | None = None, env: dict | None = None) -> None:
    args = [*RUN, *extra, f"out_dir={out}", f"run_name={out.name}"]
    head = [WATCH, watch] if watch is not None else ["-m", "moxin.run"]
    torchrun(*head, *args, cwd=ROOT, env=_env() | (env or {}), timeout=600,
             before_retry=lambda: shutil.rmtree(out, ignore_errors=True))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A synchronous and an async run to step 9 (the async one with its writes held back)."""
    root = tmp_path_factory.mktemp("async")
    _launch(root / "sync", "trainer.max_steps=9")
    watch = root / "watch.json"
    _launch(root / "async", "trainer.max_steps=9", "trainer.async_checkpoint=true", watch=watch)
    return root, json.loads(watch.read_text())


@pytest.fixture(scope="module")
def resumed(runs):
    """A copy of the async run cut back to its step-3 checkpoint and resumed (async, across the phase end at 6) to
    step 9."""
    root, _ = runs
    cut = root / "resumed"
    shutil.copytree(root / "async", cut, symlinks=True)
    for step in (6, 9):
        shutil.rmtree(cut / "checkpoints" / f"step{step:06d}.ckpt")
    (cut / "checkpoints" / "last.ckpt").unlink()
    os.symlink("step000003.ckpt", cut / "checkpoints" / "last.ckpt")
    _launch(cut, "trainer.max_steps=9", "trainer.async_checkpoint=true", "resume=auto")
    return root, cut


def _steps(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.iterdir())


def test_async_checkpoints_equal_the_synchronous_ones(runs):
    root, _ = runs
    names = ["last.ckpt", "step000003.ckpt", "step000006.ckpt", "step000009.ckpt"]
    assert _steps(root / "sync" / "checkpoints") == _steps(root / "async" / "checkpoints") == names
    assert os.readlink(root / "async" / "checkpoints" / "last.ckpt") == "step000009.ckpt"
    for name in names[1:]:
        sync = load_checkpoint(root / "sync" / "checkpoints" / name)
        asyn = load_checkpoint(root / "async" / "checkpoints" / name)
        assert state_diff(sync["dcp"], asyn["dcp"]) == [], name  # weights and optimizer state, bitwise
        assert state_diff(sync["meta"], asyn["meta"]) == [], name  # loops, data position, RNG, moxin's entry


def test_resumed_from_an_async_checkpoint_continues_the_straight_run_bit_for_bit(resumed):
    root, cut = resumed
    assert os.readlink(cut / "checkpoints" / "last.ckpt") == "step000009.ckpt"
    for name in ("step000006.ckpt", "step000009.ckpt"):
        straight = load_checkpoint(root / "sync" / "checkpoints" / name)
        resumed = load_checkpoint(cut / "checkpoints" / name)
        assert state_diff(straight["dcp"], resumed["dcp"]) == [], name
        assert state_diff(straight["meta"], resumed["meta"]) == [], name
    after = {}
    for row in csv.DictReader(open(cut / "logs" / "version_1" / "metrics.csv")):
        if row.get("train/loss"):
            after[int(row["step"])] = float(row["train/loss"])
    losses = logged_train_losses(root / "sync")
    assert sorted(after) == [3, 4, 5, 6, 7, 8]
    assert after == {s: losses[s] for s in after}  # exactly: same arithmetic in the same order


def test_last_never_points_at_a_save_in_flight(runs):
    _, records = runs
    # FSDP2 under the async strategy: DTensor parameters at every step's start (FSDP2 leaves the root's gathered
    # after a phase's last forward)
    assert all(r["sharded"] for r in records if r["where"] == "start")
    in_flight = [r for r in records if r["pending"] is not None and not r["written"]]
    # training went on while each save (steps 3 and 6) was being written; the final one (9) is waited for at the end
    assert {r["pending"] for r in in_flight} == {"step000003.ckpt", "step000006.ckpt", "step000009.ckpt"}
    assert any(r["step"] > 3 for r in in_flight if r["pending"] == "step000003.ckpt")
    for r in records:
        assert r["last"] is None or r["last_complete"], r
        if r["pending"] is not None and not r["written"]:
            assert r["last"] != r["pending"], r
    # published once written, at a step boundary before the next save (step 3 is last by step 5's end), and the
    # final one at the end of fit
    assert any(r["last"] == "step000003.ckpt" and r["step"] < 6 for r in records)
    assert any(r["last"] == "step000006.ckpt" and r["step"] < 9 for r in records)


def test_async_checkpoint_needs_fsdp2():
    hw = compose_config([*TINY, "hardware=ddp_cpu"]).hardware
    with pytest.raises(ConfigError, match="trainer.async_checkpoint=true.*'ddp_cpu'.*async_checkpoint=false"):
        build_strategy(hw, 2, async_checkpoint=True)


def test_a_signal_stop_publishes_its_async_checkpoint_once_written(tmp_path):
    """SIGUSR1's stop (StopOnSignal: save at the step boundary, stop, publish at the end of fit) with the write held
    back: the run waits for it, then last.ckpt points at the complete step-4 folder."""
    out, watch = tmp_path / "sig", tmp_path / "watch.json"
    _launch(out, "trainer.async_checkpoint=true", watch=watch, env={"SIGNAL_AT": "4"})
    records = json.loads(watch.read_text())
    assert any(r["pending"] == "step000004.ckpt" and not r["written"] for r in records)
    assert all(r["last"] != "step000004.ckpt" for r in records if r["where"] != "train end")
    assert records[-1]["step"] == 4
    assert os.readlink(out / "checkpoints" / "last.ckpt") == "step000004.ckpt"
    assert read_info(out / "checkpoints" / "last.ckpt").step == 4
