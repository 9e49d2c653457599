"""`moxin.optim.OptimizerStep` on its own, against a hand-written reference: token normalisation over micro-batches
of unequal size, clipping at a norm, the non-finite skip and the stop after N, the fused path equal to the
multiply, and GRPO's clip of an already normalised loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from moxin.config import OptimConfig
from moxin.optim import NonFiniteError, OptimizerStep

ACCUM = 3


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))


def _micro_batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ACCUM micro-batches of (inputs, per-token targets) with 2, 7 and 4 tokens: unequal on purpose."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randn(n, 4, generator=g)) for n in (2, 7, 4)]


def _token_losses(model, x, y) -> torch.Tensor:
    return ((model(x) - y) ** 2).sum(1)  # one loss per token


def _accumulate(step: OptimizerStep, model, batches) -> None:
    """What Lightning does with a stage's loss sums: backward of each divided by the accumulation."""
    for x, y in batches:
        losses = _token_losses(model, x, y)
        (losses.sum() / ACCUM).backward()
        step.add(losses.sum(), len(x), {"sq": losses.detach().sum() * 2}, tokens_processed=len(x) + 1, device="cpu")


def _reference_grads(model, batches, clip: float | None) -> tuple[list[torch.Tensor], float]:
    """The mean over every token of the step, in float64, clipped by hand at `clip`; and the norm before."""
    ref = copy.deepcopy(model).double()
    tokens = sum(len(x) for x, _ in batches)
    loss = sum(_token_losses(ref, x.double(), y.double()).sum() for x, y in batches) / tokens
    loss.backward()
    grads = [p.grad for p in ref.parameters()]
    norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads))
    factor = min(1.0, clip / (norm + 1e-6)) if clip is not None else 1.0
    return [g * factor for g in grads], norm


@pytest.mark.parametrize("clip", [None, 0.05, 1e6])
def test_gradients_are_the_token_mean_of_the_step_then_clipped(clip):
    model, batches = _model(), _micro_batches()
    step = OptimizerStep(OptimConfig(grad_clip=clip))
    _accumulate(step, model, batches)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    v = step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=0)
    want, norm = _reference_grads(model, batches, clip)
    assert v.ok and v.n_tokens == 13 and v.processed == 13 + ACCUM
    assert v.grad_norm == pytest.approx(norm, rel=1e-5)  # the normalised norm, before clipping
    assert v.metrics["sq"] == pytest.approx(2 * v.loss_sum, rel=1e-6)
    for p, g in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)
    after = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters()))
    if clip == 0.05:
        assert norm > 2 * clip and after == pytest.approx(clip, rel=1e-4)  # the clip bit, at the norm asked
    else:
        assert after == pytest.approx(norm, rel=1e-5)
    # the sums start again at the next step
    assert step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=1).n_tokens == 0


def test_nonfinite_steps_are_skipped_and_the_run_stops_after_n_in_a_row():
    model = _model()
    step = OptimizerStep(OptimConfig(), max_nonfinite_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def one(bad_loss: bool, at: int):
        _accumulate(step, model, _micro_batches(at))
        if bad_loss:
            step.add(torch.tensor(float("nan")), 0, {}, 0, "cpu")
        return step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=at)

    assert one(False, 0).ok and all(p.grad is not None for p in model.parameters())
    v = one(True, 1)
    assert not v.ok and math.isnan(v.loss) and step.nonfinite_steps == 1
    assert all(p.grad is None for p in model.parameters())  # dropped: the optimizer leaves the weights as they are
    assert one(False, 2).ok  # a good step ends the run of bad ones
    for p in model.parameters():
        p.grad = None
    assert not one(True, 3).ok
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row \(steps 3-4\).*3 skipped in all"):
        _accumulate(step, model, _micro_batches(4))
        next(model.parameters()).grad[0, 0] = float("inf")  # a non-finite gradient norm
        step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=4)


def test_the_fused_step_applies_the_same_factor_and_skips_on_its_own():
    """Fused AdamW (it runs on the CPU too) takes the factor as `grad_scale` and the skip as `found_inf`; three
    steps give the weights of the path that multiplies the gradients first, and a non-finite step changes
    nothing, not even AdamW's step count."""
    models = [_model(), _model()]
    steps = [OptimizerStep(OptimConfig(grad_clip=0.05)) for _ in models]
    steps[1].allow_fused = False
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in models]
    norms = [[], []]
    for at in range(3):
        for i, (model, step, opt) in enumerate(zip(models, steps, opts)):
            _accumulate(step, model, _micro_batches(at))
            before = step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=at)
            assert (before is None) == (i == 0) and (getattr(opt, "grad_scale", None) is not None) == (i == 0)
            opt.step()
            after = step.finish(opt, model.parameters(), at)
            assert getattr(opt, "grad_scale", None) is None  # never applied twice
            norms[i].append((before or after).grad_norm)
            opt.zero_grad()
    assert norms[0] == pytest.approx(norms[1], rel=1e-6) and max(norms[0]) > 0.05
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    model, step, opt = models[0], steps[0], opts[0]
    state = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    _accumulate(step, model, _micro_batches(9))
    next(model.parameters()).grad[0, 0] = float("nan")
    assert step.prepare(opt, model.parameters(), divided_by=ACCUM, device="cpu", step=3) is None
    opt.step()
    v = step.finish(opt, model.parameters(), 3)
    assert not v.ok and step.nonfinite_steps == 1
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    for k, s in state["state"].items():
        assert all(torch.equal(s[n], opt.state_dict()["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))


def test_clip_of_an_already_normalised_loss_is_clip_grad_norm():
    """GRPO's path: its loss is a global mean already, so the step only clips (clip_grad_norm_) and guards."""
    model, ref = _model(), _model()
    x, y = _micro_batches()[1]
    for m in (model, ref):
        _token_losses(m, x, y).mean().backward()
    step = OptimizerStep(OptimConfig(grad_clip=0.05))
    gn = step.clip(model.parameters(), step=0)
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    assert gn == float(want) and gn > 0.05
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    next(model.parameters()).grad[0, 0] = float("nan")
    assert math.isnan(step.clip(model.parameters(), step=1))
    assert step.nonfinite_steps == 1 and all(p.grad is None for p in model.parameters())
