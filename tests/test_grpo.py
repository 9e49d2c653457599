"""GRPO stage: a step on a tiny model updates the weights and logs the metrics; KL is exactly zero against an
identical reference (through the stage's own code path); generation is reproducible with a seed; zero-std groups
are filtered and truncated completions masked in the tensors the stage builds; verifier errors and timeouts are
counted; `+experiment=grpo` composes and a 2-step run works with tiny overrides.

Advantages and each loss variant against hand-computed values live in tests/test_losses.py; verifier cases in
tests/test_rewards.py (not repeated here)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest

import torch

import moxin.rewards as rewards_pkg
from moxin.config import GRPOConfig, OptimConfig
from moxin.data.sample import sample_path
from moxin.paths import conf_dir
from moxin.presets import load_preset
from moxin.rewards import RewardResult
from moxin.stages.grpo import GRPOStage
from tests.helpers.tiny_grpo import ParityVerifier, arithmetic_prompts, fit_one_epoch
from tests.helpers.tiny_overrides import tiny_model

CONF = str(conf_dir())


class BrokenVerifier:
    def __call__(self, completion: str, reference: str) -> RewardResult:
        if len(completion) % 3 == 0:
            raise RuntimeError("verifier bug")
        return RewardResult(float(len(completion) % 2), "wrong")


@pytest.fixture(autouse=True)
def _verifiers(monkeypatch):
    monkeypatch.setitem(rewards_pkg.VERIFIERS, "parity", ParityVerifier)
    monkeypatch.setitem(rewards_pkg.VERIFIERS, "broken", BrokenVerifier)


def model_cfg():
    # the tiny shape with the real 32000-entry vocabulary (prompts are rendered with the Mistral tokenizer)
    return load_preset("tiny", vocab_size=32000, attn_backend="sdpa")


def make_stage(tok, **grpo) -> GRPOStage:
    kw = dict(group_size=4, temperature=1.0, max_new_tokens=6, verifier="parity", verifier_workers=0,
              micro_batch_size=4, log_completions=0, mask_truncated=False)  # random models never stop
    kw.update(grpo)
    torch.manual_seed(0)
    return GRPOStage(model_cfg(), optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                     grpo=GRPOConfig(**kw), tokenizer=tok, seed=3)


METRICS = ["grpo/reward_mean", "grpo/reward_std", "grpo/frac_zero_std", "grpo/completion_len_mean",
           "grpo/truncated_frac", "grpo/clip_frac", "grpo/kl", "grpo/entropy", "grpo/gen_tokens_per_s",
           "grpo/verifier_errors", "grpo/verifier_timeouts", "train/loss", "train/lr"]


def test_step_changes_weights_and_logs_metrics(tok, tmp_path):
    stage = make_stage(tok, ppo_epochs=2, num_minibatches=2)
    dm = arithmetic_prompts(tok, steps=1)
    stage.configure_model()
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    trainer = fit_one_epoch(stage, dm, tmp_path)
    h = stage.history[0]
    for k in METRICS:
        assert k in h and math.isfinite(h[k]), k
        assert k in trainer.callback_metrics, k
    assert 0 < h["grpo/reward_mean"] < 1 and h["grpo/frac_zero_std"] < 1
    assert trainer.global_step == 4  # ppo_epochs x num_minibatches optimizer steps per rollout
    changed = [k for k, v in stage.model.state_dict().items() if not torch.equal(v, before[k])]
    assert "output.weight" in changed and len(changed) > len(before) // 2


def test_kl_is_exactly_zero_when_reference_equals_policy(tok, tmp_path):
    for est in ("k1", "k2", "low_var_kl"):
        stage = make_stage(tok, kl_coef=0.5, kl_estimator=est)
        fit_one_epoch(stage, arithmetic_prompts(tok, steps=1), tmp_path)
        assert stage.ref_model is not None
        assert stage.history[0]["grpo/kl"] == 0.0, est
        # after the update the policy moved away from the reference: the next step sees KL > 0
    stage = make_stage(tok, kl_coef=0.5, kl_estimator="low_var_kl")
    fit_one_epoch(stage, arithmetic_prompts(tok, steps=2), tmp_path)
    assert stage.history[0]["grpo/kl"] == 0.0 and stage.history[1]["grpo/kl"] > 0.0


def test_generation_is_reproducible_with_a_seed(tok):
    dm = arithmetic_prompts(tok, steps=2)
    batch = dm.rank_batches(0)[0]
    a, b = make_stage(tok), make_stage(tok)
    for s in (a, b):
        s.configure_model()
    b.model.load_state_dict(a.model.state_dict())
    ra, rb = a.rollout(batch, step=5), b.rollout(batch, step=5)
    assert ra.completions == rb.completions
    assert torch.equal(ra.input_ids, rb.input_ids) and torch.equal(ra.rewards, rb.rewards)
    rc = a.rollout(batch, step=6)  # another step draws other samples
    assert rc.completions != ra.completions


def test_masks_filter_zero_std_groups_and_truncated(tok):
    stage = make_stage(tok, group_size=2, mask_truncated=True, filter_zero_std=True)
    prompts = [[1, 10, 11], [1, 10, 11], [1, 20], [1, 20]]
    tokens = [[5, 6, 2], [7, 8, 9], [5, 2], [6, 2]]  # 2 = eos; sequence 1 is truncated
    finished = [True, False, True, True]
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group 1 is all 1: zero std
    ro = stage.build_rollout(prompts, tokens, finished, rewards)
    assert ro.zero_std.tolist() == [False, True]
    assert ro.keep.tolist() == [True, True, False, False]
    assert ro.truncated.tolist() == [False, True, False, False]
    # labels: completion tokens shifted under the prompt's last token onwards
    assert ro.labels[0].tolist() == [-100, -100, 5, 6, 2, -100]
    assert ro.input_ids[0].tolist() == [1, 10, 11, 5, 6, 2]
    assert ro.mask[0].tolist() == [0, 0, 1, 1, 1, 0]
    assert ro.mask[1].sum() == 0  # truncated: masked
    assert ro.mask[2].sum() == 0 and ro.mask[3].sum() == 0  # zero-std group: filtered
    assert ro.advantages[:2].tolist() == pytest.approx([1 / math.sqrt(2), -1 / math.sqrt(2)], rel=1e-4)
    # every masked position carries a label
    assert bool(((ro.mask > 0) <= (ro.labels != -100)).all())
    # switched off: everything with a completion token counts
    stage2 = make_stage(tok, group_size=2, mask_truncated=False, filter_zero_std=False)
    ro2 = stage2.build_rollout(prompts, tokens, finished, rewards)
    assert ro2.mask.sum(1).tolist() == [3, 3, 2, 2]
    assert ro2.keep.all()


def test_verifier_errors_and_timeouts_are_counted(tok, tmp_path, monkeypatch):
    """A rollout counts the completions its verifier raised on (and no timeout where none happened); a step whose
    scoring timed out on every 4th completion records those timeouts."""
    stage = make_stage(tok, verifier="broken")
    stage.configure_model()
    ro = stage.rollout(arithmetic_prompts(tok).rank_batches(0)[0], step=0)
    n_err = sum(1 for c in ro.completions if len(c) % 3 == 0)  # where BrokenVerifier raises
    assert n_err >= 1 and ro.stats["verifier_errors"] == n_err and ro.stats["verifier_timeouts"] == 0

    real = rewards_pkg.score_batch

    def slow(verifier, completions, references, timeout_s=10.0, max_workers=None):
        results, stats = real(verifier, completions, references, timeout_s, max_workers)
        results = [RewardResult(0.0, "timeout", error="timeout") if i % 4 == 0 else r for i, r in enumerate(results)]
        stats = dict(stats, timeouts=sum(1 for i in range(len(results)) if i % 4 == 0))
        return results, stats

    monkeypatch.setattr(rewards_pkg, "score_batch", slow)
    stage = make_stage(tok, verifier="parity")
    fit_one_epoch(stage, arithmetic_prompts(tok, steps=1), tmp_path)
    assert stage.history[0]["grpo/verifier_timeouts"] == 2  # 8 completions, every 4th timed out


def test_broken_verifier_errors_are_logged(tok, tmp_path, monkeypatch):
    """Each step's count of completions the verifier raised on reaches the logger (metrics.csv) as
    grpo/verifier_errors."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    stage = make_stage(tok, verifier="broken")
    rollouts, real = [], stage.rollout
    monkeypatch.setattr(stage, "rollout", lambda *a, **kw: rollouts.append(real(*a, **kw)) or rollouts[-1])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=CSVLogger(tmp_path, name="csv"),
                        log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=arithmetic_prompts(tok, steps=2))
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()))
    logged = [float(r["grpo/verifier_errors"]) for r in rows if r.get("grpo/verifier_errors")]
    raised = [sum(1 for c in ro.completions if len(c) % 3 == 0) for ro in rollouts]  # where BrokenVerifier raises
    assert len(raised) == 2 and sum(raised) >= 1 and logged == raised, (logged, raised)


