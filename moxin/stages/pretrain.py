"""Pretraining: next-token prediction on packed rows whose positions restart at each document.

Batch: {"input_ids": (B, T), "labels": (B, T) shifted targets with -100 where no loss, "positions": (B, T)}.
The same stage serves SFT (labels masked to assistant tokens by the data), which is why it is called
`LanguageModelingStage` too.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moxin.losses import token_cross_entropy
from moxin.stages.base import MoxinStage, StepLoss


class PretrainStage(MoxinStage):
    """Next-token cross-entropy summed over target tokens; the base normalises it over the optimizer step."""

    def _loss_sum(self, batch):
        """(summed next-token loss, target tokens): the chunked cross-entropy runs as the model's head."""
        return self.model(batch["input_ids"], batch["positions"],
                          head=lambda h, w: token_cross_entropy(h, w, batch["labels"], self.loss_chunk_size))

    def compute_loss(self, batch) -> StepLoss:
        loss_sum, n = self._loss_sum(batch)
        return StepLoss(loss_sum=loss_sum, n_tokens=n, tokens_processed=batch["input_ids"].numel())

    def on_validation_epoch_start(self):
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch, batch_idx):
        loss_sum, n = self._loss_sum(batch)
        self._val += torch.stack([loss_sum.double(), n.double()])

    def _val_metrics(self) -> dict[str, float]:
        """Held-out loss per target token over all ranks (and its perplexity)."""
        tot = self._val.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(tot)
        if tot[1] <= 0:
            return {}
        return {"val/loss": float(tot[0] / tot[1]), "val/ppl": float(torch.exp(tot[0] / tot[1]).clamp(max=1e6))}

    def on_validation_epoch_end(self):
        metrics = self._val_metrics()
        if metrics:
            self.log_dict(metrics, rank_zero_only=True, sync_dist=False)


LanguageModelingStage = PretrainStage
