"""The SFT warm-up before GRPO (moxin/warmup.py): the data's solutions are written as chat records and trained on
by an ordinary SFT run in out_dir/warmup (its checkpoint, summary.json); GRPO starts from exactly its final
weights; a finished warm-up is not run again, an interrupted one resumes, a fresh command refuses a folder that
holds one. The demo's reward rise itself is the slow test at the end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from moxin import run as R
from moxin.config import ConfigError
from moxin.tokenizer import load_tokenizer
from moxin.warmup import SOLUTIONS, warmup_config, write_solutions
from tests.helpers.compose import compose_config
from tests.helpers.tiny_overrides import tiny_model
from tests.helpers.tokenizer_count import count_tokenizers

TINY = ["+experiment=grpo", *tiny_model(n_layers=1, sliding_window=None), "data.steps=3", "data.prompts_per_step=4", "data.task.pool=4",
        "stage.grpo.group_size=4", "stage.grpo.max_new_tokens=8", "stage.grpo.verifier_workers=0",
        "stage.grpo.ppo_epochs=1", "stage.grpo.num_minibatches=1", "stage.grpo.filter_zero_std=false",
        "stage.grpo.mask_truncated=false", "stage.optim.lr=1e-3", "trainer.progress_bar=none",
        "warmup.steps=6", "warmup.batch_size=4", "warmup.micro_batch_size=2", "trainer.checkpoint_every_n_steps=2"]


def _cfg(out: Path, *extra):
    return compose_config(TINY + [f"out_dir={out}", f"run_name={out.name}", *extra])


def _summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def _metric_rows(d: Path, key: str) -> list[tuple[int, int, float]]:
    """(csv version, step, value) of every row of `key` in a run folder's metrics.csv files."""
    out = []
    for f in sorted(d.glob("logs/version_*/metrics.csv")):
        v = int(f.parent.name.split("_")[1])
        out += [(v, int(r["step"]), float(r[key])) for r in csv.DictReader(open(f)) if r.get(key)]
    return out


def test_warmup_is_an_sft_run_and_grpo_starts_from_its_final_weights(tmp_path):
    out = tmp_path / "run"
    info = R.train(_cfg(out))
    wdir = out / "warmup"
    # the task's solutions, as chat records in the SFT data's format: the RL prompt answered
    convs = [json.loads(line) for line in (wdir / SOLUTIONS).read_text().splitlines()]
    assert len(convs) == 6 * 4
    for c in convs:
        user, asst = c["messages"]
        assert user["role"] == "user" and user["content"].startswith("What is ") and "Answer: N" in user["content"]
        a, op, b = user["content"][len("What is "):].split("?")[0].split()
        assert asst == {"role": "assistant", "content": f"Answer: {int(a) + int(b) if op == '+' else int(a) - int(b)}"}
    # ... trained by the SFT stage through the SFT data module, a run of its own with its checkpoint and summary
    ws = _summary(wdir)
    assert ws["optimizer_steps"] == 6 and ws["metrics"]["sft/conversations"] == 4
    assert [s for _, s, _ in _metric_rows(wdir, "train/loss")] == list(range(6))
    wcfg = warmup_config(_cfg(out))
    assert wcfg.stage._target_ == "moxin.stages.sft.SFTStage" and wcfg.out_dir == str(wdir)
    assert wcfg.data._target_ == "moxin.data.sft_data.ChatSFTDataModule" and wcfg.data.train.path == str(wdir / SOLUTIONS)
    assert wcfg.stage.optim.lr == _cfg(out).warmup.optim.lr  # warmup.optim, merged onto conf/stage/sft.yaml's
    ckpt = Path(ws["checkpoint"])
    assert ckpt.is_file() and ckpt.parent == wdir / "checkpoints"
    assert torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["moxin"]["finished"]
    # GRPO started from exactly those weights: its init_from is the warm-up's final checkpoint
    s = _summary(out)
    assert s["init_from"] == str(ckpt) and info["init_checksum"] == s["init_checksum"]
    assert s["init_checksum"] == pytest.approx(ws["weights_checksum"], rel=1e-12)
    losses = [v for _, _, v in _metric_rows(wdir, "train/loss")]
    assert losses[-1] < losses[0]  # the warm-up learnt
    # GRPO's own log holds rollout steps only; no warm-up steps in front any more
    assert [s for _, s, _ in _metric_rows(out, "grpo/reward_mean")] == [0, 1, 2]
    assert not _metric_rows(out, "sft/conversations")
    assert "warmup_steps" not in s["data"]

    # the command again with resume=auto: GRPO is complete, and the finished warm-up is not run again
    before = ckpt.stat().st_mtime_ns
    again = R.train(_cfg(out, "resume=auto"))
    assert again.get("nothing_to_do") and ckpt.stat().st_mtime_ns == before
    assert len(list(wdir.glob("logs/version_*"))) == 1