def test_experiment_composes_and_smoke_runs(tmp_path):
    from hydra import compose, initialize_config_dir

    from moxin.run import train

    with initialize_config_dir(config_dir=CONF, version_base=None):
        big = compose(config_name="config", overrides=["+experiment=grpo_moxin_reasoning"])
        assert big.stage.grpo.group_size == 8 and big.data.prompts_per_step == 64
        assert big.stage.grpo.kl_coef == 0.001 and big.stage.grpo.kl_estimator == "low_var_kl"
        assert big.stage.grpo.temperature == 0.6 and big.stage.grpo.max_new_tokens == 16384
        assert big.stage.optim.lr == 1e-6 and big.stage.grpo.verifier == "deepscaler"
        assert big.stage.grpo.entropy_coef == 0.001 and big.data.num_passes == 30
        assert big.stage.grpo.val_source == "HuggingFaceH4/aime_2024" and big.stage.grpo.val_every_n_steps == 20
        assert big.stage.grpo.n_val == 8 and big.stage.grpo.val_temperature == 0.6 and big.stage.grpo.val_before_train
        cfg = compose(config_name="config", overrides=[
            "+experiment=grpo", f"out_dir={tmp_path}/run", "run_name=smoke", "trainer.progress_bar=none",
            *tiny_model(n_layers=1, sliding_window=None), "data.steps=2", "data.prompts_per_step=2", "stage.grpo.group_size=2",
            "stage.grpo.max_new_tokens=4", "warmup.steps=1", "warmup.batch_size=2", "warmup.micro_batch_size=2",
            "stage.grpo.verifier_workers=0",
            "logger=csv",
            # the recipe's entropy bonus and validation, through the config: n samples of a file's problems
            "stage.grpo.entropy_coef=0.001", f"stage.grpo.val_source={sample_path('eval_math')}",
            "stage.grpo.val_prompts=2", "stage.grpo.n_val=2", "stage.grpo.val_every_n_steps=1",
        ])
    info = train(cfg)
    assert "grpo/reward_mean" in info["metrics"]
    assert "val/reward_mean" in info["metrics"] and "val/reward_mean_final" in info["metrics"]
    assert (tmp_path / "run" / "summary.json").exists() and (tmp_path / "run" / "warmup" / "summary.json").exists()


