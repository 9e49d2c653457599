"""Supervised fine-tuning: next-token loss on assistant tokens only (Moxin-Instruct via the Tülu 3 recipe).

The loss is PretrainStage's: the data (moxin/data/sft_data.py) already masks every label outside the assistant
turns to -100, so ``token_cross_entropy`` sums over assistant tokens (each answer's content and its eos) and
MoxinStage normalises by the assistant tokens of the whole optimizer step over accumulation and ranks. A
micro-batch with few target tokens therefore weighs exactly its share, never more.

Details: docs/modules.md, "stages/sft.py".
"""

from __future__ import annotations

from moxin.stages.common import validate_before_training
from moxin.stages.pretrain import PretrainStage

__all__ = ["SFTStage"]


class SFTStage(PretrainStage):
    """PretrainStage's loss on assistant-masked labels, plus SFT counters and validation before training.

    Args (besides MoxinStage's):
        validate_at_start: measure held-out loss before the first step (cheap; off for huge val sets).
    """

    def __init__(self, *args, validate_at_start: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.validate_at_start = validate_at_start
        self._sft_acc = [0.0, 0.0, 0.0]  # conversations, truncated, target tokens of the current step (this rank)
        self.truncated_total = 0

    def on_train_start(self):
        if self.validate_at_start and self.trainer.global_step == 0:
            validate_before_training(self)

    def training_step(self, batch, batch_idx):
        # device numbers summed on the device: no host sync per micro-batch (see MoxinStage.step_counters)
        self._sft_acc[0] = self._sft_acc[0] + batch.get("num_conversations", 0)
        self._sft_acc[1] = self._sft_acc[1] + batch.get("num_truncated", 0)
        self._sft_acc[2] = self._sft_acc[2] + (batch["labels"] != -100).sum()
        return super().training_step(batch, batch_idx)

    def step_counters(self) -> list:
        acc, self._sft_acc = self._sft_acc, [0.0, 0.0, 0.0]
        return acc

    def log_step_counters(self, values: list[float]) -> None:
        convs, trunc, tokens = values
        self.truncated_total += int(trunc)
        self.log_host({"sft/conversations": convs, "sft/target_tokens": tokens,
                       "sft/truncated": float(self.truncated_total)})

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["moxin"]["sft_truncated_total"] = self.truncated_total

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        self.truncated_total = int(checkpoint.get("moxin", {}).get("sft_truncated_total", 0))
