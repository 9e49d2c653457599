"""Direct preference optimisation and its family (Moxin-Instruct: length-normalised DPO, beta 5, Tülu 3 recipe).

The policy's summed log-probs of the chosen and rejected answers against the reference's, through
``moxin.losses.dpo_loss`` (dpo, dpo_norm, ipo, simpo; optional SFT term); the reference is cached once, a frozen
copy, or (with LoRA) the base with the adapters off. ``compute_loss`` returns sums over pairs, so every pair
weighs the same however pairs fall into micro-batches. Details and the logged metrics: docs/modules.md,
"stages/dpo.py".
"""

from __future__ import annotations

import logging
from dataclasses import asdict

import torch


from moxin.config import DPOLoss, ReferenceMode, parse_option
from moxin.devices import to_device
from moxin.losses import LabelRows, dpo_loss, sft_nll_per_token
from moxin.model import Transformer
from moxin.model.lora import adapters_disabled
from moxin.model.attention import DocBounds
from moxin.stages import refcache
from moxin.distributed import is_sharded, reshard
from moxin.stages.base import MoxinStage, StepLoss
from moxin.stages.common import sequence_logps, validate_before_training

__all__ = ["DPOStage", "REFERENCE_MODES"]

log = logging.getLogger(__name__)
REFERENCE_MODES = tuple(m.value for m in ReferenceMode)
_METRICS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "logp_accuracy", "chosen_logp")


