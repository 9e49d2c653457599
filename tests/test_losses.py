"""Tests for moxin.losses: chunked CE / log-probs against plain PyTorch, DPO and GRPO against hand-computed numbers."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from moxin.losses import (
    completion_mask,
    dpo_loss,
    group_advantages,
    kl_penalty,
    policy_loss,
    sft_nll_per_token,
    token_cross_entropy,
    token_logprobs,
    zero_std_groups,
)
from tests.helpers.host_reads import HostReads


def _inputs(B=3, T=7, D=16, V=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(V, D, generator=g).mul(0.3).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, -2:] = -100  # padding
    return hidden, weight, labels


# ---------------------------------------------------------------- cross-entropy and log-probs


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 1000])
def test_token_cross_entropy_matches_plain_cross_entropy(chunk_size):
    hidden, weight, labels = _inputs()
    loss, n = token_cross_entropy(hidden, weight, labels, chunk_size=chunk_size)
    gh, gw = torch.autograd.grad(loss, (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.T).reshape(-1, w2.shape[0]), labels.reshape(-1), reduction="sum", ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h2, w2))

    assert n.item() == int((labels != -100).sum())
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


class _MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matrix product run while active (forward or backward)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.seen.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_backward_products_run_in_the_autocast_dtype():
    """Under bf16 autocast over fp32 hidden states and master weights (bf16-mixed), the backward's products run in
    bf16 as the forward's do (autocast is off in backward; they used to run in fp32), and the gradients equal the
    plain autocast path's: F.cross_entropy on bf16-product logits, differentiated by autograd."""
    hidden, weight, labels = _inputs(B=3, T=64, D=32, V=96, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = token_cross_entropy(hidden, weight, labels, chunk_size=40)
    with _MatmulDtypes() as rec:
        gh, gw = torch.autograd.grad(loss, (hidden, weight))
    assert len(rec.seen) >= 3 and all(d == (torch.bfloat16,) * len(d) for d in rec.seen), rec.seen
    assert gh.dtype == gw.dtype == torch.float32

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h2 @ w2.T
    ref = F.cross_entropy(logits.float().reshape(-1, w2.shape[0]), labels.reshape(-1), reduction="sum")
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(gw, rw, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1.0, 0.6])
def test_head_kernels_written_for_inductor_equal_the_eager_ones(dtype, t):
    """The one-pass forms that CUDA compiles compute what the eager forms compute (run eagerly here, on random
    logits of either dtype and with a temperature); tests/test_gpu.py holds the compiled ones to the eager ones."""
    from moxin.losses import _label_logp_lse, _label_logp_lse_fused, _logits_grad, _logits_grad_fused

    g = torch.Generator().manual_seed(7)
    logits = (torch.randn(37, 301, generator=g) * 4).to(dtype)
    labels = torch.randint(0, 301, (37,), generator=g)
    scale = torch.randn(37, generator=g)
    lp, lse = _label_logp_lse(logits, labels, t)
    lp2, lse2 = _label_logp_lse_fused(logits, labels, t)
    torch.testing.assert_close(lp2, lp, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(lse2, lse, rtol=1e-6, atol=1e-5)
    assert lp.dtype == lse.dtype == torch.float32
    ref = (F.one_hot(labels, 301).float() - torch.softmax(logits.float() / t, -1)) * scale[:, None]
    for fn in (_logits_grad, _logits_grad_fused):
        got = fn(logits.clone(), lse, labels, scale, t, dtype)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), ref.to(dtype).float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("need", ["both", "hidden"])
