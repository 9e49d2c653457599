"""Checks that two processes train as one: equal gradients at every optimizer step (the first equal to the
hand-written reference's), equal logged losses and weights. Used by tests/test_distributed.py (gloo on CPU) and
tests/test_gpu.py (NCCL)."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.helpers.wiring_reference import assert_grads_close

HELPERS = Path(__file__).parent


def check_same_training(one: dict, two: dict, n_steps: int, what: str, loss_rel: float = 1e-5) -> None:
    """Equal gradients at each of the `n_steps` optimizer steps (the first step's equal to the hand-written
    reference's), equal logged losses and weights."""
    assert len(one["steps"]) == len(two["steps"]) == n_steps
    for run, name in ((one, "1 process"), (two, what)):
        assert_grads_close(run["steps"][0], run["reference"], f"{name}, step 0 vs the reference")
    for s, (g1, g2) in enumerate(zip(one["steps"], two["steps"])):
        assert_grads_close(g2, g1, f"{what} vs 1 process, step {s}")
    assert len(one["losses"]) == len(two["losses"]) > 0
    assert one["losses"] == pytest.approx(two["losses"], rel=loss_rel, abs=1e-5)
    assert one["checksum"] == pytest.approx(two["checksum"], rel=1e-6)


def run_dpo_equivalence(world: int, out: Path, accelerator: str = "cpu", layout: str = "fsdp2") -> dict:
    """tests/helpers/dpo_equivalence.py on `world` processes (layout fsdp2, or tp: tensor-parallel pairs): its JSON
    record with the gradients it saved."""
    torchrun(HELPERS / "dpo_equivalence.py", out, accelerator, layout, nproc=world)
    return json.loads(out.read_text()) | torch.load(f"{out}.grads.pt", weights_only=True)


def check_dpo_fsdp_matches_one(tmp_path: Path, accelerator: str, layout: str = "fsdp2") -> None:
    """DPO with a frozen reference, 2 FSDP2 processes (or a tensor-parallel pair, layout tp) vs one: the same
    training, the reference sharded like the policy and never moving, and the policy trained."""
    one = run_dpo_equivalence(1, tmp_path / "one.json", accelerator)
    two = run_dpo_equivalence(2, tmp_path / "two.json", accelerator, layout)
    assert two["ref_sharded"] and not one["ref_sharded"]  # the frozen reference is sharded like the policy
    check_same_training(one, two, 3, f"2 processes, {layout}", loss_rel=1e-4)
    assert one["ref_checksum"] == pytest.approx(two["ref_checksum"], rel=1e-9)  # the reference never moves
    assert abs(one["losses"][-1] - one["losses"][0]) > 1e-3  # it trained