class DPOStage(MoxinStage):
    """Preference optimisation over the shared model core.

    Args (besides MoxinStage's model, optim, parallel, init_from, loss_chunk_size):
        loss_type: ``dpo`` | ``dpo_norm`` | ``ipo`` | ``simpo`` (module docstring, papers there).
        beta: KL strength / inverse temperature. Moxin/Tülu 3: 5 with ``dpo_norm``; 0.1 is usual for ``dpo``.
            Too small: the policy drifts far from the reference; too large: the loss saturates at once.
        label_smoothing: cDPO's assumed label-flip probability (0 trusts the labels; must stay < 0.5).
        simpo_gamma: SimPO's target margin gamma (not gamma/beta); too large degrades generation.
        sft_weight: alpha of the optional SFT term on the chosen answer (0 = off; ~1 in RPO).
        reference: ``cached`` | ``frozen`` | ``none`` (module docstring). ``simpo`` needs none; the others need one.
        ref_cache_dir: where reference caches live (one sub-folder per key; safe to share between runs).
        validate_at_start: measure held-out metrics before the first step (``*_before`` in the summary).
    """

    def __init__(self, *args, loss_type: str = "dpo_norm", beta: float = 5.0, label_smoothing: float = 0.0,
                 simpo_gamma: float = 0.5, sft_weight: float = 0.0, reference: str = "cached",
                 ref_cache_dir: str = "runs/dpo_reference_cache", validate_at_start: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        loss_type = parse_option(DPOLoss, loss_type, "stage.loss_type")
        reference = parse_option(ReferenceMode, reference, "stage.reference")
        if not loss_type.needs_reference and reference is not ReferenceMode.NONE:
            raise ValueError(f"stage.loss_type={loss_type} is reference-free: set stage.reference=none")
        if loss_type.needs_reference and reference is ReferenceMode.NONE:
            raise ValueError(f"stage.loss_type={loss_type} needs a reference model: stage.reference=cached or frozen")
        if not beta > 0:
            raise ValueError(f"stage.beta={beta} must be > 0")
        if sft_weight < 0:
            raise ValueError(f"stage.sft_weight={sft_weight} must be >= 0")
        self.loss_type, self.beta, self.label_smoothing = loss_type, float(beta), float(label_smoothing)
        self.simpo_gamma, self.sft_weight, self.reference = float(simpo_gamma), float(sft_weight), reference
        self.ref_cache_dir, self.validate_at_start = ref_cache_dir, validate_at_start
        self.ref_model: Transformer | None = None
        self._ref_tables: dict[str, dict[str, torch.Tensor]] = {}
        self.ref_cache_info: dict[str, dict] = {}

    # ---- model ----------------------------------------------------------------------------------------------
    def _build_reference(self) -> Transformer:
        """The starting weights as a frozen model, sharded like the policy (used when a resumed run must
        recompute a missing reference cache)."""
        from moxin.distributed import parallelize

        ref = self.frozen_start_copy()
        parallelize(ref, self.parallel_cfg, self.device_mesh if is_sharded(self.trainer.strategy) else None)
        return ref

    def configure_model(self) -> None:
        if self.model is None and self.reference is ReferenceMode.FROZEN and not self.lora_cfg.enabled:
            # built before the policy from the same RNG state, so a random init matches too; the base shards it
            self.ref_model = self.frozen_start_copy()
        super().configure_model()

    # ---- reference log-probs ------------------------------------------------------------------------------------
    def cache_parts(self, split: str) -> dict:
        """Everything the cached reference values depend on (hashed into the cache key)."""
        dm = self.trainer.datamodule
        return {
            "reference": refcache.checkpoint_identity(self.init_from, seed=torch.initial_seed()),
            "model": asdict(self.model_cfg),
            "data": dm.reference_identity(split),
            "loss_type": self.loss_type,
            "numerics": {"param_dtype": str(next(self.model.parameters()).dtype),
                         "precision": str(self.trainer.precision),
                         "fsdp_param_dtype": getattr(self.parallel_cfg, "fsdp_param_dtype", None)},
        }

    def on_fit_start(self):
        if self.reference is not ReferenceMode.CACHED or self.lora_cfg.enabled:
            return
        dm = self.trainer.datamodule
        splits = ["train"] + (["val"] if dm.val_set is not None else [])
        for split in splits:
            parts = self.cache_parts(split)
            n = len(dm.split_set(split))
            tables, reused, path = refcache.load_or_build(self.ref_cache_dir, parts, n,
                                                          lambda: self._compute_reference(split, n))
            self._ref_tables[split] = tables
            self.ref_cache_info[split] = {"path": str(path), "reused": reused, "pairs": n}
            if self.trainer.is_global_zero:
                print(f"DPO reference log-probs ({split}, {n} pairs): {'reused' if reused else 'computed'} {path}",
                      flush=True)

    def _compute_reference(self, split: str, n: int) -> dict[str, torch.Tensor]:
        # Before the first step the policy holds the starting weights: use it. When resuming, the policy has
        # moved, so the reference is rebuilt from init_from.
        resuming = bool(getattr(self.trainer, "ckpt_path", None)) or self.trainer.global_step > 0
        if resuming and not self.init_from:
            raise RuntimeError("resuming a DPO run whose reference cache is missing, and init_from is not set: the "
                               "random starting weights cannot be rebuilt. Restore the cache folder or start anew")
        model = self._build_reference().to(self.device) if resuming else self.model
        ctx = self.trainer.precision_plugin.forward_context
        return refcache.compute_reference_logps(model, self.trainer.datamodule.reference_dataloader(split), n,
                                                self.device, self.loss_chunk_size, ctx)

    def _reference_logps(self, batch, split: str):
        if self.reference is ReferenceMode.NONE:
            return None, None
        if self.lora_cfg.enabled:  # the starting weights are the base with the adapters off: no second model, no cache
            with torch.no_grad(), adapters_disabled(self.model):
                ids, labels, pos = self._cat(batch)
                logps, _ = sequence_logps(self.model, ids, labels, pos, self.loss_chunk_size,
                                          batch.get("doc_bounds"), batch.get("label_rows"))
            P = batch["pair_index"].numel()
            return logps[:P], logps[P:]
        if self.reference is ReferenceMode.FROZEN:
            with torch.no_grad():
                ids, labels, pos = self._cat(batch)
                logps, _ = sequence_logps(self.ref_model, ids, labels, pos, self.loss_chunk_size,
                                          batch.get("doc_bounds"), batch.get("label_rows"))
                reshard(self.ref_model)
            P = batch["pair_index"].numel()
            return logps[:P].detach(), logps[P:].detach()
        table = self._ref_tables[split]
        # the pairs' rows of the host's table, by the index the batch had on the host (reading the device's copy
        # would wait for the GPU), sent without blocking
        idx = batch["pair_index_host"] if "pair_index_host" in batch else batch["pair_index"].cpu()
        rows = torch.stack([table["chosen_logps"][idx], table["rejected_logps"][idx]]).to(torch.float32)
        rows = to_device(rows, self.device)
        return rows[0], rows[1]

    # ---- loss -------------------------------------------------------------------------------------------------
    @staticmethod
    def _cat(batch):
        return (torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]),
                torch.cat([batch["chosen_labels"], batch["rejected_labels"]]),
                torch.cat([batch["chosen_positions"], batch["rejected_positions"]]))

    def doc_bounds(self, batch: dict):
        """The forward runs on the chosen rows and then the rejected ones, as `_cat` joins them."""
        if isinstance(batch.get("chosen_positions"), torch.Tensor) and batch["chosen_positions"].device.type == "cpu":
            return DocBounds.from_positions(torch.cat([batch["chosen_positions"], batch["rejected_positions"]]))
        return None

    def label_rows(self, batch: dict) -> LabelRows | None:
        """Of the chosen rows followed by the rejected ones, as `_cat` joins them."""
        if isinstance(batch.get("chosen_labels"), torch.Tensor) and batch["chosen_labels"].device.type == "cpu":
            return LabelRows.from_labels(torch.cat([batch["chosen_labels"], batch["rejected_labels"]]))
        return None

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # the pair index also stays on the host, as a list Lightning leaves where it is: the cached reference
        # log-probs are looked up on the host
        if isinstance(batch, dict) and isinstance(batch.get("pair_index"), torch.Tensor) \
                and batch["pair_index"].device.type == "cpu" and "pair_index_host" not in batch:
            batch = {**batch, "pair_index_host": batch["pair_index"].tolist()}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _pair_terms(self, batch, split: str):
        ids, labels, pos = self._cat(batch)  # (2P, T): chosen rows first, then rejected
        rows = batch.get("label_rows")
        logps, lengths = sequence_logps(self.model, ids, labels, pos, self.loss_chunk_size,
                                        batch.get("doc_bounds"), rows)  # (2P,)
        P = batch["pair_index"].numel()
        pc, pr, lc, lr = logps[:P], logps[P:], lengths[:P], lengths[P:]
        # the same counts from the host, where the loss checks them without reading the device
        cc, cr = (rows.counts[:P], rows.counts[P:]) if rows is not None else (lc, lr)
        rc, rr = self._reference_logps(batch, split)
        out = dpo_loss(pc, pr, rc, rr, beta=self.beta, loss_type=self.loss_type, chosen_lengths=cc,
                       rejected_lengths=cr, label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma)
        losses = out.losses
        if self.sft_weight > 0:
            losses = losses + self.sft_weight * sft_nll_per_token(pc, lc)
        stats = {
            "loss": out.losses.detach().sum(), "chosen_reward": out.chosen_rewards.sum(),
            "rejected_reward": out.rejected_rewards.sum(), "margin": out.margins.sum(),
            "accuracy": out.accuracies.sum(),
            "logp_accuracy": ((pc / lc.clamp(min=1)) > (pr / lr.clamp(min=1))).float().sum().detach(),
            "chosen_logp": (pc / lc.clamp(min=1)).detach().sum(),
        }
        return losses.sum(), P, stats, int(ids.numel())

    def compute_loss(self, batch) -> StepLoss:
        loss_sum, P, stats, processed = self._pair_terms(batch, "train")
        return StepLoss(loss_sum=loss_sum, n_tokens=torch.tensor(P), tokens_processed=processed,
                        metrics={f"dpo/{k}": v for k, v in stats.items()})

    def on_train_start(self):
        if self.validate_at_start and self.trainer.global_step == 0:
            validate_before_training(self)

    # ---- validation on held-out pairs -------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self.held_out_start(len(_METRICS) + 1)  # the metric sums, then the pair count

    def validation_step(self, batch, batch_idx):
        if batch["pair_index"].numel() == 0:
            return
        with torch.no_grad():
            _, P, stats, _ = self._pair_terms(batch, "val")
        self.held_out.update(torch.stack([torch.as_tensor(stats[k], device=self.device).double().reshape(())
                                          for k in _METRICS] + [torch.tensor(float(P), device=self.device,
                                                                             dtype=torch.float64)]))

    def _val_metrics(self) -> dict[str, float]:
        tot = self.held_out_totals()  # collective: summed over ranks
        n = float(tot[-1])
        if n <= 0:
            return {}
        v = {k: float(tot[i]) / n for i, k in enumerate(_METRICS)}
        return {"val/loss": v["loss"], "val/dpo_loss": v["loss"], "val/dpo_accuracy": v["accuracy"],
                "val/dpo_margin": v["margin"], "val/chosen_reward": v["chosen_reward"],
                "val/rejected_reward": v["rejected_reward"], "val/logp_accuracy": v["logp_accuracy"],
                "val/chosen_logp": v["chosen_logp"]}

    def on_validation_epoch_end(self):
        self.log_held_out(self._val_metrics())

    def configure_optimizers(self):
        if self.ref_model is not None:  # the frozen reference is never optimised (no requires_grad anyway)
            assert not any(p.requires_grad for p in self.ref_model.parameters())
        return super().configure_optimizers()
