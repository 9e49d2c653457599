"""The optimizer and one optimizer step, in plain PyTorch: normalise, clip, step, guard.

Details: docs/modules.md, "optim.py".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import rank_zero_warn

from moxin.config import TrainerConfig
from moxin.distributed import all_reduce_tensor


class NonFiniteError(RuntimeError):
    """Training stopped: too many optimizer steps in a row with a NaN/Inf loss or gradient norm."""


def lr_lambda(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_schedule(model: torch.nn.Module, cfg, total: int, fused: bool):
    """AdamW over `model`'s trainable parameters (weight decay on matrices only: embeddings, norms and biases are
    not decayed) and its warmup + decay schedule, from an `OptimConfig`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_lambda(s, total, warmup, cfg.schedule, cfg.min_lr_ratio))
    return opt, sched


@dataclass
class StepValues:
    """One optimizer step's numbers on the host, summed over the window and the ranks."""

    n_tokens: float
    loss_sum: float
    processed: float
    """Tokens through the model, padding included (throughput)."""
    grad_norm: float
    """The normalised gradients' norm, before clipping."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The stage's extra sums (to be divided by `n_tokens`)."""
    counters: list[float] = field(default_factory=list)
    """The stage's per-step counters, reduced."""
    ok: bool = True
    """False: the step was skipped (non-finite loss or norm)."""

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n_tokens, 1.0)


