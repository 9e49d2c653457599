"""Plain references for the stages' wiring tests: each stage's loss over a WHOLE optimizer step, written out by
hand from the model's full logits (no chunked head, no stage code, no moxin.losses), and a callback that records
the gradients each optimizer step is taken with.

A stage must give exactly these gradients however the step's rows fall into micro-batches and ranks
(tests/test_stage_wiring.py in one process, tests/test_distributed.py over two). Imported by those tests and by the
torchrun helpers in this folder (as `wiring_reference`: a script's folder is on its sys.path).
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

IGNORE = -100


def token_logps(model, ids, positions, labels, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log p(label) from the model's whole (B, T, V) logits divided by `temperature`; 0 where the label is
    -100."""
    logits = model(ids, positions).float() / temperature  # (B, T, V)
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return logp * (labels != IGNORE)


def token_entropy(model, ids, positions, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) entropy -sum p log p of the next-token distribution from the model's whole logits / `temperature`."""
    logp = (model(ids, positions).float() / temperature).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def lm_loss(model, rows: list[dict]) -> torch.Tensor:
    """Next-token cross-entropy summed over every target token of the step's rows, divided by their number."""
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    pos = torch.stack([r["positions"] for r in rows])
    logits = model(ids, pos).float()
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE,
                            reduction="sum")
    return total / (labels != IGNORE).sum()


def pair_logps(model, pairs: list[dict], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(P,) summed log-probs of the `side` ("chosen" / "rejected") answers and (P,) their token counts."""
    ids = torch.stack([p[f"{side}_input_ids"] for p in pairs])
    labels = torch.stack([p[f"{side}_labels"] for p in pairs])
    pos = torch.stack([p[f"{side}_positions"] for p in pairs])
    return token_logps(model, ids, pos, labels).sum(-1), (labels != IGNORE).sum(-1)


def dpo_loss(policy, reference, pairs: list[dict], loss_type: str, beta: float, label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5, sft_weight: float = 0.0) -> torch.Tensor:
    """The mean over the step's pairs of the preference loss, from the papers' formulas: DPO (summed log-ratios),
    dpo_norm (length-averaged), IPO (squared, averaged), SimPO (reference-free, averaged, minus gamma); cDPO's
    label smoothing; plus sft_weight x the chosen answer's NLL per token."""
    pc, lc = pair_logps(policy, pairs, "chosen")
    pr, lr = pair_logps(policy, pairs, "rejected")
    if loss_type == "simpo":
        z = beta * (pc / lc - pr / lr) - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    else:
        with torch.no_grad():
            rc, _ = pair_logps(reference, pairs, "chosen")
            rr, _ = pair_logps(reference, pairs, "rejected")
        chosen, rejected = pc - rc, pr - rr
        if loss_type in ("dpo_norm", "ipo"):
            chosen, rejected = chosen / lc, rejected / lr
        h = chosen - rejected
        if loss_type == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    losses = losses - sft_weight * pc / lc
    return losses.mean()


def dpo_margins(policy, reference, pairs: list[dict], beta: float) -> torch.Tensor:
    """(P,) DPO's implicit reward margins beta * ((pc - rc) - (pr - rr)): positive where the policy moved towards
    the chosen answer, relative to the reference, more than towards the rejected one."""
    with torch.no_grad():
        pc, _ = pair_logps(policy, pairs, "chosen")
        pr, _ = pair_logps(policy, pairs, "rejected")
        rc, _ = pair_logps(reference, pairs, "chosen")
        rr, _ = pair_logps(reference, pairs, "rejected")
    return beta * ((pc - rc) - (pr - rr))


def grpo_loss(policy, reference, ids, positions, labels, mask, advantages, aggregation: str, temperature: float,
              constant: float | None = None, kl_coef: float = 0.0, entropy_coef: float = 0.0) -> torch.Tensor:
    """The on-policy GRPO loss of one minibatch (every kept sequence of every rank): the ratio is exactly 1, so
    the surrogate is -A x logp per token with logp's gradient, plus kl_coef x the k1 KL (logp - ref_logp), then
    token (sum / masked tokens), sequence (each sequence's token mean, summed / sequences with a masked token) or
    constant (sum / `constant`) aggregation, minus entropy_coef x the entropy aggregated the same way (verl's
    `pg_loss - entropy_coeff * agg_loss(entropy)`)."""
    logp = token_logps(policy, ids, positions, labels, temperature)
    ratio = torch.exp(logp - logp.detach())  # 1, with the gradient of logp
    per_token = -advantages[:, None] * ratio
    if kl_coef:
        with torch.no_grad():
            ref = token_logps(reference, ids, positions, labels, temperature)
        per_token = per_token + kl_coef * (logp - ref)
    if entropy_coef:
        per_token = per_token - entropy_coef * token_entropy(policy, ids, positions, temperature)
    per_token = per_token * mask
    if aggregation == "token":
        return per_token.sum() / mask.sum()
    if aggregation == "sequence":
        n = mask.sum(1)
        return (per_token.sum(1)[n > 0] / n[n > 0]).sum() / (n > 0).sum()
    return per_token.sum() / constant


def reference_grads(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    """d loss / d parameter, by name."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for n, p in model.named_parameters() if p.requires_grad])
    return dict(zip(names, grads))


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a DTensor (FSDP2 shard; a collective: every rank calls it) or of a plain tensor."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class GradRecorder(L.Callback):
    """Records, for every optimizer step, the gradients the optimizer steps with (after the stage's normalisation
    and clipping; gathered from FSDP2 shards): a hook run after `optimizer.step`, which reads them and does not
    change them. `grads`: one {name: fp64 CPU tensor} a step. Under FSDP2 every rank must hold one (collective)."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, trainer, pl_module):
        for opt in trainer.optimizers:
            opt.register_step_post_hook(lambda *_: self._record(pl_module))

    def _record(self, stage):
        self.grads.append({n: full(p.grad).detach().double().cpu().clone()
                           for n, p in stage.model.named_parameters() if p.grad is not None})


def assert_grads_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str,
                       rtol: float = 2e-4, atol: float = 1e-7) -> None:
    """Every parameter's gradient equal to the reference's (the same names; relative to the whole gradient's size,
    so that nearly-zero entries are compared in absolute terms)."""
    assert sorted(got) == sorted(want), what
    scale = max(float(w.abs().max()) for w in want.values())
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w.double(), rtol=rtol, atol=atol + rtol * scale,
                                   msg=lambda m, n=name: f"{what}: gradient of {n} differs from the reference\n{m}")
