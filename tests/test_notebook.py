"""notebooks/inspect_checkpoint.ipynb runs top to bottom on a tiny checkpoint made here."""

import importlib.util
from pathlib import Path

import pytest

# dev extras only: a machine with just the runtime dependencies (a GPU box) still collects the suite
nbformat = pytest.importorskip("nbformat")
NotebookClient = pytest.importorskip("nbclient").NotebookClient

from moxin import run as R  # noqa: E402
from tests.helpers.compose import compose_config  # noqa: E402
from tests.helpers.tiny_overrides import LORA_COMMON, LORA_SFT, TINY_MODEL, TINY_PRETRAIN  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "inspect_checkpoint.ipynb"


def _first_cell_output(tmp_path, kernel_cwd: Path) -> str:
    """Run the notebook's first code cell (it finds the run and reads its config) with the kernel in `kernel_cwd`."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [next(c for c in nb.cells if c.cell_type == "code")]
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(kernel_cwd)}}).execute()
    return "\n".join(o.get("text", "") for o in nb.cells[0].get("outputs", []))


def test_relative_moxin_run_is_the_launch_folders(tmp_path, monkeypatch):
    """`MOXIN_RUN=runs/<run> jupyter notebook .../inspect_checkpoint.ipynb`: the kernel runs in the notebook's
    folder, and the relative path is the folder the command was run in ($PWD), not the kernel's."""
    run_dir = tmp_path / "runs" / "rel"
    (run_dir / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    OmegaConf.save(compose_config(["out_dir=x", "run_name=rel"]), run_dir / ".hydra" / "config.yaml", resolve=True)
    kernel_cwd = tmp_path / "site-packages" / "moxin" / "notebooks"
    kernel_cwd.mkdir(parents=True)
    monkeypatch.setenv("PWD", str(tmp_path))
    monkeypatch.setenv("MOXIN_RUN", "runs/rel")
    assert f"run folder: {run_dir.resolve()}" in _first_cell_output(tmp_path, kernel_cwd)


def test_inspect_checkpoint_notebook_executes(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "nb"
    cfg = compose_config(TINY_PRETRAIN + [f"out_dir={run_dir}", "run_name=nb", "trainer.max_steps=3", "logger=[csv,tensorboard]"])
    # the notebook reads the run's saved Hydra config, as a real run folder has it
    (run_dir / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    R.train(cfg)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    (tmp_path / "runs" / "older").mkdir()  # without MOXIN_RUN the newest run (by summary.json / last.ckpt) is used
    monkeypatch.delenv("MOXIN_RUN", raising=False)
    # Jupyter starts the kernel in the notebook's folder; the runs are under the folder the command ran in ($PWD)
    kernel_cwd = tmp_path / "notebooks"
    kernel_cwd.mkdir()
    monkeypatch.setenv("PWD", str(tmp_path))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(kernel_cwd)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "step 3" in text and "parameters" in text
    assert "train loss: first" in text
    assert "->" in text  # generations printed
    assert f"run folder: {run_dir.resolve()}" in text
    if importlib.util.find_spec("matplotlib"):
        assert "plotted 3 train" in text and (run_dir / "loss.png").exists()
    if importlib.util.find_spec("tensorboard"):
        assert list(run_dir.glob("tb/version_0/events.*")), "the TensorBoard logger wrote next to the CSV one"


def test_notebook_shows_a_lora_run(tmp_path, monkeypatch):
    """A LoRA run (its last.ckpt holds the adapters only) reads like any other: the notebook merges the adapters
    into the base the run records, and shows the summary, the loss curve, predictions and generations."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moxin.model import Transformer
    from moxin.model.hf import save_hf

    torch.manual_seed(0)
    base = tmp_path / "base"
    save_hf(Transformer(instantiate(compose_config(TINY_MODEL).model)), base)
    run_dir = tmp_path / "runs" / "lora"
    cfg = compose_config(LORA_SFT + LORA_COMMON + [f"init_from={base}", f"out_dir={run_dir}", "run_name=lora",
                                                   "trainer.max_steps=2", "export_hf=false"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml", resolve=True)
    R.train(cfg)
    monkeypatch.setenv("MOXIN_RUN", str(run_dir))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"run folder: {run_dir.resolve()}" in text
    assert "LoRA adapters merged" in text  # the checkpoint's adapters on the base the run started from
    assert "train loss: first" in text and "parameters" in text and "->" in text
