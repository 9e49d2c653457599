"""What every stage shares: building the model core, AdamW with warmup + decay, exact token normalisation of
the loss across gradient accumulation and ranks, gradient clipping, RNG state in checkpoints.

A stage subclass implements `compute_loss(batch) -> StepLoss` (a summed loss, the number of target tokens it
was summed over, metrics). The base returns the sum to Lightning and, once the whole accumulation window has
run, rescales the gradients by (accumulate * world) / (target tokens of the step on all ranks), so every target
token of the optimizer step weighs the same however the tokens fall into micro-batches and ranks. Plain
per-micro-batch means weigh a token of a short micro-batch more than one of a long one (the gradient
accumulation bug fixed across the field in 2024).
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torchmetrics import Metric

from moxin.config import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig, TrainerConfig
from moxin.distributed import all_reduce_tensor, is_sharded, parallelize, weights_checksum
from moxin.model import Transformer
from moxin.model import lora as lora_lib
from moxin.losses import LabelRows
from moxin.model.attention import DocBounds
from moxin.tokenizer import as_tokenizer


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


@dataclass
class StepLoss:
    loss_sum: torch.Tensor
    """Sum of the per-token (or per-sequence) losses of this micro-batch; gradients flow through it."""
    n_tokens: torch.Tensor
    """What the loss is normalised by over the whole optimizer step (target tokens; pairs for DPO)."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """Extra per-micro-batch sums to log, normalised by the same count (e.g. DPO accuracy)."""
    tokens_processed: int = 0
    """Tokens through the model (for throughput), padding included."""


def load_init_weights(model: Transformer, path: str) -> None:
    """Initialise from a Hugging Face MistralForCausalLM directory, a moxin checkpoint (a .ckpt file or the
    distributed-checkpoint folder an FSDP run writes), a run folder or a safetensors file of moxin names.

    Names and shapes must match, and so must the architecture the source records (HF config.json, or the
    model config moxin stores in its checkpoints): a window, RoPE base or norm epsilon that differs leaves
    every shape equal but computes something else, so it is refused with the fields named."""
    from moxin.checkpointing import config_mismatches, load_model_weights

    src, src_cfg, what = load_model_weights(path)
    if src_cfg is not None:
        bad = config_mismatches(model.cfg, src_cfg)
        if bad:
            raise ValueError(f"init_from={path}: the {what} was trained with another architecture than this "
                             f"run's model config: " + "; ".join(bad) + ". Set those model.* keys to the source's "
                             "values (or pick a model config that matches it)")
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        src = {k: v for k, v in src.items() if k != "output.weight"} | {"output.weight": src.get(
            "output.weight", src.get("tok_embeddings.weight"))}
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))
    if missing or unexpected:
        raise KeyError(f"init_from={path}: checkpoint does not fit the model config; missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in src.items():
        if v.shape != own[k].shape:
            raise ValueError(f"init_from={path}: tensor {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(own[k].shape)} in the model; the model config does not match the checkpoint")
    model.load_state_dict(src)


class HeldOutSums(Metric):
    """Named sums over one validation pass (a loss sum, a token or pair count, ...), summed over every rank when
    computed. torchmetrics keeps the states per process and all-reduces them in `compute()`, so N processes that
    split the held-out data log exactly the single-process value (tests/test_distributed.py). `compute()` is
    collective: every rank calls it."""

    full_state_update = False

    def __init__(self, n: int):
        super().__init__()
        self.add_state("sums", default=torch.zeros(n, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        self.sums += values.detach().to(self.sums.device, torch.float64)

    def compute(self) -> torch.Tensor:
        return self.sums.clone()


def _host_number(v) -> torch.Tensor:
    """A number to log, as a CPU tensor (see `MoxinStage.log_host`)."""
    return torch.tensor(float(v), dtype=torch.float64)


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


class MoxinStage(L.LightningModule):
    """Base LightningModule: owns `self.model` (a `Transformer`) and the optimisation mechanics.

    ``tokenizer``: the run's one tokenizer, handed in by ``moxin.run`` to every stage (GRPO renders prompts and
    decodes completions with it, the evaluation stage scores with it); a spec such as ``"mistral"`` is loaded on
    first use, for code that builds a stage directly."""

    def __init__(self, model: ModelConfig, optim: OptimConfig | None = None,
                 parallel: ParallelConfig | None = None, init_from: str | None = None,
                 loss_chunk_size: int = 4096, total_steps: int | None = None, tokenizer=None,
                 lora: LoRAConfig | None = None, max_nonfinite_steps: int = TrainerConfig.max_nonfinite_steps):
        super().__init__()
        self._tokenizer = tokenizer
        self.lora_cfg = lora or LoRAConfig()
        if self.lora_cfg.enabled and not init_from:
            raise ValueError(f"stage.lora.rank={self.lora_cfg.rank}: LoRA trains adapters on a frozen base, and this "
                             "run has none; set init_from=<a Hugging Face folder, a moxin checkpoint or run> (or "
                             "stage.lora.rank=0 for full training)")
        # a LoRA checkpoint holds the adapters only (the base is init_from's, rebuilt on resume)
        self.strict_loading = not self.lora_cfg.enabled
        self.model_cfg = model
        self.optim_cfg = optim or OptimConfig()
        self.parallel_cfg = parallel or ParallelConfig()
        self.init_from = init_from
        self.loss_chunk_size = loss_chunk_size
        self.total_steps_override = total_steps
        self.max_nonfinite_steps = max_nonfinite_steps  # the run's trainer.max_nonfinite_steps (guard_nonfinite)
        self.model: Transformer | None = None
        self._parallelized = False
        self._acc_tokens = 0.0
        self._acc_loss = 0.0
        self._acc_metrics: dict[str, float] = {}
        self._acc_processed = 0
        self.init_checksum: float | None = None
        self.held_out: HeldOutSums | None = None
        self.tokens_seen = 0  # target tokens over the whole run (all ranks), restored on resume
        self.nonfinite_steps = 0  # optimizer steps skipped for a NaN/Inf loss or gradient norm (restored on resume)
        self._nonfinite_run: list[int] = []  # global steps of the current run of consecutive skipped steps
        self._rng_at_first_batch: dict | None = None  # a resumed run's generator states (on_load_checkpoint)
        self.last_step_tokens_processed = 0
        self._pending_step = None  # a fused optimizer step's values on their way to the host (see optimizer_step)
        self._set_grad_scale = False

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer; pass tokenizer= (moxin.run hands in the run's)")
        self._tokenizer = as_tokenizer(self._tokenizer)
        return self._tokenizer

    # ---- model ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model (once) and apply parallelism (once, when a trainer is attached: FSDP2 needs the
        mesh of Lightning's ModelParallelStrategy). Safe to call early, e.g. from a notebook or a test."""
        if self.model is None:
            if self.lora_cfg.enabled:
                self._check_lora_combination()
            self.model = Transformer(self.model_cfg)
            if self.init_from:
                load_init_weights(self.model, self.init_from)
                # what was loaded, before any sharding or step: summary.json records it so a chain can check
                # that a hand-off really carried the previous stage's final weights (scripts/check_run.py)
                self.init_checksum = weights_checksum(self.model)
            if self.lora_cfg.enabled:
                dev = self.trainer.strategy.root_device.type if self._trainer is not None else None
                lora_lib.apply_lora(self.model, self.lora_cfg, dev)
        if self._parallelized or self._trainer is None:
            return
        self._parallelized = True
        mesh = self.device_mesh if is_sharded(self.trainer.strategy) else None
        parallelize(self.model, self.parallel_cfg, mesh)
        ref = getattr(self, "ref_model", None)
        if ref is not None:  # a frozen reference (DPO, GRPO's KL) is sharded like the policy
            parallelize(ref, self.parallel_cfg, mesh)

    @property
    def uses_lora(self) -> bool:
        return self.lora_cfg.enabled

    def _check_lora_combination(self) -> None:
        """Combinations LoRA cannot run, refused before the model is built or loaded, with the fix."""
        if self._trainer is None or not is_sharded(self.trainer.strategy):
            return
        self.lora_cfg.check_parallel("fsdp2", self.trainer.strategy.root_device.type == "cuda",
                                     self.parallel_cfg.fsdp_param_dtype)

    def frozen_start_copy(self) -> Transformer:
        """A frozen model with the starting weights: `init_from`, or, without it, the very random init the
        policy gets (built from the same RNG state, which is then restored, so call it before the policy is
        built). Not sharded here: `configure_model` shards `self.ref_model` like the policy."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            ref = Transformer(self.model_cfg)
        if self.init_from:
            load_init_weights(ref, self.init_from)
        ref.requires_grad_(False)
        return ref.eval()

    # ---- batches --------------------------------------------------------------------------------------------
    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # What the forward and the loss head would otherwise read from the device (each read stops the host until
        # the GPU catches up), computed here on the host before the rows go to the device: the rows' document
        # bounds (see `DocBounds`) and where their labels are (see `LabelRows`). Moved here without blocking:
        # Lightning moves an object with a `.to` by a blocking copy, which waits for the GPU as a read would.
        if isinstance(batch, dict):
            extra = {}
            if "doc_bounds" not in batch:
                extra["doc_bounds"] = self.doc_bounds(batch)
            if "label_rows" not in batch:
                extra["label_rows"] = self.label_rows(batch)
            extra = {k: v.to(device, non_blocking=True) for k, v in extra.items() if v is not None}
            if extra:
                batch = {**batch, **extra}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def label_rows(self, batch: dict) -> LabelRows | None:
        """`LabelRows` of the batch's ``labels`` for the loss head, when the stage's head takes them (None here)."""
        return None

    def doc_bounds(self, batch: dict) -> DocBounds | None:
        """`DocBounds` of the rows this stage's training forward runs on: the batch's ``positions``, if it has them
        on the host. Stages that forward other rows (DPO: chosen and rejected together) override it."""
        pos = batch.get("positions")
        if isinstance(pos, torch.Tensor) and pos.device.type == "cpu" and pos.dim() == 2:
            return DocBounds.from_positions(pos)
        return None

    # ---- optimisation ---------------------------------------------------------------------------------------
    def total_steps(self) -> int:
        if self.total_steps_override:
            return self.total_steps_override
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "total_steps", None):
            return int(dm.total_steps)
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches)

    def configure_optimizers(self):
        oc = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.dim() < 2 or "tok_embeddings" in name else decay).append(p)
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=oc.lr, betas=oc.betas, eps=oc.eps, fused=fused)
        total = self.total_steps()
        warmup = oc.warmup_steps if oc.warmup_steps is not None else int(round(oc.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, total, warmup, oc.schedule, oc.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def compute_loss(self, batch) -> StepLoss:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        out = self.compute_loss(batch)
        # accumulate on the device: no host sync per micro-batch, one per optimizer step
        self._acc_tokens = self._acc_tokens + torch.as_tensor(out.n_tokens, device=self.device).detach().double()
        self._acc_loss = self._acc_loss + out.loss_sum.detach().double()
        for k, v in out.metrics.items():
            self._acc_metrics[k] = self._acc_metrics.get(k, 0.0) + torch.as_tensor(v).detach().double()
        self._acc_processed += out.tokens_processed
        return out.loss_sum

    def step_counters(self) -> list:
        """Per-step sums a subclass adds to the step's one reduction over ranks (host numbers or 0-d device
        tensors), reset here; their reduced values come back, on the host, to `log_step_counters`."""
        return []

    def log_step_counters(self, values: list[float]) -> None:
        """The reduced `step_counters` of an optimizer step (skipped steps included), once the step's values are
        on the host."""

    def on_before_optimizer_step(self, optimizer):
        # The token normalisation is folded into the clipping factor, since norm(scale * g) = scale * norm(g), and
        # the factor into the optimizer step where the optimizer can apply it: two passes over the gradients (their
        # norm, the step) rather than three. With a fused optimizer nothing here waits for the GPU: the factor and the
        # skip of a non-finite step are device numbers the step reads (its `grad_scale` and `found_inf`, as
        # GradScaler uses them), and the step's values reach the host in `optimizer_step`, after the step is queued,
        # so the host never stalls the GPU between the backward and the optimizer step.
        inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        self._clear_step_factor(inner)
        self._finish_pending_step(optimizer)  # a step whose values were never read (optimizer_step overridden)
        keys = sorted(self._acc_metrics)
        extra = self.step_counters()
        stats = all_reduce_tensor([self._acc_tokens, self._acc_loss, float(self._acc_processed)]
                                  + [self._acc_metrics[k] for k in keys] + extra, self.device)
        self._acc_tokens, self._acc_loss, self._acc_processed = 0.0, 0.0, 0
        self._acc_metrics = {}
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        raw_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if hasattr(raw_norm, "full_tensor"):  # sharded gradients: the norm is a DTensor
            raw_norm = raw_norm.full_tensor()
        # Lightning divided each micro loss by `accum` and the DP all-reduce averaged over `world`
        n_tokens = stats[0]
        scale = torch.where(n_tokens > 0, self.trainer.accumulate_grad_batches * self.trainer.world_size / n_tokens,
                            1.0)
        gn = raw_norm.to(device=stats.device, dtype=torch.float64) * scale  # the norm before clipping
        values = torch.cat([stats, gn.reshape(1)])
        layout = (keys, len(extra))
        if grads and self._fused_step_scales(inner, grads):
            clip = self.optim_cfg.grad_clip
            # clip_grad_norm_'s rule
            factor = scale * (torch.clamp(clip / (gn + 1e-6), max=1.0) if clip is not None else 1.0)
            ok = torch.isfinite(stats[1]) & torch.isfinite(gn)
            # fused AdamW divides each gradient by `grad_scale` as it reads it (and stores the result back), and
            # leaves weights, moments and step count as they were where `found_inf` is 1
            inner.grad_scale = torch.where(ok, 1.0 / factor, 1.0).to(torch.float32)
            inner.found_inf = (~ok).to(torch.float32)
            self._set_grad_scale = True
            self._pending_step = (_to_host(values), layout)
            return
        self._finish_step(values.tolist(), layout, optimizer, grads)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._clear_step_factor(getattr(optimizer, "optimizer", optimizer))
        self._finish_pending_step(optimizer)

    def _clear_step_factor(self, optimizer) -> None:
        """Drop the `grad_scale` / `found_inf` this stage set for a step, so they are never applied twice."""
        if getattr(self, "_set_grad_scale", False):
            optimizer.grad_scale = optimizer.found_inf = None
            self._set_grad_scale = False

    def _finish_pending_step(self, optimizer) -> None:
        pending, self._pending_step = getattr(self, "_pending_step", None), None
        if pending is not None:
            (host, ready), layout = pending
            if ready is not None:
                ready.synchronize()  # the values were copied before the optimizer step, which the GPU may still run
            self._finish_step(host.tolist(), layout, optimizer, None)

    def _finish_step(self, vals: list[float], layout, optimizer, grads: list | None) -> None:
        """The host's part of an optimizer step: the guard against non-finite steps, the gradient factor where the
        optimizer does not apply it (`grads`: multiply them here, before the step), counters and logs."""
        keys, n_extra = layout
        n_tokens, loss_sum, processed = vals[:3]
        metrics = vals[3:3 + len(keys)]
        gn = vals[-1]
        self.log_step_counters(vals[3 + len(keys):3 + len(keys) + n_extra])
        if not self.guard_nonfinite(loss_sum / max(n_tokens, 1.0), gn):
            self.log("train/nonfinite_steps", _host_number(self.nonfinite_steps), on_step=True, on_epoch=False,
                     rank_zero_only=True)
            return
        if grads:
            clip = self.optim_cfg.grad_clip
            scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / n_tokens if n_tokens > 0 else 1.0
            factor = scale * (min(1.0, clip / (gn + 1e-6)) if clip is not None else 1.0)  # clip_grad_norm_'s rule
            if factor != 1.0:
                torch._foreach_mul_(grads, factor)
        self.tokens_seen += int(n_tokens)
        self.last_step_tokens_processed = int(processed)
        denom = max(n_tokens, 1.0)
        logs = {"train/loss": loss_sum / denom, "train/lr": optimizer.param_groups[0]["lr"],
                "train/target_tokens": float(self.tokens_seen), "train/grad_norm": gn}
        if self.nonfinite_steps:
            logs["train/nonfinite_steps"] = float(self.nonfinite_steps)
        for k, v in zip(keys, metrics):
            logs[k] = v / denom
        self.log_host(logs)
        self.log("loss", _host_number(logs["train/loss"]), prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 rank_zero_only=True)

    def log_host(self, logs: dict[str, float]) -> None:
        """Log a step's numbers from the host (rank zero, this step). Lightning would turn a Python number into a
        tensor on the stage's device, a blocking copy that waits for the GPU; a CPU tensor stays where it is."""
        self.log_dict({k: _host_number(v) for k, v in logs.items()}, on_step=True, on_epoch=False, prog_bar=False,
                      rank_zero_only=True, sync_dist=False)

    def _fused_step_scales(self, optimizer, grads) -> bool:
        """Whether the optimizer step itself can apply the gradient factor: a fused torch optimizer (it reads
        `grad_scale`, as GradScaler uses it), no GradScaler of fp16 training (it sets `grad_scale` itself), and
        plain tensors (not the DTensors of FSDP, which a plain scale tensor cannot mix with)."""
        if not (getattr(optimizer, "_step_supports_amp_scaling", False) and optimizer.defaults.get("fused")):
            return False
        if getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) is not None:
            return False
        return all(type(g) is torch.Tensor for g in grads)

    # ---- held-out metrics: sums over the validation pass, reduced over ranks ----------------------------------
    def held_out_start(self, n: int) -> None:
        """Start a validation pass that accumulates `n` sums (see `HeldOutSums`)."""
        if getattr(self, "held_out", None) is None or self.held_out.sums.numel() != n:
            self.held_out = HeldOutSums(n).to(self.device)
        self.held_out.reset()

    def held_out_totals(self) -> torch.Tensor:
        """The pass's sums over all ranks (collective)."""
        import warnings

        with warnings.catch_warnings():  # a rank with no held-out batch still takes part in the reduction
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            return self.held_out.compute()

    def log_held_out(self, metrics: dict[str, float]) -> None:
        """Log values that every rank already holds reduced (sync_dist=True keeps Lightning from logging one
        rank's value and averages identical numbers, which changes nothing)."""
        if metrics:
            self.log_dict(metrics, sync_dist=True)

    def guard_nonfinite(self, loss: float | None, grad_norm: float | None) -> bool:
        """Whether this optimizer step may proceed. A NaN/Inf loss or gradient norm (both global: every rank
        decides the same) skips the step instead: the gradients are dropped, so AdamW leaves the weights and
        its moments as they were (the LR schedule still advances one step). Skipped steps are counted; after
        `trainer.max_nonfinite_steps` in a row the run stops with NonFiniteError, and since the weights never took
        a non-finite update, the last checkpoint stays a good one. The base calls it once the step's values are on
        the host: before the step, or, with a fused optimizer, after it, which then skipped the update on the
        device (`found_inf`); stages with manual optimisation call it with their gradient norm."""
        bad = [f"{n}={v}" for n, v in (("loss", loss), ("grad_norm", grad_norm))
               if v is not None and not math.isfinite(v)]
        if not bad:
            self._nonfinite_run = []
            return True
        for p in self.model.parameters():
            p.grad = None
        step = self.trainer.global_step if self._trainer is not None else 0
        self.nonfinite_steps += 1
        self._nonfinite_run.append(step)
        from lightning.pytorch.utilities import rank_zero_warn

        limit = self.max_nonfinite_steps
        rank_zero_warn(f"optimizer step {step}: {', '.join(bad)}; step skipped (weights unchanged; "
                       f"{len(self._nonfinite_run)} in a row, the run stops at {limit})")
        if len(self._nonfinite_run) >= limit:
            raise NonFiniteError(
                f"training stopped: {len(self._nonfinite_run)} optimizer steps in a row (steps "
                f"{self._nonfinite_run[0]}-{self._nonfinite_run[-1]}) had a non-finite loss or gradient norm "
                f"(last: {', '.join(bad)}); {self.nonfinite_steps} skipped in all. The weights never took a non-finite "
                f"update; the last checkpoint is the last good state. Lower stage.optim.lr (now {self.optim_cfg.lr}), "
                f"keep stage.optim.grad_clip set (now {self.optim_cfg.grad_clip}), check the data, or raise "
                "trainer.max_nonfinite_steps")
        return False

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # clipping happens in on_before_optimizer_step, after the token normalisation
        return

    # ---- checkpoints: everything needed to continue as if never stopped --------------------------------------
    def on_save_checkpoint(self, checkpoint):
        if self.uses_lora:  # `state_dict` kept the adapters only: the frozen base is init_from's
            base = Path(self.init_from)
            checkpoint.setdefault("moxin", {})["lora"] = dataclasses.asdict(self.lora_cfg) | {
                "base": str(base.resolve() if base.exists() else base)}  # what init_from of this checkpoint merges into
        np_state = np.random.get_state()
        checkpoint.setdefault("moxin", {}).update({
            "tokens_seen": self.tokens_seen,
            "nonfinite_steps": self.nonfinite_steps,
            # what resume and init_from check: the process count the data / loop state belongs to, and the
            # architecture the weights were trained with
            "world_size": int(self.trainer.world_size) if self._trainer is not None else 1,
            "model_config": {k: v for k, v in dataclasses.asdict(self.model_cfg).items()},
            "total_steps": int(self.total_steps()) if self._trainer is not None else None,
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "rng_python": list(random.getstate()[1]),
            "rng_python_version": random.getstate()[0],
            "rng_python_gauss": random.getstate()[2],
            "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                          int(np_state[3]), float(np_state[4])],
        })

    def state_dict(self, *args, **kwargs):
        """With LoRA, the adapters only: the checkpoint's model part, saved and loaded (also by FSDP2's distributed
        checkpoint, which reads exactly the keys this names) without the frozen base, which init_from rebuilds."""
        sd = super().state_dict(*args, **kwargs)
        if getattr(self, "lora_cfg", None) is not None and self.uses_lora:
            for k in [k for k in sd if not k.endswith((".lora_A", ".lora_B"))]:
                del sd[k]
        return sd

    def _check_lora_checkpoint(self, checkpoint) -> None:
        """A LoRA run resumes only from a checkpoint of the same adapters (Lightning loads it non-strictly, since
        the base is not in it): every adapter tensor present, nothing else."""
        saved = (checkpoint.get("moxin") or {}).get("lora")
        want = {"model." + k for k in lora_lib.adapter_state_dict(self.model)} if self.model is not None else set()
        # (FSDP2's distributed checkpoint has loaded the tensors in place: only the settings are left to compare)
        have = set(checkpoint["state_dict"]) if isinstance(checkpoint.get("state_dict"), dict) else want
        ours = dataclasses.asdict(self.lora_cfg)
        same = saved is not None and all(saved.get(k) == ours[k] for k in ("rank", "alpha", "targets", "quantize"))
        if not same or (want and have != want):
            raise ValueError(f"resume: the checkpoint does not hold this run's LoRA adapters (stage.lora: "
                             f"{dataclasses.asdict(self.lora_cfg)}; checkpoint: {saved or 'not a LoRA run'}). "
                             "Resume with the stage.lora settings it was written with, or start a new run "
                             "(another out_dir) with init_from=<its hf export>")

    def on_load_checkpoint(self, checkpoint):
        st = checkpoint.get("moxin")
        if self.uses_lora:
            self._check_lora_checkpoint(checkpoint)
        if not st:
            return
        self.tokens_seen = int(st["tokens_seen"])
        self.nonfinite_steps = int(st.get("nonfinite_steps", 0))
        self._restore_rng(st)
        # and again at the first batch: the loaders built after this load draw their seeds from torch's generator,
        # which the uninterrupted run did before the checkpoint was written (LoRA dropout reads it at that step)
        self._rng_at_first_batch = st

    def on_train_batch_start(self, batch, batch_idx):
        """A resumed run's first step starts from the checkpoint's generator states (see `on_load_checkpoint`)."""
        st, self._rng_at_first_batch = self._rng_at_first_batch, None
        if st is not None:
            self._restore_rng(st)

    @staticmethod
    def _restore_rng(st: dict) -> None:
        """torch (CPU, CUDA), Python and NumPy generators as `on_save_checkpoint` recorded them."""
        torch.set_rng_state(st["rng_torch"])
        if torch.cuda.is_available() and st["rng_cuda"]:
            torch.cuda.set_rng_state_all(st["rng_cuda"])
        py = st["rng_python"]
        random.setstate((st["rng_python_version"], tuple(int(x) for x in py), st["rng_python_gauss"]))
        n = st["rng_numpy"]
        np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
