"""Pretraining: next-token prediction on packed rows whose positions restart at each document.

Batch: {"input_ids": (B, T), "labels": (B, T) shifted targets with -100 where no loss, "positions": (B, T)}, and
the "doc_bounds" and "label_rows" the base stage computes from the positions and labels before they go to the
device.
The same stage serves SFT (labels masked to assistant tokens by the data), which is why it is called
`LanguageModelingStage` too.
"""

from __future__ import annotations

import torch

from moxin.losses import LabelRows, token_cross_entropy
from moxin.stages.base import MoxinStage, StepLoss


class PretrainStage(MoxinStage):
    """Next-token cross-entropy summed over target tokens; the base normalises it over the optimizer step."""

    def _loss_sum(self, batch):
        """(summed next-token loss, target tokens): the chunked cross-entropy runs as the model's head."""
        return self.model(batch["input_ids"], batch["positions"], doc_bounds=batch.get("doc_bounds"),
                          head=lambda h, w: token_cross_entropy(h, w, batch["labels"], self.loss_chunk_size,
                                                                label_rows=batch.get("label_rows")))

    def label_rows(self, batch: dict) -> LabelRows | None:
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor) and labels.device.type == "cpu" and labels.dim() == 2:
            return LabelRows.from_labels(labels)
        return None

    def compute_loss(self, batch) -> StepLoss:
        loss_sum, n = self._loss_sum(batch)
        return StepLoss(loss_sum=loss_sum, n_tokens=n, tokens_processed=batch["input_ids"].numel())

    def on_validation_epoch_start(self):
        self.held_out_start(2)  # loss sum, target tokens

    def validation_step(self, batch, batch_idx):
        loss_sum, n = self._loss_sum(batch)
        self.held_out.update(torch.stack([loss_sum.double(), n.double()]))

    def _val_metrics(self) -> dict[str, float]:
        """Held-out loss per target token over all ranks (and its perplexity). Collective."""
        tot = self.held_out_totals()
        if tot[1] <= 0:
            return {}
        return {"val/loss": float(tot[0] / tot[1]), "val/ppl": float(torch.exp(tot[0] / tot[1]).clamp(max=1e6))}

    def on_validation_epoch_end(self):
        self.log_held_out(self._val_metrics())


LanguageModelingStage = PretrainStage
