"""GRPO's packed update (stage.grpo.pack): the packing itself (every sequence whole in one row, positions restarting
per sequence, padding only at row ends, every token placed once) and the update on random rollouts (varied prompt
and completion lengths, truncated and masked completions, filtered groups), whose losses, statistics and
gradients equal the padded update's for every aggregation, with KL on and off, on- and off-policy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moxin.config import Aggregation, GRPOConfig, OptimConfig
from moxin.data.packing import first_fit, pack_sequences, row_width_grid, unpack
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage

VOCAB = 128


def test_first_fit_places_every_item_once_within_capacity():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 40, (50,), generator=g).tolist()
    bins = first_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(50))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert len(bins) < 50 and len(bins) >= -(-sum(lengths) // 64)
    with pytest.raises(ValueError, match="pack_tokens"):
        first_fit([65], 64)


def test_packed_rows_hold_whole_sequences_restart_positions_and_pad_at_the_end():
    g = torch.Generator().manual_seed(1)
    n, L = 17, 30
    lengths = torch.randint(1, L + 1, (n,), generator=g)
    ids = torch.randint(1, 1000, (n, L), generator=g)
    mask = torch.rand(n, L, generator=g)
    bins = first_fit(lengths.tolist(), 45)
    p = pack_sequences({"ids": ids, "mask": mask}, lengths, bins, pad={"ids": 0, "mask": 0.0})
    R, T = p.rows["ids"].shape
    assert R == len(bins) and T <= 45 and p.index.shape == (n, int(lengths.max()))
    # every token once, in its own sequence's order; nothing past a sequence's end
    back = unpack(p.rows["ids"].float(), p.index)
    for i in range(n):
        m = int(lengths[i])
        assert torch.equal(back[i, :m].long(), ids[i, :m]) and not back[i, m:].any()
        assert torch.equal(unpack(p.rows["mask"], p.index)[i, :m], mask[i, :m])
    placed = p.index[p.index < R * T]
    assert placed.numel() == int(lengths.sum()) and placed.unique().numel() == placed.numel()
    for r, b in enumerate(bins):
        col = 0
        for i in b:  # whole, contiguous, in this row, positions 0.. again
            m = int(lengths[i])
            assert torch.equal(p.index[i, :m], r * T + col + torch.arange(m))
            assert torch.equal(p.rows["positions"][r, col:col + m], torch.arange(m))
            col += m
        # padding only after the last sequence, continuing its positions (never a new document)
        assert not p.rows["ids"][r, col:].any()
        last = int(lengths[b[-1]])
        assert torch.equal(p.rows["positions"][r, col:], torch.arange(last, last + T - col))
    wide = pack_sequences({"ids": ids}, lengths, bins, pad={"ids": 0}, width=T + 7)  # padded further, at the end
    assert wide.rows["ids"].shape == (R, T + 7) and torch.equal(unpack(wide.rows["ids"], wide.index), back.long())
    assert not wide.rows["ids"][:, T:].any()
    with pytest.raises(ValueError, match="exactly once"):
        pack_sequences({"ids": ids}, lengths, bins[1:], pad={"ids": 0})


def random_rollout(stage: GRPOStage, seed: int):
    """Prompts of 2-20 tokens, completions of 0..max_new_tokens (those at the limit truncated), rewards with some
    groups all equal (filtered)."""
    c = stage.cfg
    g = torch.Generator().manual_seed(seed)
    n_groups, G = 6, c.group_size
    prompts, tokens, finished = [], [], []
    for _ in range(n_groups):
        p = torch.randint(3, VOCAB, (int(torch.randint(2, 21, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            trunc = bool(torch.rand(1, generator=g) < 0.25)
            n = c.max_new_tokens if trunc else int(torch.randint(0, c.max_new_tokens, (1,), generator=g))
            prompts.append(p)
            tokens.append(torch.randint(3, VOCAB, (n,), generator=g).tolist())
            finished.append(not trunc)
    rewards = (torch.rand(n_groups * G, generator=g) < 0.5).float()
    rewards[:G] = 1.0  # a zero-std group: left out of the update
    return stage.build_rollout(prompts, tokens, finished, rewards)


def run_update(pack: bool, seed: int, **grpo):
    """`_update` outside a trainer (SGD, no clipping): its logs, the gradients of every optimizer step and the
    tokens its forwards read."""
    cfg = dict(group_size=4, max_new_tokens=24, micro_batch_size=3, mask_truncated=True, temperature=0.7) | grpo
    torch.manual_seed(0)
    stage = GRPOStage(load_preset("tiny", vocab_size=VOCAB, attn_backend="sdpa"),
                      optim=OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0),
                      grpo=GRPOConfig(pack=pack, **cfg), seed=3)
    stage.configure_model()
    params = list(stage.model.parameters())
    sgd = torch.optim.SGD(params, lr=0.05)
    grads = []

    def step():
        grads.append([p.grad.clone() for p in params])
        sgd.step()

    stage.optimizers = lambda: SimpleNamespace(zero_grad=sgd.zero_grad, step=step)
    stage.lr_schedulers = lambda: SimpleNamespace(step=lambda: None)
    stage.manual_backward = lambda loss: loss.backward()
    stage.optim_step = SimpleNamespace(clip=lambda parameters, global_step: None)
    logs = stage._update(random_rollout(stage, seed), step=0)
    return logs, grads, stage.last_step_tokens_processed


@pytest.mark.parametrize("aggregation", list(Aggregation))
@pytest.mark.parametrize("kl_coef", [0.0, 0.1])
@pytest.mark.parametrize("epochs_minibatches", [(1, 1), (2, 2)], ids=["on_policy", "off_policy"])
def test_packed_update_equals_padded_update(aggregation, kl_coef, epochs_minibatches):
    """Packed rows of at most 40 tokens (several sequences a row, several rows a micro-batch) against one padded
    row per sequence: same logs and gradients (fp32, 1e-6), fewer tokens through the model."""
    ppo_epochs, num_minibatches = epochs_minibatches
    kw = dict(aggregation=aggregation, kl_coef=kl_coef, ppo_epochs=ppo_epochs, num_minibatches=num_minibatches,
              pack_tokens=40, constant_norm=None)
    for seed in (0, 1):
        logs_pad, grads_pad, tok_pad = run_update(False, seed, **kw)
        logs_pack, grads_pack, tok_pack = run_update(True, seed, **kw)
        assert logs_pad["grpo/skipped_update"] == 0.0 and logs_pad["grpo/loss_tokens"] > 0
        assert logs_pack.keys() == logs_pad.keys()
        for k, v in logs_pad.items():
            assert logs_pack[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        assert len(grads_pack) == len(grads_pad) == ppo_epochs * num_minibatches
        for gs_pack, gs_pad in zip(grads_pack, grads_pad):
            for a, b in zip(gs_pack, gs_pad):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert tok_pack < tok_pad
        if kl_coef:
            assert logs_pack["grpo/kl"] > 0 or ppo_epochs == 1


def test_row_width_grid_rounds_up_by_under_a_quarter():
    assert [row_width_grid(n) for n in (1, 128, 129, 512, 513, 4096, 4097, 5888, 6145, 8192)] == \
        [128, 128, 256, 512, 640, 4096, 5120, 6144, 7168, 8192]
    for n in range(1, 70_000, 37):
        w = row_width_grid(n)
        assert w >= n and w % 128 == 0 and (w - n) * 4 < max(n, 512)


def test_gpu_packed_rows_take_one_width_and_equal_the_padded_update(monkeypatch):
    """On a GPU (`bucket`, forced here) every packed row of every micro-batch is as wide as the grid's width at or
    above the rows' capacity, whatever the rollout (one compiled shape), and the update still equals the padded
    one: logs and gradients."""
    plan, widths = GRPOStage._plan, set()

    def gpu_plan(self, seqs, host, dev, bucket=None):
        out = plan(self, seqs, host, dev, bucket=True)
        if self.cfg.pack:
            widths.update(int(mc.ids.shape[1]) for mc in out)
        return out

    monkeypatch.setattr(GRPOStage, "_plan", gpu_plan)
    for seed in (0, 1, 2):
        logs_pack, grads_pack, _ = run_update(True, seed, pack_tokens=40)
        logs_pad, grads_pad, _ = run_update(False, seed, pack_tokens=40)
        for k, v in logs_pad.items():
            assert logs_pack[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
        for a, b in zip(grads_pack[0], grads_pad[0]):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert widths == {row_width_grid(40)}, widths


@pytest.mark.skipif(not hasattr(GRPOConfig(), "entropy_coef"), reason="the entropy bonus (stage.grpo.entropy_coef) "
                    "is not in this tree")
@pytest.mark.parametrize("aggregation,kl_coef,epochs_minibatches",
                         [(Aggregation.TOKEN, 0.0, (1, 1)), (Aggregation.SEQUENCE, 0.1, (2, 2))])
def test_packed_update_with_the_entropy_bonus_equals_padded(aggregation, kl_coef, epochs_minibatches):
    """With the entropy bonus in the loss, its per-token entropies are gathered back like the log-probs: same logs
    and gradients as the padded update."""
    ppo_epochs, num_minibatches = epochs_minibatches
    kw = dict(aggregation=aggregation, kl_coef=kl_coef, ppo_epochs=ppo_epochs, num_minibatches=num_minibatches,
              pack_tokens=40, entropy_coef=0.01)
    logs_pad, grads_pad, _ = run_update(False, 0, **kw)
    logs_pack, grads_pack, _ = run_update(True, 0, **kw)
    for k, v in logs_pad.items():
        assert logs_pack[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
    for gs_pack, gs_pad in zip(grads_pack, grads_pad, strict=True):
        for a, b in zip(gs_pack, gs_pad):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
