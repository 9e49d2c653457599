"""Each stage's wiring against a plain reference: the gradients an optimizer step takes equal those of the stage's
loss written out by hand over the WHOLE step (tests/helpers/wiring_reference.py: full logits, the papers'
formulas, one division by the step's global count), whether the step's rows come in one micro-batch or in many
of unequal token counts. Gradient clipping is off and the gradients are compared directly, so a per-micro-batch
mean, a missing normaliser, chosen and rejected swapped or a dropped label smoothing all fail here (Adam and
clipping would hide a constant factor in the weights). The 1- vs 2-process forms are in tests/test_distributed.py.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from moxin.config import GRPOConfig
from moxin.model import Transformer
from moxin.stages import PretrainStage
from moxin.stages.dpo import DPOStage
from moxin.stages.grpo import GRPOStage
from moxin.stages.sft import SFTStage
from moxin.tokenizer import load_tokenizer
from tests.helpers import wiring_reference as ref
from tests.helpers.wiring_inputs import CFG, T, dpo_pairs, optim


def fit(stage, micro_batches: list[list[int]], items: list, max_steps: int = 1) -> list[dict]:
    """Train `stage` for one step of `items` taken as the given micro-batches (index lists; accumulation over all
    of them), or, with manual optimisation (GRPO), for one training step of up to `max_steps` optimizer steps;
    the gradients of every optimizer step."""
    rec = ref.GradRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=len(micro_batches),
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[rec])
    trainer.fit(stage, DataLoader(items, batch_sampler=micro_batches))
    return rec.grads


def logged_loss(stage) -> float:
    """The train/loss the stage logged for its (last) step."""
    return float(stage.trainer.callback_metrics["train/loss"])


def start_copy(stage) -> Transformer:
    """A plain model holding the stage's starting weights (the stage builds its own first)."""
    stage.configure_model()
    model = Transformer(stage.model_cfg)
    model.load_state_dict(stage.model.state_dict())
    return model


# ---------------------------------------------------------------- pretraining / SFT


def lm_rows(n: int = 6) -> list[dict]:
    """Rows of two packed documents (positions restart) whose target counts differ a lot (1 to 15)."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        ids = torch.randint(0, CFG.vocab_size, (T + 1,), generator=g)
        labels = ids[1:].clone()
        labels[[1, 14, 15, 2, 9, 4][i % 6] + 1:] = -100
        cut = 3 + i
        rows.append({"input_ids": ids[:-1], "labels": labels,
                     "positions": torch.cat([torch.arange(cut), torch.arange(T - cut)])})
    return rows


@pytest.mark.parametrize("stage_cls", [PretrainStage, SFTStage])
def test_lm_step_gradients_are_the_whole_steps_token_mean_in_any_micro_batching(stage_cls):
    """Pretraining and SFT: one micro-batch of 6 rows, or micro-batches of 1, 3 and 2 rows (1 to 15 targets a
    row), give the gradient of (sum of every target token's cross-entropy) / (targets of the step), and log it and
    its norm; with clipping at half that norm, the gradient is the reference's halved."""
    rows = lm_rows()
    kw = {"validate_at_start": False} if stage_cls is SFTStage else {}
    torch.manual_seed(0)
    model = start_copy(stage_cls(CFG, optim(), total_steps=1, **kw))
    loss = ref.lm_loss(model, rows)
    want = ref.reference_grads(model, loss)
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in want.values()])))
    for name, layout, clip in (("one micro-batch", [[0, 1, 2, 3, 4, 5]], None),
                               ("three micro-batches", [[0], [1, 2, 3], [4, 5]], None),
                               ("three micro-batches, clipped", [[0], [1, 2, 3], [4, 5]], norm / 2)):
        torch.manual_seed(0)
        stage = stage_cls(CFG, optim(grad_clip=clip), total_steps=1, **kw)
        got = fit(stage, layout, rows)[0]
        ref.assert_grads_close(got, {k: v / 2 for k, v in want.items()} if clip else want, name)
        assert logged_loss(stage) == pytest.approx(float(loss), rel=1e-5), name
        assert float(stage.trainer.callback_metrics["train/grad_norm"]) == pytest.approx(norm, rel=1e-4), name


