"""Tokens per second and model FLOPs utilisation, logged once per optimizer step on rank zero.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices). Model FLOPs per token are the PaLM count of
`ModelConfig.flops_per_token` (6 x non-embedding parameters + attention), so activation recomputation does
not inflate it. `peak_tflops` comes from the hardware profile (989 for H100/H200 dense bf16); without one,
MFU is not logged.
"""

from __future__ import annotations

import time

import lightning as L
import torch


class Throughput(L.Callback):
    def __init__(self, peak_tflops: float | None = None, window: int = 5):
        self.peak_tflops = peak_tflops
        self.window = window
        self._times: list[tuple[float, int]] = []
        self._last_step = -1
        self.tokens_per_s: float | None = None
        self.mfu: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self._last_step:
            return  # still accumulating
        self._last_step = trainer.global_step
        now = time.perf_counter()
        tokens = pl_module.last_step_tokens_processed
        self._times.append((now, tokens))
        self._times = self._times[-(self.window + 1):]
        if len(self._times) < 2:
            return
        dt = self._times[-1][0] - self._times[0][0]
        tok = sum(t for _, t in self._times[1:])
        if dt <= 0:
            return
        self.tokens_per_s = tok / dt
        logs = {"train/tokens_per_s": self.tokens_per_s}
        if self.peak_tflops:
            seq_len = batch["input_ids"].shape[1] if isinstance(batch, dict) and "input_ids" in batch else 2048
            flops = pl_module.model_cfg.flops_per_token(seq_len)
            self.mfu = self.tokens_per_s * flops / (self.peak_tflops * 1e12 * trainer.world_size)
            logs["train/mfu"] = self.mfu
        # CPU tensors: Lightning would copy Python numbers to the GPU, a blocking copy that waits for the step
        pl_module.log_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in logs.items()}, on_step=True,
                           on_epoch=False, rank_zero_only=True)

    def on_train_epoch_start(self, trainer, pl_module):
        self._times = []  # a new phase may change the sequence length: restart the window