def test_kept_logit_gradients_equal_the_recomputed_ones(need, monkeypatch):
    """With 16-bit products the CUDA head keeps each chunk's (onehot - softmax) from the forward and its backward
    runs two products a chunk instead of three; driven here on the CPU under bf16 autocast: the log-probs and the
    gradients (per-row weights, a temperature, ragged chunks, a frozen weight) equal the recomputing path's, and
    under no_grad nothing is kept."""
    from moxin import losses as L

    hidden, weight, labels = _inputs(B=3, T=40, D=32, V=96, seed=11)
    up = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    res = {}
    for keep in (False, True):
        monkeypatch.setattr(L, "_keeps_logit_grads", lambda dev, dt, _k=keep: _k and dt == torch.bfloat16)
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_(need == "both")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = L.token_logprobs(h, w, labels, chunk_size=24, temperature=0.7)
        with _MatmulDtypes() as rec:
            grads = torch.autograd.grad((lp * up).sum(), (h, w) if need == "both" else (h,))
        res[keep] = (lp, *grads, len(rec.seen))
    n_chunks = -(-int((labels != -100).sum()) // 24)
    assert res[False][-1] == n_chunks * (3 if need == "both" else 2)
    assert res[True][-1] == n_chunks * (2 if need == "both" else 1)  # no recomputed logits
    # both against fp32 autograd on the bf16-rounded inputs: the kept path is no less precise than the recomputing
    h = hidden.detach().bfloat16().float().requires_grad_()
    w = weight.detach().bfloat16().float().requires_grad_(need == "both")
    valid = labels != -100
    ref = torch.log_softmax((h @ w.T) / 0.7, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    refs = (ref, *torch.autograd.grad((ref * up).sum(), (h, w) if need == "both" else (h,)))
    for kept, recomputed, r in zip(res[True][:-1], res[False][:-1], refs):
        torch.testing.assert_close(kept, r, rtol=2e-2, atol=2e-2)  # bf16 products, as the autocast test's bound
        err_kept, err_rec = (kept - r).abs().max(), (recomputed - r).abs().max()
        assert err_kept <= 1.5 * err_rec + 1e-5, (err_kept, err_rec)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), _MatmulDtypes():
        calls = []
        monkeypatch.setattr(L, "_forward_with_grad", lambda dev: calls.append(dev))
        L.token_logprobs(hidden, weight, labels, chunk_size=24)
    assert calls == []  # a reference model's pass keeps nothing


def test_kept_logit_gradients_are_bounded_in_memory(monkeypatch):
    """Past `KEEP_LOGIT_GRADS_MAX_BYTES` (R x V x 2 bytes for bf16) the head recomputes its logits in the backward,
    as the plain path does, so its memory stays one chunk's however many rows: three products a chunk, and the
    same values and gradients as the recomputing path; at the bound it still keeps."""
    from moxin import losses as L

    hidden, weight, labels = _inputs(B=3, T=40, D=32, V=96, seed=11)
    R, V = int((labels != -100).sum()), weight.shape[0]
    n_chunks = -(-R // 24)
    res = {}
    for name, keep, bound in (("recompute", False, 2**30), ("over", True, R * V * 2 - 1), ("at", True, R * V * 2)):
        monkeypatch.setattr(L, "_keeps_logit_grads", lambda dev, dt, _k=keep: _k and dt == torch.bfloat16)
        monkeypatch.setattr(L, "KEEP_LOGIT_GRADS_MAX_BYTES", bound)
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = L.token_logprobs(h, w, labels, chunk_size=24)
        with _MatmulDtypes() as rec:
            grads = torch.autograd.grad(lp.sum(), (h, w))
        res[name] = (lp, *grads, len(rec.seen))
    assert res["recompute"][-1] == res["over"][-1] == 3 * n_chunks and res["at"][-1] == 2 * n_chunks
    for a, b in zip(res["over"][:-1], res["recompute"][:-1]):
        assert torch.equal(a, b)


def test_cuda_head_kernels_are_built_in_any_order(monkeypatch):
    """A training step compiles the kept-gradient forward first; a later no-grad pass (validation, a reference
    model) must still get the plain forward and the backward kernels (a GPU run once failed here with KeyError).
    torch.compile only wraps here: nothing runs, so no GPU is needed."""
    from moxin import losses as L

    monkeypatch.setattr(L, "_compiled", {})
    cuda = torch.device("cuda")
    assert callable(L._forward_with_grad(cuda))
    fwd, bwd = L._head_kernels(cuda)
    assert callable(fwd) and callable(bwd) and set(L._compiled) == {"fwd_grad", "fwd", "bwd"}
    assert L._head_kernels(torch.device("cpu")) == (L._label_logp_lse, L._logits_grad)


def test_token_logprobs_with_temperature_matches_log_softmax_and_grads():
    hidden, weight, labels = _inputs(seed=1)
    t = 0.6
    lp = token_logprobs(hidden, weight, labels, chunk_size=3, temperature=t)
    upstream = torch.randn(lp.shape, generator=torch.Generator().manual_seed(2))
    gh, gw = torch.autograd.grad((lp * upstream).sum(), (hidden, weight))

    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp_all = torch.log_softmax((h2 @ w2.T) / t, dim=-1)
    valid = labels != -100
    ref = logp_all.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    rh, rw = torch.autograd.grad((ref * upstream).sum(), (h2, w2))

    assert lp.shape == labels.shape and lp.dtype == torch.float32
    assert torch.all(lp[~valid] == 0)
    torch.testing.assert_close(lp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh, rh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, rw, atol=1e-5, rtol=1e-5)


def test_frozen_weight_and_bf16_inputs():
    hidden, weight, labels = _inputs(seed=3)
    w = weight.detach()  # a frozen reference model's head: no weight gradient requested
    loss, _ = token_cross_entropy(hidden, w, labels, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, (hidden,))
    assert torch.isfinite(gh).all()

    hb = hidden.detach().bfloat16().requires_grad_()
    loss_bf16, _ = token_cross_entropy(hb, w.bfloat16(), labels, chunk_size=4)
    assert loss_bf16.dtype == torch.float32
    ref = F.cross_entropy((hb.float() @ w.bfloat16().float().T).reshape(-1, w.shape[0]), labels.reshape(-1),
                          reduction="sum", ignore_index=-100)
    torch.testing.assert_close(loss_bf16, ref, atol=1e-2, rtol=1e-3)
    loss_bf16.backward()
    assert hb.grad.dtype == torch.bfloat16


def test_all_labels_ignored_gives_zero_not_nan():
    hidden, weight, labels = _inputs()
    loss, n = token_cross_entropy(hidden, weight, torch.full_like(labels, -100))
    loss.backward()
    assert loss.item() == 0.0 and n.item() == 0
    assert torch.all(hidden.grad == 0)


def test_bad_label_and_shape_errors():
    hidden, weight, labels = _inputs(V=50)
    labels[1, 1] = 50
    with pytest.raises(ValueError, match="outside"):
        token_cross_entropy(hidden, weight, labels)
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        token_cross_entropy(hidden, weight, labels[:, :-1])


@pytest.mark.parametrize("seed", range(6))
def test_label_rows_from_the_host_give_the_same_loss_and_read_nothing(seed):
    """`LabelRows` built from the host's labels select the same rows and targets as the head's own `nonzero`:
    random masks (none ignored, some, all), bitwise the same loss and gradients; with them the head's forward and
    backward read no tensor value (without them they do). Wrong shape, device or ids are refused by name."""
    from moxin.losses import LabelRows

    g = torch.Generator().manual_seed(seed)
    hidden, weight, labels = _inputs(V=50)
    keep = [1.0, 0.5, 0.1, 0.0][seed % 4]
    labels = torch.where(torch.rand(labels.shape, generator=g) < keep, labels, torch.full_like(labels, -100))
    rows = LabelRows.from_labels(labels)
    assert rows.rows.numel() == int((labels != -100).sum())
    outs = []
    for lr in (None, rows):
        h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
        with HostReads() as seen:
            loss, n = token_cross_entropy(h, w, labels, chunk_size=5, label_rows=lr)
            loss.backward()
        outs.append((loss, n, h.grad, w.grad, seen.reads))
    for a, b in zip(outs[0][:4], outs[1][:4]):
        assert torch.equal(a, b)
    assert outs[1][4] == [] and (outs[0][4] != [] or keep == 0.0)
    with pytest.raises(ValueError, match=r"built for labels of shape \(3, 6\)"):
        token_cross_entropy(hidden, weight, labels, label_rows=LabelRows.from_labels(labels[:, :-1]))
    bad = labels.clone()
    bad[0, 0] = 50
    with pytest.raises(ValueError, match=r"outside \[0, 50\).*largest 50"):
        token_cross_entropy(hidden, weight, bad, label_rows=LabelRows.from_labels(bad))
    with pytest.raises(ValueError, match="move them with the batch"):
        token_cross_entropy(hidden, weight, labels, label_rows=rows.to("meta"))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        LabelRows.from_labels(labels.reshape(-1))


def test_policy_loss_entropy_bonus_aggregates_like_the_policy_loss_and_coef_zero_changes_nothing():
    """loss = pg - coef x agg(entropy) (verl); entropy_coef 0 gives the loss and gradient of no bonus bit for bit."""
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(3, 5, generator=g).requires_grad_()
    ent = torch.rand(3, 5, generator=g).requires_grad_()
    adv = torch.randn(3, generator=g)
    mask = (torch.rand(3, 5, generator=g) > 0.3).float()
    for agg in ("token", "sequence"):
        base, _ = policy_loss(logp, logp.detach(), adv, mask, aggregation=agg)
        with_ent, st = policy_loss(logp, logp.detach(), adv, mask, aggregation=agg, entropy=ent, entropy_coef=0.1)
        e = ent * mask
        want_ent = e.sum() / mask.sum() if agg == "token" else (e.sum(1) / mask.sum(1).clamp(min=1)).sum() / 3
        torch.testing.assert_close(with_ent, base - 0.1 * want_ent)
        torch.testing.assert_close(st["entropy_loss"], want_ent.detach())
        zero, st0 = policy_loss(logp, logp.detach(), adv, mask, aggregation=agg, entropy=ent, entropy_coef=0.0)
        assert torch.equal(zero, base) and "entropy_loss" not in st0
        assert torch.equal(torch.autograd.grad(zero, logp)[0], torch.autograd.grad(base, logp)[0])


# ---------------------------------------------------------------- DPO family


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_dpo_sigmoid_by_hand():
    pc, pr, rc, rr = _t(-10.0, -5.0), _t(-12.0, -4.0), _t(-11.0, -5.0), _t(-11.0, -5.0)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="dpo")
    # pair 0: h = (-10+11) - (-12+11) = 2 ; pair 1: h = (0) - (1) = -1
    torch.testing.assert_close(out.losses, _t(-_logsig(0.2), -_logsig(-0.1)))
    torch.testing.assert_close(out.chosen_rewards, _t(0.1, 0.0))
    torch.testing.assert_close(out.rejected_rewards, _t(-0.1, 0.1))
    torch.testing.assert_close(out.margins, _t(0.2, -0.1))
    torch.testing.assert_close(out.accuracies, torch.tensor([1.0, 0.0]))

    smoothed = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="dpo", label_smoothing=0.1)
    torch.testing.assert_close(smoothed.losses[0], torch.tensor(-0.9 * _logsig(0.2) - 0.1 * _logsig(-0.2), dtype=torch.float64))