def test_rollout_decode_option_is_checked_and_auto_is_eager_on_cpu(tok, monkeypatch):
    """stage.grpo.decode names one of generate's decode paths; a bad value is refused naming the key; auto decodes
    eagerly on a CPU (compiled on a GPU: tests/test_gpu.py runs that path)."""
    from moxin.config import DecodePath
    import moxin.stages.grpo as grpo_mod

    with pytest.raises(ValueError, match="decode='fast': choose one of auto, eager, static, graph, compiled"):
        GRPOConfig(decode="fast")
    assert GRPOConfig(decode="compiled").decode is DecodePath.COMPILED
    seen, real = [], grpo_mod.generate
    monkeypatch.setattr(grpo_mod, "generate", lambda *a, **kw: (seen.append(kw["decode"]), real(*a, **kw))[1])
    for choice, used in (("auto", DecodePath.EAGER), ("static", DecodePath.STATIC)):
        stage = make_stage(tok, decode=choice)
        stage.configure_model()
        stage.rollout(arithmetic_prompts(tok).rank_batches(0)[0], step=0)
        assert seen[-1] == used


def test_scoring_during_generation_gives_the_rewards_of_scoring_after(tok, monkeypatch):
    """Rows are scored in a thread as generate hands them over; completions and rewards equal decoding and scoring
    the returned tokens afterwards, row for row, also when generation runs in several calls (gen_batch_size).
    On a CPU it is off by default (generation would share its cores with the verifier): generate gets no callback."""
    import moxin.stages.grpo as grpo_mod
    from moxin.rewards import get_verifier, score_batch

    outs, real = [], grpo_mod.generate
    monkeypatch.setattr(grpo_mod, "generate", lambda *a, **kw: outs.append(real(*a, **kw)) or outs[-1])
    for gen_batch_size in (None, 3):
        outs.clear()
        stage = make_stage(tok, gen_batch_size=gen_batch_size, max_new_tokens=10, score_during_generation=True)
        stage.configure_model()
        batch = arithmetic_prompts(tok, prompts_per_step=2).rank_batches(0)[0]
        ro = stage.rollout(batch, step=1)
        tokens = [t for o in outs for t in o.tokens]
        assert len(outs) == (1 if gen_batch_size is None else 3)
        texts = [tok.decode(t) for t in tokens]
        assert ro.completions == texts
        answers = [r["answer"] for r in batch for _ in range(stage.cfg.group_size)]
        ref, _ = score_batch(get_verifier("parity"), texts, answers, max_workers=0)
        assert ro.rewards.tolist() == [r.score for r in ref] and 0 < ro.rewards.sum() < len(ref)  # both outcomes
        assert ro.stats["score_busy_s"] >= 0 and ro.stats["score_s"] >= 0
    kws = []
    monkeypatch.setattr(grpo_mod, "generate", lambda *a, **kw: kws.append(kw) or real(*a, **kw))
    stage = make_stage(tok)
    stage.configure_model()
    stage.rollout(arithmetic_prompts(tok, prompts_per_step=2).rank_batches(0)[0], step=1)
    assert kws and all(kw["on_finished"] is None for kw in kws)


