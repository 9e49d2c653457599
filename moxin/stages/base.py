"""What every stage shares: the model core built (and parallelised, LoRA applied) once, the batch hooks, the
optimizer step wired into Lightning's hooks, held-out sums, and what a checkpoint carries besides the weights.

A stage subclass implements `compute_loss(batch) -> StepLoss` (a summed loss, the number of target tokens it
was summed over, metrics). The base returns the sum to Lightning and hands the counts to
`moxin.optim.OptimizerStep`, which normalises by the target tokens of the whole step on all ranks (plain
per-micro-batch means weigh a token of a short micro-batch more than one of a long one: the gradient accumulation
bug fixed across the field in 2024), clips and guards the step.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from torchmetrics import Metric

from moxin.checkpoint.resume import finish_phase_end, rescale_loop_batches, restore_rng, rng_state
from moxin.checkpoint.weights import load_init_weights
from moxin.config import LoRAConfig, ModelConfig, OptimConfig, ParallelConfig, TrainerConfig
from moxin.distributed import float8_optimizer_hook, is_sharded, parallelize, set_gradient_sync, weights_checksum
from moxin.model import Transformer
from moxin.model import lora as lora_lib
from moxin.losses import LabelRows
from moxin.model.attention import DocBounds
from moxin.optim import OptimizerStep, StepValues, adamw_with_schedule
from moxin.tensor_parallel import tensor_parallel_size


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


class MoxinStage(L.LightningModule):
    """Base LightningModule: owns `self.model` (a `Transformer`) and `self.optim_step` (its `OptimizerStep`).

    ``tokenizer``: the run's one tokenizer object, handed in by moxin/assemble.py to every stage (GRPO renders
    prompts and decodes completions with it, the evaluation stage scores with it); code that builds a stage
    directly passes ``moxin.tokenizer.load_tokenizer(spec)``."""

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
        self.model: Transformer | None = None
        self._parallelized = False
        # normalise, clip, guard (trainer.max_nonfinite_steps): see moxin.optim
        self.optim_step = OptimizerStep(self.optim_cfg, max_nonfinite_steps)
        self.init_checksum: float | None = None
        self.held_out: HeldOutSums | None = None
        self.tokens_seen = 0  # target tokens over the whole run (all ranks), restored on resume
        self._rng_at_first_batch: dict | None = None  # a resumed run's generator states (on_load_checkpoint)
        self.last_step_tokens_processed = 0

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise ValueError(f"{type(self).__name__} has no tokenizer; pass tokenizer= (moxin/assemble.py hands in "
                             "the run's)")
        return self._tokenizer

    # ---- model ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model (once) and apply parallelism (once, when a trainer is attached: FSDP2 needs the
        mesh of Lightning's ModelParallelStrategy). Safe to call early, e.g. from a notebook or a test."""
        if self.model is None:
            if self.lora_cfg.enabled:
                self._check_lora_combination()
                # LoRA always loads init_from: built without storage, filled on the host, and moved to the device
                # one projection at a time by apply_lora (QLoRA: quantised there), so the device never holds the
                # whole base in the master dtype (the 7B's 30 GiB in fp32 where its NF4 base is 4 GiB)
                with torch.device("meta"):
                    self.model = Transformer(self.model_cfg)
                self.model.to_empty(device="cpu")
            else:
                self.model = Transformer(self.model_cfg)
            if self.init_from:
                load_init_weights(self.model, self.init_from)
                # what was loaded, before any sharding or step: summary.json records it so a chain can check
                # that a hand-off really carried the previous stage's final weights (scripts/check_run.py)
                self.init_checksum = weights_checksum(self.model)
            if self.lora_cfg.enabled:
                dev = self.trainer.strategy.root_device if self._trainer is not None else None
                lora_lib.apply_lora(self.model, self.lora_cfg, device=dev)
        if self._parallelized or self._trainer is None:
            return
        self._parallelized = True
        mesh = self.device_mesh if is_sharded(self.trainer.strategy) else None
        parallelize(self.model, self.parallel_cfg, mesh)
        ref = getattr(self, "ref_model", None)
        if ref is not None:  # a frozen reference (DPO, GRPO's KL) is sharded like the policy
            parallelize(ref, self.parallel_cfg, mesh)

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
        fused = self.device.type == "cuda"
        opt, sched = adamw_with_schedule(self.model, self.optim_cfg, self.total_steps(), fused=fused)
        float8_optimizer_hook(opt, self.model)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def compute_loss(self, batch) -> StepLoss:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        out = self.compute_loss(batch)
        self.optim_step.add(out.loss_sum, out.n_tokens, out.metrics, out.tokens_processed, self.device)
        return out.loss_sum

    def gradient_sync(self, last: bool) -> None:
        """Before a micro-batch's backward: FSDP2's gradient collectives it runs (hardware.parallel.gradient_sync;
        all of them when it is the `last` of its optimizer step). Manual optimisation (GRPO) calls it in its own
        micro-batch loop."""
        set_gradient_sync(self.model, self.parallel_cfg, last)

    def on_before_backward(self, loss):
        # "last" is the loop's own rule (every accumulate-th micro-batch, and an epoch's final one), the one that
        # decides whether the optimizer steps after this backward
        if self.automatic_optimization and self._trainer is not None:
            self.gradient_sync(last=not self.trainer.fit_loop._should_accumulate())

    def step_counters(self) -> list:
        """Per-step sums a subclass adds to the step's one reduction over ranks (host numbers or 0-d device
        tensors), reset here; their reduced values come back, on the host, to `log_step_counters`."""
        return []

    def log_step_counters(self, values: list[float]) -> None:
        """The reduced `step_counters` of an optimizer step (skipped steps included), once the step's values are
        on the host."""

    def _global_step(self) -> int:
        """The optimizer step the guard's messages name (0 before a trainer is attached)."""
        return getattr(self._trainer, "global_step", 0)

    def on_before_optimizer_step(self, optimizer):
        # automatic optimisation: the step's sums normalise and clip the gradients (moxin.optim); with a fused
        # optimizer the values are read in `optimizer_step`, after the step is queued. Manual optimisation (GRPO)
        # calls its OptimizerStep itself.
        if not self.automatic_optimization:
            return
        # a step whose values were never read (optimizer_step overridden)
        self._log_step(self.optim_step.finish(optimizer, self.model.parameters(), self._global_step()), optimizer)
        # Lightning divided each micro loss by `accum` and the DP all-reduce averaged over the data-parallel ranks
        # (world / tp: a tensor-parallel group's ranks share their rows, and their sums count once)
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None) is not None
        tp = tensor_parallel_size(getattr(self._trainer, "strategy", None))
        values = self.optim_step.prepare(
            optimizer, self.model.parameters(), device=self.device, step=self._global_step(),
            divided_by=self.trainer.accumulate_grad_batches * self.trainer.world_size // tp,
            counters=self.step_counters(), grad_scaler=scaler, replicas=tp)
        self._log_step(values, optimizer)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._log_step(self.optim_step.finish(optimizer, self.model.parameters(), self._global_step()), optimizer)

    def _log_step(self, v: StepValues | None, optimizer) -> None:
        """An optimizer step's counters and logs, once its values are on the host (None: nothing to log)."""
        if v is None:
            return
        self.log_step_counters(v.counters)
        if not v.ok:
            self.log("train/nonfinite_steps", _host_number(self.optim_step.nonfinite_steps), on_step=True,
                     on_epoch=False, rank_zero_only=True)
            return
        self.tokens_seen += int(v.n_tokens)
        self.last_step_tokens_processed = int(v.processed)
        denom = max(v.n_tokens, 1.0)
        logs = {"train/loss": v.loss_sum / denom, "train/lr": optimizer.param_groups[0]["lr"],
                "train/target_tokens": float(self.tokens_seen), "train/grad_norm": v.grad_norm}
        if self.optim_step.nonfinite_steps:
            logs["train/nonfinite_steps"] = float(self.optim_step.nonfinite_steps)
        for k, m in v.metrics.items():
            logs[k] = m / denom
        self.log_host(logs)
        self.log("loss", _host_number(logs["train/loss"]), prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 rank_zero_only=True)

    def log_host(self, logs: dict[str, float]) -> None:
        """Log a step's numbers from the host (rank zero, this step). Lightning would turn a Python number into a
        tensor on the stage's device, a blocking copy that waits for the GPU; a CPU tensor stays where it is."""
        self.log_dict({k: _host_number(v) for k, v in logs.items()}, on_step=True, on_epoch=False, prog_bar=False,
                      rank_zero_only=True, sync_dist=False)

    # ---- held-out metrics: sums over the validation pass, reduced over ranks ----------------------------------
    def held_out_start(self, n: int) -> None:
        """Start a validation pass that accumulates `n` sums (see `HeldOutSums`)."""
        if getattr(self, "held_out", None) is None or self.held_out.sums.numel() != n:
            self.held_out = HeldOutSums(n).to(self.device)
        self.held_out.reset()

    def held_out_totals(self) -> torch.Tensor:
        """The pass's sums over all ranks (collective)."""
        with warnings.catch_warnings():  # a rank with no held-out batch still takes part in the reduction
            warnings.filterwarnings("ignore", message=".*compute.*before.*update.*")
            return self.held_out.compute()

    def log_held_out(self, metrics: dict[str, float]) -> None:
        """Log values that every rank already holds reduced (sync_dist=True keeps Lightning from logging one
        rank's value and averages identical numbers, which changes nothing)."""
        if metrics:
            self.log_dict(metrics, sync_dist=True)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # clipping happens in the OptimizerStep, after the token normalisation
        return

    # ---- checkpoints: everything needed to continue as if never stopped --------------------------------------
    def on_save_checkpoint(self, checkpoint):
        moxin = checkpoint.setdefault("moxin", {})
        if self.lora_cfg.enabled:  # `state_dict` kept the adapters only: the frozen base is init_from's
            base = Path(self.init_from)
            moxin["lora"] = dataclasses.asdict(self.lora_cfg) | {
                "base": str(base.resolve() if base.exists() else base)}  # what init_from of this checkpoint merges into
        moxin.update({
            "tokens_seen": self.tokens_seen,
            "nonfinite_steps": self.optim_step.nonfinite_steps,
            # what resume and init_from check: the process count the data / loop state belongs to, and the
            # architecture the weights were trained with
            "world_size": int(self.trainer.world_size) if self._trainer is not None else 1,
            "accumulate_grad_batches": int(self.trainer.accumulate_grad_batches) if self._trainer is not None else 1,
            "model_config": {k: v for k, v in dataclasses.asdict(self.model_cfg).items()},
            "total_steps": int(self.total_steps()) if self._trainer is not None else None,
        } | rng_state())

    def state_dict(self, *args, **kwargs):
        """With LoRA, the adapters only: the checkpoint's model part, saved and loaded (also by FSDP2's distributed
        checkpoint, which reads exactly the keys this names) without the frozen base, which init_from rebuilds."""
        sd = super().state_dict(*args, **kwargs)
        if getattr(self, "lora_cfg", None) is not None and self.lora_cfg.enabled:
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
        if self.lora_cfg.enabled:
            self._check_lora_checkpoint(checkpoint)
        if not st:
            return
        self.tokens_seen = int(st["tokens_seen"])
        if self._trainer is not None and "accumulate_grad_batches" in st:  # resumed on another process count
            saved, now = int(st["accumulate_grad_batches"]), self.trainer.accumulate_grad_batches
            rescale_loop_batches(checkpoint, saved, now)
            rescale = getattr(self.trainer.datamodule, "rescale_loader_state", None)
            if saved != now and rescale is not None:  # a step sampler's position, in this layout's micro-batches
                loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
                for state in loops.get("combined_loader") or []:
                    rescale(state, saved, now)
        if self._trainer is not None and self.trainer.max_steps != -1:
            finish_phase_end(checkpoint)
        self.optim_step.nonfinite_steps = int(st.get("nonfinite_steps", 0))
        restore_rng(st)
        # and again at the first batch: the loaders built after this load draw their seeds from torch's generator,
        # which the uninterrupted run did before the checkpoint was written (LoRA dropout reads it at that step)
        self._rng_at_first_batch = st

    def on_train_batch_start(self, batch, batch_idx):
        """A resumed run's first step starts from the checkpoint's generator states (see `on_load_checkpoint`)."""
        st, self._rng_at_first_batch = self._rng_at_first_batch, None
        if st is not None:
            restore_rng(st)