def test_dpo_norm_by_hand():
    # chosen: policy -10 over 5 tokens (-2/token), ref -15 over 5 (-3/token): ratio +1
    # rejected: policy -12 over 4 tokens (-3/token), ref -8 over 4 (-2/token): ratio -1 ; h = 2, beta = 5
    out = dpo_loss(_t(-10.0), _t(-12.0), _t(-15.0), _t(-8.0), beta=5.0, loss_type="dpo_norm",
                   chosen_lengths=torch.tensor([5]), rejected_lengths=torch.tensor([4]))
    torch.testing.assert_close(out.losses, _t(-_logsig(10.0)))
    torch.testing.assert_close(out.chosen_rewards, _t(5.0))
    torch.testing.assert_close(out.rejected_rewards, _t(-5.0))


def test_ipo_by_hand():
    # averaged log-ratios: chosen (-6 - -8)/2 = 1, rejected (-9 - -6)/3 = -1 -> h = 2 ; beta 0.25 -> target 2
    out = dpo_loss(_t(-6.0, -6.0), _t(-9.0, -6.0), _t(-8.0, -6.0), _t(-6.0, -6.0), beta=0.25, loss_type="ipo",
                   chosen_lengths=torch.tensor([2, 2]), rejected_lengths=torch.tensor([3, 3]))
    torch.testing.assert_close(out.losses, _t(0.0, 4.0))  # (2-2)^2, (0-2)^2