def test_rollouts_decode_from_a_16bit_copy_refreshed_every_step(tok, monkeypatch):
    """rollout_copy: generate gets a bf16 model (autocast off) whose weights are the policy's rounded to bf16, the
    same object every step, refreshed after the policy changed; the copy is no submodule (not in the checkpoint).
    Without autocast (a CPU run in fp32) the default decodes with the policy itself."""
    import moxin.stages.grpo as grpo_mod

    seen, real = [], grpo_mod.generate
    monkeypatch.setattr(grpo_mod, "generate",
                        lambda m, *a, **kw: (seen.append((m, torch.is_autocast_enabled("cpu"))), real(m, *a, **kw))[1])
    batch = arithmetic_prompts(tok).rank_batches(0)[0]
    stage = make_stage(tok, rollout_copy=True)
    stage.configure_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stage.rollout(batch, step=0)
        m, amp = seen[-1]
        assert m is not stage.model and not amp and {p.dtype for p in m.parameters()} == {torch.bfloat16}
        for (n, p), (n2, q) in zip(m.named_parameters(), stage.model.named_parameters()):
            assert n == n2 and torch.equal(p, q.detach().bfloat16()), n
        assert all(b.attention._views_fused() and b.feed_forward._views_fused() for b in m.layers)  # fused products
        with torch.no_grad():
            stage.model.output.weight.mul_(2.0)  # an update
            stage.model.layers[0].attention.wk.weight.mul_(2.0)
        stage.rollout(batch, step=1)
        assert seen[-1][0] is m and torch.equal(m.output.weight, stage.model.output.weight.detach().bfloat16())
        wq, wk = stage.model.layers[0].attention.wq.weight, stage.model.layers[0].attention.wk.weight
        fused = m.layers[0].attention.fused_weight  # the product rollouts run reads the refreshed weights
        assert torch.equal(fused[wq.shape[0]:wq.shape[0] + wk.shape[0]], wk.detach().bfloat16())
    assert not any(k.startswith("_rollout") for k in stage.state_dict())
    plain = make_stage(tok)
    plain.configure_model()
    plain.rollout(batch, step=0)
    assert seen[-1][0] is plain.model


def test_the_update_finds_its_rows_on_the_host_reads_nothing_in_its_passes_and_updates_alike(tok, tmp_path,
                                                                                            monkeypatch):
    """The update's forwards (old log-probs, policy with entropy, KL reference) take their rows' bounds, label and
    mask positions from the rollout's host tensors: those passes and their backward read no tensor value, and the
    weights and every logged number equal the update that finds them on the device (uneven micro-batches, two
    epochs of two minibatches, KL on)."""
    from moxin.stages import grpo
    from tests.helpers.host_reads import HostReads

    runs = {}
    for host in (True, False):
        stage = make_stage(tok, ppo_epochs=2, num_minibatches=2, kl_coef=0.1, micro_batch_size=3)
        reads = []

        def recorded(fn):
            def call(*a, **k):
                with HostReads() as seen:
                    out = fn(*a, **k)
                reads.extend(seen.reads)
                return out
            return call

        stage._logp = recorded(stage._logp)
        stage.manual_backward = recorded(stage.manual_backward)
        if not host:
            monkeypatch.setattr(stage, "_host_rows", lambda *a, **k: grpo._HostRows())
        fit_one_epoch(stage, arithmetic_prompts(tok, steps=1, prompts_per_step=3), tmp_path)
        runs[host] = (stage.history, stage.model.state_dict(), reads)
    (h_host, w_host, r_host), (h_dev, w_dev, r_dev) = runs[True], runs[False]
    assert r_host == [] and "aten::nonzero" in r_dev
    timing = {"grpo/step_s", "grpo/gen_s", "grpo/score_s", "grpo/update_s", "grpo/score_busy_s", "grpo/refresh_s",
              "grpo/gen_tokens_per_s"}
    assert [{k: v for k, v in h.items() if k not in timing} for h in h_host] == \
        [{k: v for k, v in h.items() if k not in timing} for h in h_dev]
    assert h_host[0]["grpo/kl"] > 0 and h_host[0]["grpo/entropy"] > 0  # the reference and entropy passes ran
    assert all(torch.equal(w_host[k], w_dev[k]) for k in w_host)