def test_a_grpo_run_and_its_warmup_share_one_tokenizer(tmp_path, monkeypatch):
    """moxin.assemble's contract: the command loads `tokenizer: mistral` once, and that object writes the solutions,
    trains the warm-up and then GRPO (loader workers get it pickled, which builds none)."""
    built = count_tokenizers(monkeypatch)
    out = tmp_path / "run"
    info = R.train(_cfg(out, "warmup.steps=1", "data.steps=1", "export_hf=false"))
    assert _summary(out / "warmup")["optimizer_steps"] == 1 and info["rollout_steps"] == 1
    assert built == ["mistral"]


def test_interrupted_warmup_resumes_and_ends_where_an_uninterrupted_one_does(tmp_path, capfd):
    full = tmp_path / "full"
    R.train(_cfg(full))
    part = tmp_path / "part"
    cfg = _cfg(part)
    # a warm-up stopped after 3 of its 6 steps (checkpoints every 2: the newest complete one is step 2)
    wcfg = warmup_config(cfg)
    wcfg.trainer.max_steps = 3
    write_solutions(cfg, Path(wcfg.out_dir) / SOLUTIONS, load_tokenizer(cfg.tokenizer))
    R.train(wcfg)
    assert _summary(part / "warmup")["optimizer_steps"] == 3
    # a fresh command refuses the folder (it holds a warm-up), leaving it as it was
    with pytest.raises(ConfigError, match="warmup/checkpoints already holds"):
        R.train(cfg)
    capfd.readouterr()
    # the command with resume=auto continues the warm-up from its checkpoint, then runs GRPO
    R.train(_cfg(part, "resume=auto"))
    assert "resume=auto: continuing from" in capfd.readouterr().err
    rows = _metric_rows(part / "warmup", "train/loss")
    assert [(v, s) for v, s, _ in rows if v == 1] == [(1, 3), (1, 4), (1, 5)]
    wf, wp = _summary(full / "warmup"), _summary(part / "warmup")
    assert wp["optimizer_steps"] == 6
    assert wp["weights_checksum"] == pytest.approx(wf["weights_checksum"], rel=1e-9)
    assert _summary(part)["init_checksum"] == pytest.approx(wp["weights_checksum"], rel=1e-12)
    a = {s: v for _, s, v in _metric_rows(full, "grpo/reward_mean")}
    b = {s: v for _, s, v in _metric_rows(part, "grpo/reward_mean")}
    assert a == b


def test_warmup_needs_data_with_solutions(tmp_path):
    cfg = compose_config(["+experiment=sft", "warmup.steps=2", f"out_dir={tmp_path / 'r'}", "run_name=r",
                    "trainer.progress_bar=none"])
    with pytest.raises(ConfigError, match="no worked solutions to warm up on"):
        R.train(cfg)
    assert not (tmp_path / "r" / "warmup" / "checkpoints").exists()