def test_simpo_by_hand_reference_free():
    # avg logps: chosen -4/2 = -2, rejected -9/3 = -3; beta 2 -> rewards -4, -6; logits = 2 - gamma(0.5) = 1.5
    out = dpo_loss(_t(-4.0), _t(-9.0), None, None, beta=2.0, loss_type="simpo", simpo_gamma=0.5,
                   chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([3]))
    torch.testing.assert_close(out.losses, _t(-_logsig(1.5)))
    torch.testing.assert_close(out.chosen_rewards, _t(-4.0))
    torch.testing.assert_close(out.margins, _t(2.0))


def test_label_smoothing_by_hand_for_every_loss_that_takes_it():
    """cDPO's smoothing eps: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z) of each loss's own logit z (summed
    log-ratios for dpo, averaged ones for dpo_norm, SimPO's averaged log-probs minus gamma); IPO takes none."""
    pc, pr, rc, rr = _t(-10.0, -6.0), _t(-12.0, -4.0), _t(-11.0, -5.0), _t(-9.0, -5.0)
    lc, lr = torch.tensor([5, 2]), torch.tensor([4, 4])
    logits = {"dpo": 0.5 * ((pc - rc) - (pr - rr)),  # pair 0: (1 - -3) = 4 -> 2 ; pair 1: (-1 - 1) = -2 -> -1
              "dpo_norm": 0.5 * ((pc - rc) / lc - (pr - rr) / lr),  # (0.2 + 0.75) -> 0.475 ; (-0.5 - 0.25) -> -0.375
              "simpo": 0.5 * (pc / lc - pr / lr) - 0.3}  # (-2 + 3) -> 0.2 ; (-3 + 1) -> -1.3
    for loss_type, z in logits.items():
        out = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type=loss_type, chosen_lengths=lc, rejected_lengths=lr,
                       label_smoothing=0.25, simpo_gamma=0.3)
        want = _t(*[-0.75 * _logsig(float(x)) - 0.25 * _logsig(-float(x)) for x in z])
        torch.testing.assert_close(out.losses, want, msg=loss_type)
    plain, smoothed = (dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr,
                                label_smoothing=eps).losses for eps in (0.0, 0.25))
    assert torch.equal(plain, smoothed)