# ---------------------------------------------------------------- DPO family


def dpo_stage(loss_type: str, **kw) -> DPOStage:
    torch.manual_seed(0)
    kw = {"beta": 0.5, "label_smoothing": 0.2, "validate_at_start": False, "total_steps": 1,
          "reference": "none" if loss_type == "simpo" else "frozen"} | kw
    stage = DPOStage(CFG, optim(), loss_type=loss_type, **kw)
    stage.configure_model()
    if stage.ref_model is not None:
        # a reference apart from the starting policy: the log-ratios (and so the loss's slope) differ per pair and
        # are not symmetric in chosen and rejected, as after an SFT stage
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in stage.ref_model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return stage


@pytest.mark.parametrize("loss_type,extra", [("dpo", {}), ("dpo_norm", {"sft_weight": 0.5}),
                                             ("ipo", {"label_smoothing": 0.0}), ("simpo", {})])
def test_dpo_step_gradients_are_the_whole_steps_pair_mean_in_any_micro_batching(loss_type, extra):
    """DPO, dpo_norm (+ the SFT term), IPO and SimPO with cDPO label smoothing 0.2 (IPO takes none): one
    micro-batch of 5 pairs, or micro-batches of 1, 3 and 1 pairs, give the gradient of the mean over the step's
    pairs of the loss written out from the papers, with chosen as chosen, and log that loss."""
    pairs = dpo_pairs()
    grads = {}
    for name, layout in (("one", [[0, 1, 2, 3, 4]]), ("many", [[0], [1, 2, 3], [4]])):
        stage = dpo_stage(loss_type, **extra)
        policy, reference = start_copy(stage), stage.ref_model
        grads[name] = fit(stage, layout, pairs)[0]
    kw = {k: getattr(stage, k) for k in ("beta", "label_smoothing", "simpo_gamma", "sft_weight")}
    loss = ref.dpo_loss(policy, reference, pairs, loss_type, **kw)
    want = ref.reference_grads(policy, loss)
    ref.assert_grads_close(grads["one"], want, f"{loss_type}: one micro-batch")
    ref.assert_grads_close(grads["many"], want, f"{loss_type}: three micro-batches")
    assert logged_loss(stage) == pytest.approx(float(loss), rel=1e-5)


# ---------------------------------------------------------------- GRPO


def grpo_rollout(stage: GRPOStage):
    """A fixed rollout (no generation): 3 prompts x 4 completions of 1 to 8 tokens, one cut at the budget, one
    group whose rewards are all equal (filtered), rewards that vary in the others."""
    g = torch.Generator().manual_seed(3)
    prompts, tokens, finished = [], [], []
    for p, lengths in enumerate(([1, 4, 8, 2], [5, 8, 3, 6], [2, 8, 7, 1])):
        prompt = torch.randint(3, CFG.vocab_size, (3 + p,), generator=g).tolist()
        for n in lengths:
            prompts.append(prompt)
            tokens.append(torch.randint(3, CFG.vocab_size, (n,), generator=g).tolist())
            finished.append(n < 8)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.25])
    ro = stage.build_rollout(prompts, tokens, finished, rewards)
    ro.stats.update({"gen_tokens": sum(map(len, tokens)), "gen_s": 0.0, "score_s": 0.0, "score_busy_s": 0.0,
                     "verifier_errors": 0, "verifier_timeouts": 0, "no_answer": 0})
    return ro


