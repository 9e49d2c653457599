"""GRPO's held-out reward (stage.grpo.heldout_every): logged before the rollouts of every N-th step and after the
last update, and measuring it leaves the training run itself unchanged (greedy decoding draws no random numbers;
heldout_samples draws from a generator of its own).
The recipe's validation (stage.grpo.val_*): n_val sampled completions a problem of a file, on verl's schedule, with
its own random numbers, so the training run is unchanged too."""

import json

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


def _fit(tmp_path, heldout_every, **grpo):
    stage, tok = tiny_grpo_stage("odd_length", max_new_tokens=5, micro_batch_size=8, heldout_every=heldout_every,
                                 heldout_prompts=6, **grpo)
    dm = PromptDataModule(source="arithmetic", prompts_per_step=2, steps=3, tokenizer=tok, seed=0,
                          max_prompt_tokens=64, task={"pool": 4})
    L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path)).fit(stage, dm)
    return stage


def test_heldout_reward_is_logged_and_changes_nothing_else(tmp_path):
    plain = _fit(tmp_path / "a", 0)
    held = _fit(tmp_path / "b", 2, heldout_samples=3)  # greedy and 3 samples a prompt, with their own generator
    assert [h["grpo/reward_mean"] for h in held.history] == [h["grpo/reward_mean"] for h in plain.history]
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, held.model.state_dict()[k]), k
    assert ["grpo/heldout_reward" in h for h in held.history] == [True, False, True]  # steps 0 and 2
    assert "grpo/heldout_reward_final" in held.history[-1]
    assert [e["rl_updates"] for e in held.heldout_history] == [0, 2, 3]
    assert all(0.0 <= e["grpo/heldout_reward"] <= 1.0 for e in held.heldout_history)
    assert all(0.0 <= e["grpo/heldout_reward_sampled"] <= 1.0 for e in held.heldout_history)
    assert "grpo/heldout_reward_sampled_final" in held.history[-1]
    assert not any("grpo/heldout_reward" in h for h in plain.history)


def test_validation_samples_n_per_problem_on_the_recipes_schedule_and_changes_nothing_else(tmp_path, monkeypatch):
    """val_before_train + val_every_n_steps=2 over 3 rollout steps: before step 0, before step 2 (after 2 updates)
    and after the last update (val/reward_mean_final); each time every one of the first val_prompts problems is
    sampled n_val times at val_temperature, and val/reward_mean is the mean over all of those samples."""
    import moxin.eval.heldout as heldout

    src = tmp_path / "val.jsonl"
    src.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                           for i in range(5)))
    calls = []
    real_gen, real_score = heldout.generate_all, heldout.score_generations

    def gen(model, prompts, **kw):
        calls.append((prompts, kw["temperature"]))
        return real_gen(model, prompts, **kw)

    def score(tok, gens, answers, *a):
        texts, results = real_score(tok, gens, answers, *a)
        calls[-1] += (sum(r.score for r in results) / len(results), [tuple(g.tokens) for g in gens])
        return texts, results

    monkeypatch.setattr(heldout, "generate_all", gen)
    monkeypatch.setattr(heldout, "score_generations", score)
    plain = _fit(tmp_path / "a", 0)
    assert calls == []
    val = _fit(tmp_path / "b", 0, val_source=str(src), val_prompts=3, val_every_n_steps=2, n_val=4,
               val_temperature=0.6)
    assert [h["grpo/reward_mean"] for h in val.history] == [h["grpo/reward_mean"] for h in plain.history]
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, val.model.state_dict()[k]), k
    assert [e["rl_updates"] for e in val.val_history] == [0, 2, 3]
    assert ["val/reward_mean" in h for h in val.history] == [True, False, True]
    assert "val/reward_mean_final" in val.history[-1] and "val/no_answer_frac" in val.history[0]
    assert len(calls) == 3
    for (prompts, temperature, mean, _), e in zip(calls, val.val_history):
        assert temperature == 0.6 and len(prompts) == 12 and len({tuple(p) for p in prompts}) == 3
        assert all(prompts[i] == prompts[i - i % 4] for i in range(12))  # each problem's 4 samples together
        assert e["val/reward_mean"] == pytest.approx(mean)
    # sampled, not greedy: some problem's 4 completions differ
    assert any(len(set(toks[i:i + 4])) > 1 for _, _, _, toks in calls for i in range(0, 12, 4))