@pytest.mark.parametrize("loss_type", ["dpo", "dpo_norm", "ipo", "simpo"])
def test_dpo_gradients_flow(loss_type):
    pc = torch.tensor([-10.0, -3.0], requires_grad=True)
    pr = torch.tensor([-11.0, -2.0], requires_grad=True)
    out = dpo_loss(pc, pr, torch.tensor([-10.5, -3.0]), torch.tensor([-10.5, -3.0]), beta=0.5, loss_type=loss_type,
                   chosen_lengths=torch.tensor([4, 2]), rejected_lengths=torch.tensor([5, 2]))
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and (pc.grad < 0).all()  # raising the chosen log-prob lowers the loss
    assert (pr.grad > 0).all()
    assert not out.chosen_rewards.requires_grad


def test_dpo_errors_are_clear():
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match="zero-length answers at pair indices \\[1\\]"):
        dpo_loss(x, x, x, x, beta=5.0, loss_type="dpo_norm", chosen_lengths=torch.tensor([3, 0]),
                 rejected_lengths=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="zero-length answers at pair indices \\[0\\]"):  # counts from the host
        dpo_loss(x, x, x, x, beta=5.0, loss_type="dpo_norm", chosen_lengths=(3, 3), rejected_lengths=(0, 2))
    with pytest.raises(ValueError, match=r"must have shape \(2,\)"):
        dpo_loss(x, x, x, x, beta=5.0, loss_type="dpo_norm", chosen_lengths=(3,), rejected_lengths=(3, 3))
    with pytest.raises(ValueError, match="chosen_lengths"):
        dpo_loss(x, x, x, x, beta=5.0, loss_type="ipo")
    with pytest.raises(ValueError, match="loss_type='kto': choose one of dpo, dpo_norm"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(x, x, None, None, beta=0.1, loss_type="dpo")


def test_sft_nll_per_token():
    torch.testing.assert_close(sft_nll_per_token(_t(-6.0, -1.0), torch.tensor([3, 2])), _t(2.0, 0.5))


# ---------------------------------------------------------------- GRPO family


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # two groups of 4
    adv = group_advantages(r, group_size=4, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv = group_advantages(r, group_size=4, scale_by_std=True, eps=0.0 + 1e-6)
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
    assert torch.all(adv[4:] == 0)
    assert group_advantages(r.view(2, 4), 4).shape == (2, 4)
    torch.testing.assert_close(zero_std_groups(r, 4), torch.tensor([False, True]))
    assert zero_std_groups(r, 4, expand=True).tolist() == [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(r[:7], group_size=4)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_is_zero_when_equal(estimator):
    logp = torch.randn(3, 5)
    assert torch.all(kl_penalty(logp, logp.clone(), estimator) == 0)


def test_kl_values_by_hand():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # ref - logp = -1
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(-1) + 1 - 1)
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "low_var_kl").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="kl_estimator=.*: choose one of k1, k2, k3, low_var_kl"):
        kl_penalty(logp, ref, "k4")


