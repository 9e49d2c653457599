"""What the stages share besides the base class: summed log-probs of each row's labelled tokens (DPO's policy
and reference, the reference cache, evaluation) and the held-out pass before the first step (SFT, DPO)."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["sequence_logps", "validate_before_training"]


def sequence_logps(model, input_ids, labels, positions, chunk_size: int = 4096,
                   doc_bounds=None, label_rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled tokens of each row and their counts: ``(B,) fp32, (B,) long``.
    doc_bounds, label_rows: the rows' `DocBounds` and `LabelRows` from the host, if known (each saves the forward
    a device sync)."""
    from moxin.constants import IGNORE_INDEX
    from moxin.losses import token_logprobs

    # the log-probs run as the model's head, inside its forward, where FSDP2 has gathered the output weight
    logp = model(input_ids, positions, doc_bounds=doc_bounds,
                 head=lambda h, w: token_logprobs(h, w, labels, chunk_size, label_rows=label_rows))  # (B, T)
    return logp.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def validate_before_training(stage) -> dict[str, float]:
    """Run the stage's validation hooks over the datamodule's val loader before training; return the metrics.

    The values are written to the logger at step 0 and copied into ``trainer.callback_metrics`` with a
    ``_before`` suffix (so ``summary.json`` holds before and after). Stages implement ``_val_metrics()``.
    """
    trainer = stage.trainer
    dm = getattr(trainer, "datamodule", None)
    loader = dm.val_dataloader() if dm is not None else []
    if not loader:
        return {}
    limit = trainer.limit_val_batches
    n_max = int(limit) if isinstance(limit, int) else None
    ctx = getattr(trainer, "precision_plugin", None)
    stage.on_validation_epoch_start()
    with torch.no_grad(), (ctx.forward_context() if ctx is not None else contextlib.nullcontext()):
        for i, batch in enumerate(loader):
            if n_max is not None and i >= n_max:
                break
            batch = trainer.strategy.batch_to_device(batch)
            stage.validation_step(batch, i)
    metrics = stage._val_metrics()
    if trainer.is_global_zero and stage.logger is not None and metrics:
        stage.logger.log_metrics(metrics, step=0)
    for k, v in metrics.items():
        trainer.callback_metrics[f"{k}_before"] = torch.tensor(v)
    if trainer.is_global_zero and metrics:
        print("before training: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())), flush=True)
    return metrics
