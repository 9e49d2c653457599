"""`python -m moxin.run -m a=1,2`: a Hydra multirun sweep gives every job its own folder, returns the metric, and
ends with a table of every job's overrides -> monitored metric (a job that never produced it is named)."""

import json
import subprocess
import sys
from pathlib import Path

from moxin.sweep import format_table
from tests.helpers.tiny_overrides import tiny_model


def test_multirun_jobs_get_their_own_folders_and_a_summary(tmp_path):
    args = [*tiny_model(n_layers=1, sliding_window=None), "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256",
            "schedule.phases=[{name: a, seq_len: 64, tokens: 2048, mixture: {prose: 1, code: 1, cjk: 1}}]",
            "samples.prompts=[]", "trainer.progress_bar=none", "trainer.val_every_n_steps=4", "export_hf=false",
            "hardware.num_workers=0", f"hydra.sweep.dir={tmp_path}/sweep"]
    res = subprocess.run([sys.executable, "-m", "moxin.run", "-m", *args, "trainer.max_steps=4,2"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sweep = tmp_path / "sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == ["0", "1"]
    for j in jobs:
        assert (sweep / j / "checkpoints" / "last.ckpt").exists()
        assert (sweep / j / "summary.json").exists()
        assert (sweep / j / ".hydra" / "config.yaml").exists()
    # job 1 stopped at step 2 of 4: its continue command has its own values, never the sweep's list, and drops
    # max_steps (a continued run that kept it would stop at once); job 0 finished, nothing to continue
    cont = [line for line in res.stdout.splitlines() if line.startswith("Continue this run:")]
    assert len(cont) == 1 and "trainer.max_steps" not in cont[0] and "trainer.val_every_n_steps=4" in cont[0]
    # the summary: job 0 validated at step 4, job 1 stopped at step 2 before any validation (named, warned)
    rows = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["overrides"][-1] for r in rows] == ["trainer.max_steps=4", "trainer.max_steps=2"]
    assert isinstance(rows[0]["value"], float) and rows[1]["value"] is None
    assert "| 1 | trainer.max_steps=2 | never logged |" in res.stdout
    assert "monitor=val/loss was never produced by job(s) [1]" in res.stdout


def test_summary_table_marks_best_failed_and_missing():
    rows = [{"job": 0, "overrides": ["seed=1", "lr=1"], "monitor": "val/loss", "value": 2.5, "status": "completed"},
            {"job": 1, "overrides": ["seed=1", "lr=2"], "monitor": "val/loss", "value": 2.0, "status": "completed"},
            {"job": 2, "overrides": ["seed=1", "lr=3"], "monitor": "val/loss", "value": None, "status": "failed",
             "error": "UserError: boom"}]
    t = format_table(rows)
    assert "| 1 | lr=2 | 2.0000 * |" in t and "| 0 | lr=1 | 2.5000 |" in t and "failed: UserError: boom" in t