def grpo_stage(**grpo) -> GRPOStage:
    torch.manual_seed(0)
    cfg = {"group_size": 4, "temperature": 0.7, "max_new_tokens": 8, "mask_truncated": True, "verifier": "exact",
           "verifier_workers": 0, "log_completions": 0} | grpo
    stage = GRPOStage(CFG, optim=optim(weight_decay=0.0), grpo=GRPOConfig(**cfg),
                      tokenizer=load_tokenizer("mistral"), seed=5,
                      total_steps=cfg.get("ppo_epochs", 1))
    ro = grpo_rollout(stage)
    stage.rollout = lambda batch, step: ro  # the update alone: the rollout is given
    return stage


@pytest.mark.parametrize("aggregation,extra", [("token", {}), ("sequence", {}), ("constant", {}),
                                               ("token", {"kl_coef": 0.3, "kl_estimator": "k1"}),
                                               ("token", {"entropy_coef": 0.05}),
                                               ("sequence", {"entropy_coef": 0.05, "kl_coef": 0.3,
                                                             "kl_estimator": "k1"})])
def test_grpo_update_gradients_are_the_whole_minibatchs_loss_in_any_micro_batching(aggregation, extra):
    """GRPO's on-policy update: the kept sequences in one micro-batch or in micro-batches of 3 (1 to 8 completion
    tokens each, a truncated one masked, a zero-std group filtered) give the gradient of the minibatch's loss
    written out by hand: -advantage x logp (+ KL) summed over masked tokens, divided by the minibatch's masked
    tokens, sequences or the constant max_new_tokens x sequences (minus the entropy bonus, aggregated alike);
    and log that loss."""
    grads = {}
    for micro in (12, 3):
        stage = grpo_stage(aggregation=aggregation, micro_batch_size=micro, **extra)
        policy = start_copy(stage)
        grads[micro] = fit(stage, [[0]], [{"prompt": "unused"}])[0]
    ro = stage.rollout(None, 0)
    k = ro.keep
    assert 0 < int(k.sum()) < len(k) and float(ro.mask[k].sum(1).min()) == 0  # filtered and masked rows exist
    reference = copy.deepcopy(policy).requires_grad_(False)
    loss = ref.grpo_loss(policy, reference, ro.input_ids[k], ro.positions[k], ro.labels[k], ro.mask[k],
                         ro.advantages[k], aggregation, stage.cfg.temperature,
                         constant=stage.cfg.max_new_tokens * int(k.sum()), kl_coef=stage.cfg.kl_coef,
                         entropy_coef=stage.cfg.entropy_coef)
    want = ref.reference_grads(policy, loss)
    ref.assert_grads_close(grads[12], want, f"{aggregation}: one micro-batch")
    ref.assert_grads_close(grads[3], want, f"{aggregation}: micro-batches of 3")
    assert logged_loss(stage) == pytest.approx(float(loss), rel=1e-5)


def test_grpo_off_policy_epochs_give_the_same_gradients_in_any_micro_batching():
    """Two PPO epochs over one minibatch: the first step's gradient is the on-policy reference's (the old
    log-probs equal the policy's), and the second step's, after one Adam update, is the same for one micro-batch
    and for micro-batches of 3."""
    runs = {}
    for micro in (12, 3):
        stage = grpo_stage(micro_batch_size=micro, ppo_epochs=2)
        policy = start_copy(stage)
        runs[micro] = fit(stage, [[0]], [{"prompt": "unused"}], max_steps=2)
    ro = stage.rollout(None, 0)
    k = ro.keep
    loss = ref.grpo_loss(policy, None, ro.input_ids[k], ro.positions[k], ro.labels[k], ro.mask[k], ro.advantages[k],
                         "token", stage.cfg.temperature)
    want = ref.reference_grads(policy, loss)
    for micro, grads in runs.items():
        assert len(grads) == 2
        ref.assert_grads_close(grads[0], want, f"first epoch, micro-batches of {micro}")
    ref.assert_grads_close(runs[3][1], runs[12][1], "second epoch: micro-batches of 3 vs one")
    assert any(not torch.equal(runs[12][1][n], runs[12][0][n]) for n in runs[12][0])  # the policy moved