def test_completion_mask():
    m = completion_mask(torch.tensor([2, 4, 1]), torch.tensor([False, True, False]), max_len=4, mask_truncated=True)
    assert m.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]
    m = completion_mask(torch.tensor([2, 4]), torch.tensor([False, True]), max_len=4, mask_truncated=False)
    assert m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, aggregation="token")
    # token aggregation: -(2*1 + 4*(-2) + 1*0.5) / 7
    assert loss.item() == pytest.approx(-(2 - 8 + 0.5) / 7)
    assert stats["ratio_mean"].item() == pytest.approx(1.0) and stats["approx_kl"].item() == pytest.approx(0.0)
    loss.backward()
    # d loss / d logp = -A / n_tokens on masked tokens, 0 elsewhere
    torch.testing.assert_close(logp.grad, -adv[:, None] * mask / 7)


def test_policy_loss_aggregations_by_hand():
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, 3.0])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    tok, _ = policy_loss(logp, logp, adv, mask, aggregation="token")
    seq, _ = policy_loss(logp, logp, adv, mask, aggregation="sequence")
    const, _ = policy_loss(logp, logp, adv, mask, aggregation="constant", normaliser=6.0)
    assert tok.item() == pytest.approx(-(3 * 1 + 1 * 3) / 4)  # -1.5
    assert seq.item() == pytest.approx(-(1 + 3) / 2)  # -2.0
    assert const.item() == pytest.approx(-(3 + 3) / 6)  # -1.0
    with pytest.raises(ValueError, match="normaliser"):
        policy_loss(logp, logp, adv, mask, aggregation="constant")


def test_policy_loss_clipping():
    old = torch.zeros(1, 4)
    # ratios: 1.5 (above 1+0.28), 0.5 (below 1-0.2), 1.1 and 0.9 (inside)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]])).requires_grad_()
    mask = torch.ones(1, 4)

    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A > 0: max(-r, -clip(r)) = -min(r, clip(r)): 1.5 -> 1.28 (clipped), 0.5 -> 0.5 (unclipped: min takes r)
    assert loss.item() == pytest.approx(-(1.28 + 0.5 + 1.1 + 0.9) / 4, abs=1e-6)
    assert stats["clip_frac_high"].item() == pytest.approx(0.25) and stats["clip_frac_low"].item() == 0.0
    loss.backward()
    g = logp.grad[0]
    assert g[0] == 0  # clipped token: no gradient
    assert g[1] == pytest.approx(-0.5 / 4) and g[2] == pytest.approx(-1.1 / 4)  # d(-r/4)/dlogp = -r/4

    logp.grad = None
    loss, stats = policy_loss(logp, old, torch.tensor([-1.0]), mask, clip_low=0.2, clip_high=0.28)
    # A < 0: max(r, clip(r)): 1.5 -> 1.5 (unclipped), 0.5 -> 0.8 (clipped)
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1 + 0.9) / 4, abs=1e-6)
    assert stats["clip_frac_low"].item() == pytest.approx(0.25) and stats["clip_frac_high"].item() == 0.0
    loss.backward()
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] == pytest.approx(1.5 / 4)


