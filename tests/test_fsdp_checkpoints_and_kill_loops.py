"""The FSDP2 path (Lightning's ModelParallelStrategy with distributed checkpoints, 2 gloo processes under
torchrun): the checkpoint policy with a checkpoint folder, the HF export at the end, init_from and
scripts/convert_checkpoint.py reading the folder without a process group, a resume on another process count
refused with the fix where the data module cannot redistribute its position, and kill loops (single process and FSDP) against uninterrupted runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, torchrun
import torch

from moxin.assemble import assemble, check_resume_world
from moxin.checkpoint.files import read_info
from moxin.checkpoint.weights import load_model_weights
from moxin.config import ConfigError
from moxin.data.base import MoxinDataModule
from moxin.data.dpo_data import PreferenceDataModule
from moxin.data.grpo_data import PromptDataModule
from moxin.data.pretrain_data import PretrainDataModule
from moxin.data.sft_data import ChatSFTDataModule
from tests.helpers.kill_loop import TINY
from tests.helpers.compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers" / "kill_loop.py"


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """4 of 12 optimizer steps with 2 FSDP2 processes, HF export on (one launch shared by the tests below)."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    # progress lines on: rank zero prints them, and nothing in them may be a collective only it enters
    args = [a for a in TINY if a != "export_hf=false" and not a.startswith(("+logger", "trainer.progress"))] + [
        "trainer.checkpoint_every_n_steps=3", "trainer.max_steps=4", f"out_dir={out}", "run_name=run",
        "trainer.progress_bar=plain", "trainer.progress_every_n_steps=1"]
    res = torchrun("-m", "moxin.run", "hardware=fsdp_cpu", *args, cwd=ROOT, env=_env(), timeout=600,
                   before_retry=lambda: shutil.rmtree(out, ignore_errors=True))
    assert [ln.split(" | ")[0] for ln in res.stdout.splitlines() if ln.startswith("step ")] == [
        f"step {i}/4" for i in range(1, 5)]
    return out


def test_fsdp_run_writes_one_complete_checkpoint_folder_and_hf(fsdp_run):
    ck = fsdp_run / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000004.ckpt"]  # step 3 retired after 4
    assert os.readlink(ck / "last.ckpt") == "step000004.ckpt"
    d = ck / "step000004.ckpt"
    assert d.is_dir() and (d / ".metadata").is_file() and (d / "meta.pt").is_file()
    assert len(list(d.glob("*.distcp"))) == 2
    info = read_info(ck / "last.ckpt")
    assert info.step == 4 and info.world_size == 2 and not info.moxin["finished"]
    # the HF export (gathered tensor by tensor, written by rank 0) holds the checkpoint's weights
    from moxin.model import load_hf

    hf = load_hf(fsdp_run / "hf").state_dict()
    dcp, cfg, _ = load_model_weights(d)
    assert set(hf) == set(dcp) and cfg.dim == 64
    assert all(torch.equal(hf[k], dcp[k]) for k in hf)


def test_fsdp_checkpoint_feeds_one_process(fsdp_run, tmp_path):
    ck = fsdp_run / "checkpoints" / "last.ckpt"
    one = [a for a in TINY if not a.startswith("+logger")]
    # every built-in data module resumes on another process count (tests/test_reshard_resume.py); one that cannot
    # (a data module of the user's, by default) is refused, naming both counts and the way out
    class OwnData(MoxinDataModule):
        pass

    with pytest.raises(ConfigError, match="written by 2 processes; this run has 1.*OwnData.*init_from="):
        check_resume_world(str(ck), 1, OwnData())
    for dm in (ChatSFTDataModule, PreferenceDataModule, PromptDataModule, PretrainDataModule):
        check_resume_world(str(ck), 1, dm.__new__(dm))
    # init_from the distributed-checkpoint folder, one process, no process group: the same weights
    # (preflight first, as the command line runs it: it once refused this folder for lacking config.json)
    from moxin.errors import preflight

    sft_cfg = compose_config(one + [f"init_from={ck}", f"out_dir={tmp_path / 'sft'}", "run_name=sft"])
    preflight(sft_cfg)
    _, stage, *_ = assemble(sft_cfg)
    stage.configure_model()
    dcp, _, _ = load_model_weights(ck)
    assert all(torch.equal(v, dcp[k]) for k, v in stage.model.state_dict().items())
    # ... and a mismatching architecture is refused by name
    with pytest.raises(ValueError, match="rope_theta"):
        _, st, *_ = assemble(compose_config(one + [f"init_from={ck}", "model.rope_theta=1e6", f"out_dir={tmp_path / 'x'}",
                                            "run_name=x"]))
        st.configure_model()
    # scripts/convert_checkpoint.py: the folder -> a HF folder equal to the run's own export
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_checkpoint.py"), str(ck), str(tmp_path / "hf")],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    from moxin.model import load_hf

    a, b = load_hf(tmp_path / "hf").state_dict(), load_hf(fsdp_run / "hf").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _kill_loop(tmp_path, mode, kills, seed, port):
    res = subprocess.run([sys.executable, str(HELPER), str(tmp_path), "--mode", mode, "--kills", str(kills), "--seed",
                          str(seed), "--port", str(port)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    r = json.loads((tmp_path / "kill_loop.json").read_text())
    assert r["kills"] >= 1
    assert r["all_resumed_from_newest_complete"], r["events"]
    assert r["steps_killed"] == r["steps_ref"] == list(range(12)), r["events"]  # every step's loss on record
    assert r["val_steps_killed"] == r["val_steps_ref"] and r["max_val_diff"] <= 1e-5, r  # and every validation
    assert r["max_loss_diff"] <= 1e-5 and r["max_weight_diff"] <= 1e-6, r
    assert r["state_diff"] == [], r["state_diff"]  # the final checkpoints equal leaf by leaf, dedup sets included
    assert r["final_val_ref"] == pytest.approx(r["final_val_killed"], abs=1e-5)
    assert r["leftover_temporaries"] == [] and r["checkpoint_files"] == ["last.ckpt", "step000012.ckpt"]
    return r


def test_kill_once_single_process(tmp_path):
    _kill_loop(tmp_path, "single", 1, 0, free_port())


@pytest.mark.slow
def test_kill_loop_single_process(tmp_path):
    _kill_loop(tmp_path, "single", 8, 2, free_port())


@pytest.mark.slow
def test_kill_loop_fsdp(tmp_path):
    _kill_loop(tmp_path, "fsdp", 5, 3, free_port())
