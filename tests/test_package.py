"""The package installs: a built wheel carries the Hydra configs, so a non-editable install composes and runs
`python -m moxin.run` from any folder (not only from a source checkout)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_conf_and_runs_from_another_folder(tmp_path):
    pytest.importorskip("setuptools")
    dist, target, elsewhere = tmp_path / "dist", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                            "-w", str(dist)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("moxin-*.whl"))
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    assert (target / "moxin" / "conf" / "config.yaml").is_file()
    assert (target / "moxin" / "conf" / "experiment" / "grpo.yaml").is_file()
    run = subprocess.run([sys.executable, "-m", "moxin.run", "--cfg", "job", "+experiment=sft"], cwd=elsewhere,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "moxin.stages.sft.SFTStage" in run.stdout
    check = subprocess.run([sys.executable, "-c", "import moxin.paths as p; print(p.conf_dir())"], cwd=elsewhere,
                           env={"PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == str(target / "moxin" / "conf")
    # the notebook ships inside the package: the command a finished run prints names a file that exists, and its
    # install hint (when Jupyter is missing) names packages, not an editable install of a checkout the user lacks
    nb = subprocess.run([sys.executable, "-c", "from moxin.ui import notebook_command as c; print(c('runs/x'))"],
                        cwd=elsewhere, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=120)
    assert nb.returncode == 0, nb.stderr[-2000:]
    line = nb.stdout.strip()
    shipped = target / "moxin" / "notebooks" / "inspect_checkpoint.ipynb"
    assert shipped.is_file() and line.endswith(f"jupyter notebook {shipped}"), line
    assert f"MOXIN_RUN={elsewhere / 'runs' / 'x'} " in line and "pip install -e" not in line, line


def test_the_import_graph_has_no_circle_and_keeps_the_layering_rules():
    """scripts/import_graph.py (ast only, imports inside functions count) finds no circle among moxin's modules and
    none of docs/architecture.md's forbidden dependencies (the data layer on losses or verifiers, the model on
    conf/, losses on the model, anything on moxin.run, moxin.config on the rest of moxin)."""
    graph = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert graph.returncode == 0, graph.stdout[-3000:] + graph.stderr[-2000:]
    assert "circles: 0" in graph.stdout and "forbidden dependencies: 0" in graph.stdout
