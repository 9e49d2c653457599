"""GRPO's held-out reward (stage.grpo.heldout_every): logged before the rollouts of every N-th step and after the
last update, and measuring it leaves the training run itself unchanged (greedy decoding draws no random numbers)."""

import lightning as L
import pytest
import torch

import moxin.rewards as rewards_pkg
from moxin.data.grpo_data import PromptDataModule
from moxin.rewards import RewardResult
from tests.helpers.tiny_grpo import tiny_grpo_stage


class OddLength:
    """A reward that varies on a random model, so groups are not all equal and updates happen."""

    def __call__(self, completion: str, reference: str) -> RewardResult:
        return RewardResult(float(len(completion) % 2), "correct" if len(completion) % 2 else "wrong")


@pytest.fixture(autouse=True)
def _verifier(monkeypatch):
    monkeypatch.setitem(rewards_pkg.VERIFIERS, "odd_length", OddLength)


def _fit(tmp_path, heldout_every):
    stage, tok = tiny_grpo_stage("odd_length", max_new_tokens=5, micro_batch_size=8, heldout_every=heldout_every,
                                 heldout_prompts=6)
    dm = PromptDataModule(source="arithmetic", prompts_per_step=2, steps=3, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, task={"pool": 4})
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)).fit(stage, dm)
    return stage


def test_heldout_reward_is_logged_and_changes_nothing_else(tmp_path):
    plain = _fit(tmp_path / "a", 0)
    held = _fit(tmp_path / "b", 2)
    assert [h["grpo/reward_mean"] for h in held.history] == [h["grpo/reward_mean"] for h in plain.history]
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, held.model.state_dict()[k]), k
    assert ["grpo/heldout_reward" in h for h in held.history] == [True, False, True]  # steps 0 and 2
    assert "grpo/heldout_reward_final" in held.history[-1]
    assert [e["rl_updates"] for e in held.heldout_history] == [0, 2, 3]
    assert all(0.0 <= e["grpo/heldout_reward"] <= 1.0 for e in held.heldout_history)
    assert not any("grpo/heldout_reward" in h for h in plain.history)