@pytest.mark.slow
def test_grpo_demo_reward_rises(tmp_path):
    """`python -m moxin.run +experiment=grpo` as a fresh clone runs it (9-15 minutes on 2 shared CPU cores): the SFT
    warm-up alone does not already reach 0.6 on the first rollout step; the mean train reward of the last ten rollout
    steps is at least 0.05 above the first ten's; and pass@1 on the reserved sums, which neither the warm-up nor RL
    trains on (grpo/heldout_reward_sampled, 16 samples a sum), ends at least 0.05 above where it started, and greedy
    pass@1 on them does not end lower (on an AMD EPYC Zen 4, seed 1234, the default: sampled +0.080, greedy 6/22 ->
    7/22; at fixed weights the sampled figure moved by up to 0.04: docs/performance.md). Another CPU type gives
    another curve for the same seed."""
    out = tmp_path / "demo"
    R.train(compose_config(["+experiment=grpo", f"out_dir={out}", "run_name=demo", "trainer.progress_bar=none"]))
    rewards = [v for _, _, v in sorted(_metric_rows(out, "grpo/reward_mean"), key=lambda r: r[1])]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    greedy = sorted(_metric_rows(out, "grpo/heldout_reward"), key=lambda r: r[1])
    held = sorted(_metric_rows(out, "grpo/heldout_reward_sampled"), key=lambda r: r[1])
    final = _metric_rows(out, "grpo/heldout_reward_sampled_final")
    print(f"grpo/reward_mean per rollout step: {[round(r, 3) for r in rewards]}; first ten {first:.3f}, last ten "
          f"{last:.3f}; held-out sampled {[round(v, 3) for *_, v in held + final]}, greedy "
          f"{[round(v, 3) for *_, v in greedy]} -> {_metric_rows(out, 'grpo/heldout_reward_final')[-1][2]:.3f}")
    assert held[0][1] == 0 and greedy[0][1] == 0 and len(final) == 1
    assert all(0.0 <= v <= 1.0 for *_, v in greedy + held + final)
    assert rewards[0] < 0.6, rewards
    assert last >= first + 0.05, (first, last, rewards)
    assert final[0][2] >= held[0][2] + 0.05, (held, final)
    assert _metric_rows(out, "grpo/heldout_reward_final")[-1][2] >= greedy[0][2], greedy


def test_warmup_micro_batch_defaults_to_each_process_share():
    """warmup.micro_batch_size null: batch_size / processes, so +experiment=grpo runs under FSDP on 2 processes
    (a fixed micro-batch equal to the batch was refused there: 8 is not a multiple of 8 x 2)."""
    from moxin.warmup import warmup_config

    one = warmup_config(compose_config(["+experiment=grpo", "warmup.steps=4", "out_dir=/tmp/x", "run_name=x"]))
    two = warmup_config(compose_config(["+experiment=grpo", "warmup.steps=4", "hardware=fsdp_cpu", "hardware.devices=2",
                                  "out_dir=/tmp/x", "run_name=x"]))
    b = compose_config(["+experiment=grpo"]).warmup.batch_size  # the demo's (16 today)
    assert (one.data.batch_size, one.data.micro_batch_size) == (b, b)
    assert (two.data.batch_size, two.data.micro_batch_size) == (b, b // 2)


def test_warmup_config_is_composed_from_the_config_tree_under_hydra_and_without(tmp_path):
    """Under `python -m moxin.run` the warm-up composes `stage=sft data=sft_sample` through the app's Hydra; called
    from Python it starts one on conf/: the same config either way, typed by the stage's schemas."""
    cfg = _cfg(tmp_path / "run")
    outside = warmup_config(cfg)
    with initialize_config_dir(R.CONF_DIR, version_base=None):
        inside = warmup_config(cfg)
    assert OmegaConf.to_container(inside) == OmegaConf.to_container(outside)
    assert outside.stage._target_ == "moxin.stages.sft.SFTStage" and not outside.stage.validate_at_start
    assert OmegaConf.get_type(outside.stage.optim).__name__ == "OptimConfigSchema"
    assert outside.data.max_length == cfg.warmup.max_length and outside.data.val is None