def test_policy_loss_with_kl_term():
    logp = torch.zeros(1, 2)
    ref = torch.tensor([[-1.0, 0.0]])
    kl = kl_penalty(logp, ref, "k3")  # [e^-1 - (-1) - 1, 0] = [e^-1, 0]
    loss, stats = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), kl=kl, kl_coef=0.1)
    assert loss.item() == pytest.approx(0.1 * math.exp(-1) / 2)
    assert stats["pg_loss"].item() == 0.0


@pytest.mark.parametrize("aggregation", ["token", "sequence", "constant"])
def test_policy_loss_shares_add_up_with_the_whole_minibatch_normaliser(aggregation):
    """A minibatch split into micro-batches (or ranks): each call, given the count of the WHOLE minibatch,
    returns its exact share, and the shares add up to the loss of the minibatch in one call."""
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(5, 7, generator=g)
    old = logp + 0.1 * torch.randn(5, 7, generator=g)
    adv = torch.randn(5, generator=g)
    mask = (torch.rand(5, 7, generator=g) > 0.3).float()
    mask[2] = 0  # a fully masked sequence does not count in the sequence normaliser
    norm = {"token": float(mask.sum()), "sequence": float((mask.sum(1) > 0).sum()), "constant": 7.0 * 5}[aggregation]
    whole, _ = policy_loss(logp, old, adv, mask, aggregation=aggregation,
                           normaliser=norm if aggregation == "constant" else None)
    parts = [policy_loss(logp[s], old[s], adv[s], mask[s], aggregation=aggregation, normaliser=norm)[0]
             for s in (slice(0, 2), slice(2, 5))]
    assert float(sum(parts)) == pytest.approx(float(whole), rel=1e-6)


def test_string_options_name_the_key_and_the_choices():
    from moxin.config import DPOLoss, parse_option

    assert parse_option(DPOLoss, "dpo_norm", "stage.loss_type") is DPOLoss.DPO_NORM
    assert DPOLoss.SIMPO.needs_reference is False and DPOLoss.IPO.averages_over_tokens
    with pytest.raises(ValueError, match=r"stage.loss_type='dpo2': choose one of dpo, dpo_norm, ipo, simpo"):
        parse_option(DPOLoss, "dpo2", "stage.loss_type")


