"""`python -m moxin.run -m a=1,2`: a Hydra multirun sweep gives every job its own folder and returns the metric."""

import subprocess
import sys
from pathlib import Path


def test_multirun_jobs_get_their_own_folders(tmp_path):
    args = ["model.dim=64", "model.n_layers=1", "model.hidden_dim=128", "model.n_heads=4", "model.n_kv_heads=2",
            "model.head_dim=16", "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256",
            "schedule.phases=[{name: a, seq_len: 64, tokens: 2048, mixture: {prose: 1, code: 1, cjk: 1}}]",
            "trainer.val_every_n_steps=2", "samples.prompts=[]", "trainer.progress_bar=none", "export_hf=false",
            "hardware.num_workers=0", f"hydra.sweep.dir={tmp_path}/sweep"]
    res = subprocess.run([sys.executable, "-m", "moxin.run", "-m", *args, "stage.optim.lr=1e-3,3e-3"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for j in jobs:
        assert (tmp_path / "sweep" / j / "checkpoints" / "last.ckpt").exists()
        assert (tmp_path / "sweep" / j / "summary.json").exists()
    # the continue command names the job's own value, not the sweep's list
    assert "stage.optim.lr=0.003" in res.stdout and "stage.optim.lr=1e-3,3e-3" not in res.stdout