def _to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying `t` to the host without waiting: (the page-locked copy, an event that completes with it).
    On the CPU, a copy and no event."""
    if t.device.type != "cuda":
        return t.detach().clone(), None
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


class OptimizerStep:
    """Token normalisation, clipping, the fused path and the non-finite guard of one optimizer step (module
    docstring). `cfg` is the stage's `OptimConfig`, read when used (``grad_clip``, ``lr``); `max_nonfinite_steps`
    is the run's ``trainer.max_nonfinite_steps``."""

    def __init__(self, cfg, max_nonfinite_steps: int = TrainerConfig.max_nonfinite_steps):
        self.cfg = cfg
        self.max_nonfinite_steps = max_nonfinite_steps
        self.allow_fused = True  # False: always read the values before the step and multiply (a reference path)
        self.nonfinite_steps = 0  # steps skipped for a NaN/Inf loss or gradient norm (checkpointed by the stage)
        self.nonfinite_run: list[int] = []  # the steps of the current run of consecutive skipped steps
        self._reset_sums()
        self._pending = None  # a fused step's values on their way to the host
        self._scaled = False  # this object set the optimizer's grad_scale / found_inf

    def _reset_sums(self) -> None:
        self._tokens, self._loss, self._processed = 0.0, 0.0, 0
        self._metrics: dict = {}

    def add(self, loss_sum: torch.Tensor, n_tokens, metrics: dict, tokens_processed: int, device) -> None:
        """One micro-batch's sums, kept on the device: no host sync per micro-batch, one per optimizer step."""
        self._tokens = self._tokens + torch.as_tensor(n_tokens, device=device).detach().double()
        self._loss = self._loss + loss_sum.detach().double()
        for k, v in metrics.items():
            self._metrics[k] = self._metrics.get(k, 0.0) + torch.as_tensor(v).detach().double()
        self._processed += tokens_processed

    def prepare(self, optimizer, params, *, divided_by: int, device, step: int, counters: list = (),
                grad_scaler: bool = False, replicas: int = 1) -> StepValues | None:
        """Before ``optimizer.step()``: reduce the step's sums (and `counters`) over ranks, take the gradients' norm
        and normalise and clip them. With a fused optimizer (and no fp16 `grad_scaler`, which owns ``grad_scale``)
        the factor goes into the step and None comes back (`finish` returns the values); otherwise the values,
        after the guard and the multiply. `divided_by`: what each micro-batch's gradient was divided by (Lightning's
        accumulation x the data-parallel world). `replicas`: how many ranks hold each row (the tensor-parallel
        ranks of a group see the same rows and add the same sums): the reduced sums are divided by it."""
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        self.clear(inner)
        keys = sorted(self._metrics)
        counters = list(counters)
        stats = all_reduce_tensor([self._tokens, self._loss, float(self._processed)]
                                  + [self._metrics[k] for k in keys] + counters, device)
        if replicas != 1:
            stats = stats / replicas
        self._reset_sums()
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        raw_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
        if hasattr(raw_norm, "full_tensor"):  # sharded gradients: the norm is a DTensor
            raw_norm = raw_norm.full_tensor()
        n_tokens = stats[0]
        scale = torch.where(n_tokens > 0, divided_by / n_tokens, 1.0)
        gn = raw_norm.to(device=stats.device, dtype=torch.float64) * scale  # the norm before clipping
        values = torch.cat([stats, gn.reshape(1)])
        layout = (keys, len(counters), divided_by)
        if grads and self.fused_applies(inner, grads, grad_scaler):
            clip = self.cfg.grad_clip
            factor = scale * (torch.clamp(clip / (gn + 1e-6), max=1.0) if clip is not None else 1.0)
            ok = torch.isfinite(stats[1]) & torch.isfinite(gn)
            # fused AdamW divides each gradient by `grad_scale` as it reads it (and stores the result back), and
            # leaves weights, moments and step count as they were where `found_inf` is 1
            inner.grad_scale = torch.where(ok, 1.0 / factor, 1.0).to(torch.float32)
            inner.found_inf = (~ok).to(torch.float32)
            self._scaled = True
            self._pending = (_to_host(values), layout)
            return None
        return self._finish(values.tolist(), layout, params, grads, step)

    def finish(self, optimizer, params, step: int) -> StepValues | None:
        """After ``optimizer.step()`` (or before the next `prepare`): drop the factor handed to the optimizer and
        return the fused step's values, guarded (the step itself skipped a non-finite update); None where no
        values wait."""
        self.clear(getattr(optimizer, "optimizer", optimizer))
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        (host, ready), layout = pending
        if ready is not None:
            ready.synchronize()  # the values were copied before the optimizer step, which the GPU may still run
        return self._finish(host.tolist(), layout, params, None, step)

    def _finish(self, vals: list[float], layout, params, grads: list | None, step: int) -> StepValues:
        """The host's part: the guard, and the gradient factor where the optimizer does not apply it (`grads`)."""
        keys, n_counters, divided_by = layout
        n_tokens, loss_sum, processed = vals[:3]
        gn = vals[-1]
        out = StepValues(n_tokens, loss_sum, processed, gn, dict(zip(keys, vals[3:3 + len(keys)])),
                         vals[3 + len(keys):3 + len(keys) + n_counters])
        out.ok = self.guard(loss_sum / max(n_tokens, 1.0), gn, params, step)
        if out.ok and grads:
            clip = self.cfg.grad_clip
            scale = divided_by / n_tokens if n_tokens > 0 else 1.0
            factor = scale * (min(1.0, clip / (gn + 1e-6)) if clip is not None else 1.0)  # clip_grad_norm_'s rule
            if factor != 1.0:
                torch._foreach_mul_(grads, factor)
        return out

    def clip(self, params, step: int) -> float:
        """A step whose loss is already normalised (GRPO's update): clip the gradients at ``grad_clip`` with
        clip_grad_norm_, then `guard`. Returns the norm before clipping."""
        params = list(params)
        clip = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        gn = torch.nn.utils.clip_grad_norm_(params, clip)
        gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)
        self.guard(None, gn, params, step)
        return gn

    def clear(self, optimizer) -> None:
        """Drop the ``grad_scale`` / ``found_inf`` this object set for a step, so they are never applied twice."""
        if self._scaled:
            optimizer.grad_scale = optimizer.found_inf = None
            self._scaled = False

    def fused_applies(self, optimizer, grads, grad_scaler: bool) -> bool:
        """Whether the optimizer step itself can apply the gradient factor: a fused torch optimizer (it reads
        ``grad_scale``), no fp16 GradScaler (it sets ``grad_scale`` itself), and plain tensors (not the DTensors of
        FSDP, which a plain scale tensor cannot mix with)."""
        if not self.allow_fused or grad_scaler:
            return False
        if not (getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused")):
            return False
        return all(type(g) is torch.Tensor for g in grads)

    def guard(self, loss: float | None, grad_norm: float | None, params, step: int) -> bool:
        """Whether this optimizer step may proceed. A NaN/Inf loss or gradient norm (both global: every rank decides
        the same) skips it: the gradients are dropped, so AdamW leaves the weights and its moments as they were (the
        LR schedule still advances). After ``max_nonfinite_steps`` in a row: NonFiniteError (the weights never took
        a non-finite update, so the last checkpoint is a good one)."""
        bad = [f"{n}={v}" for n, v in (("loss", loss), ("grad_norm", grad_norm))
               if v is not None and not math.isfinite(v)]
        if not bad:
            self.nonfinite_run = []
            return True
        for p in params:
            p.grad = None
        self.nonfinite_steps += 1
        self.nonfinite_run.append(step)
        limit = self.max_nonfinite_steps
        rank_zero_warn(f"optimizer step {step}: {', '.join(bad)}; step skipped (weights unchanged; "
                       f"{len(self.nonfinite_run)} in a row, the run stops at {limit})")
        if len(self.nonfinite_run) >= limit:
            raise NonFiniteError(
                f"training stopped: {len(self.nonfinite_run)} optimizer steps in a row (steps "
                f"{self.nonfinite_run[0]}-{self.nonfinite_run[-1]}) had a non-finite loss or gradient norm "
                f"(last: {', '.join(bad)}); {self.nonfinite_steps} skipped in all. The weights never took a non-finite "
                f"update; the last checkpoint is the last good state. Lower stage.optim.lr (now {self.cfg.lr}), "
                f"keep stage.optim.grad_clip set (now {self.cfg.grad_clip}), check the data, or raise "
                "trainer.max_nonfinite_steps")
        return False