# ---------------------------------------------------------------- log-probs and entropy in one head pass
def _full_logits_reference(hidden, weight, labels, temperature):
    """Plain PyTorch over the whole (B, T, V) logits: per-token log-probs of the labels and the entropy of every
    position's softmax(logits / temperature), both 0 where the label is -100, differentiable w.r.t. the returned
    leaf copies of hidden and weight."""
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logp = ((h2 @ w2.T).float() / temperature).log_softmax(-1)
    valid = labels != -100
    lp = logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid
    return h2, w2, lp, ent


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["diagnostic", "bonus"])
@pytest.mark.parametrize("keep", [False, True], ids=["recomputed", "kept_gradients"])
@pytest.mark.parametrize("chunk_size,temperature", [(4, 0.7), (1000, 1.0)])
def test_logprobs_and_entropy_in_one_pass_equal_the_full_logits(entropy_grad, keep, chunk_size, temperature,
                                                                monkeypatch):
    """`token_logprobs_and_entropy` (one head product a chunk) against log_softmax over the full logits on random
    inputs: the same log-probs and entropies (0 off the labels), and under random upstream weights of both outputs
    the same gradients of hidden and weight; as a diagnostic the entropies carry no gradient, as GRPO's entropy
    bonus they do (the backward recomputes each chunk once for both gradients, even where the kept-gradient path,
    the CUDA head's, driven eagerly here, would otherwise be taken); a lone entropy gradient too."""
    from moxin import losses as L

    monkeypatch.setattr(L, "_keeps_logit_grads", lambda dev, dt, _k=keep: _k)
    hidden, weight, labels = _inputs(B=3, T=11, D=16, V=50, seed=5)
    g = torch.Generator().manual_seed(6)
    up_lp, up_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    lp, ent = L.token_logprobs_and_entropy(hidden, weight, labels, chunk_size, temperature, entropy_grad=entropy_grad)
    h2, w2, lp_ref, ent_ref = _full_logits_reference(hidden, weight, labels, temperature)
    torch.testing.assert_close(lp, lp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ent_ref.detach(), rtol=1e-5, atol=1e-5)
    assert ent.shape == labels.shape and not ent[labels == -100].any()
    assert ent.requires_grad == entropy_grad
    out, ref = (lp * up_lp).sum(), (lp_ref * up_lp).sum()
    if entropy_grad:
        out, ref = out + (ent * up_ent).sum(), ref + (ent_ref * up_ent).sum()
    for a, b in zip(torch.autograd.grad(out, (hidden, weight)), torch.autograd.grad(ref, (h2, w2))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if entropy_grad:  # the log-probs unused
        _, ent2 = L.token_logprobs_and_entropy(hidden, weight, labels, chunk_size, temperature, entropy_grad=True)
        h3, w3, _, ent_ref3 = _full_logits_reference(hidden, weight, labels, temperature)
        for a, b in zip(torch.autograd.grad((ent2 * up_ent).sum(), (hidden, weight)),
                        torch.autograd.grad((ent_ref3 * up_ent).sum(), (h3, w3))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_entropy_bonus_under_autocast_runs_backward_products_in_its_dtype():
    """bf16-mixed, the entropy bonus's case: the backward's products run in bf16 as the forward's, and the
    gradients equal autograd through the plain autocast path (bf16-product logits, log-softmax in fp32)."""
    from moxin import losses as L

    hidden, weight, labels = _inputs(B=3, T=64, D=32, V=96, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, ent = L.token_logprobs_and_entropy(hidden, weight, labels, 40, 0.6, entropy_grad=True)
    with _MatmulDtypes() as rec:
        gh, gw = torch.autograd.grad(lp.sum() + ent.sum(), (hidden, weight))
    assert len(rec.seen) >= 3 and all(d == (torch.bfloat16,) * len(d) for d in rec.seen), rec.seen
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = h2 @ w2.T
    logp = (logits.float() / 0.6).log_softmax(-1)
    valid = labels != -100
    ref = ((logp.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) - (logp.exp() * logp).sum(-1)) * valid).sum()
    rh, rw = torch.autograd.grad(ref, (h2, w2))
    torch.testing.assert_close(lp.sum() + ent.sum(), ref, atol=1e-3, rtol=1e-5)
    for a, b in ((gh, rh), (gw, rw)):  # bf16 products on both sides, rounded in different orders
        assert (a - b).norm() <= 1e-2 * b.norm(), ((a - b).norm(), b.norm())


def test_compiled_head_kernels_compile_once_for_any_rows_and_temperature(monkeypatch):
    """The head's compiled kernels (CUDA's; traced here by aot_eager on the CPU) are traced once whatever the chunk's
    row count and the temperature: rows marked dynamic, the temperature a tensor argument (a float was a constant
    of the first trace: GRPO's 0.6, then the pretraining bench's 1.0, recompiled). Values as the eager path's."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from moxin import losses as L

    monkeypatch.setattr(L, "_compiles_head", lambda device: True)
    monkeypatch.setattr(L, "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(L, "_compiled", {})
    torch._dynamo.reset()
    for keep in (False, True):
        monkeypatch.setattr(L, "_keeps_logit_grads", lambda dev, dt, _k=keep: _k)
        for B, T, chunk, t in ((3, 11, 8, 0.6), (3, 13, 7, 1.0), (4, 9, 9, 0.8)):  # no chunk of one row
            hidden, weight, labels = _inputs(B=B, T=T, D=16, V=50, seed=B)
            lp, ent = L.token_logprobs_and_entropy(hidden, weight, labels, chunk, t)
            g = torch.autograd.grad(lp.sum(), (hidden, weight))
            monkeypatch.setattr(L, "_compiles_head", lambda device: False)  # the eager reference
            lp_ref, ent_ref = L.token_logprobs_and_entropy(hidden, weight, labels, chunk, t)
            g_ref = torch.autograd.grad(lp_ref.sum(), (hidden, weight))
            monkeypatch.setattr(L, "_compiles_head", lambda device: True)
            for a, b in zip((lp, ent, *g), (lp_ref, ent_ref, *g_ref)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for fn in (L._label_logp_lse_fused, L._logits_grad_fused, L._label_logp_lse_grad_fused):
        assert len(_debug_get_cache_entry_list(fn.__code__)) == 1, fn.__name__


