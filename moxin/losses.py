"""Loss functions for every moxin stage: pure tensor code, no Lightning, no model code.

Three families live here:

Details: docs/modules.md, "losses.py".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moxin.config import Aggregation, DPOLoss, KLEstimator, parse_option
from moxin.constants import IGNORE_INDEX
from moxin.devices import to_device
from moxin.numerics import mm_f32


__all__ = [
    "token_logprobs",
    "token_logprobs_and_entropy",
    "token_cross_entropy",
    "DPOOutput",
    "DPO_LOSS_TYPES",
    "dpo_loss",
    "sft_nll_per_token",
    "group_advantages",
    "zero_std_groups",
    "KL_ESTIMATORS",
    "kl_penalty",
    "completion_mask",
    "policy_loss",
]


# --------------------------------------------------------------------------------------------------------------
# Chunked token log-probs and cross-entropy
# --------------------------------------------------------------------------------------------------------------


def _label_logp_lse(logits: torch.Tensor, labels: torch.Tensor, temperature: float, entropy: bool = False):
    """(log p(label), logsumexp) per row of a (c, V) chunk of logits, in fp32 (the eager form); with `entropy`,
    also each row's entropy -sum p log p (from the same logits: no second product)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    out = (z.gather(1, labels[:, None]).squeeze(1) - lse, lse)
    return out + (_entropy_from(z, lse),) if entropy else out


def _entropy_from(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) per row from the scaled logits z and their logsumexp: lse - sum p z (fp32)."""
    return lse - (torch.exp(z - lse[:, None]) * z).sum(-1)


def _logits_grad(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
                 temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """row_scale * (onehot(labels) - softmax(logits / temperature)) per row, computed in fp32, returned in `dtype`
    (the eager form: in place on one fp32 block)."""
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    g = torch.exp(z.sub_(lse[:, None]) if z is not logits else z - lse[:, None]).neg_()
    g.scatter_add_(1, labels[:, None], torch.ones_like(g[:, :1]))
    return g.mul_(row_scale[:, None]).to(dtype)


def _label_logp_lse_fused(logits: torch.Tensor, labels: torch.Tensor, temperature, entropy: bool = False):
    """:func:`_label_logp_lse` written for Inductor (compiled on CUDA): one read of the chunk's logits.
    `temperature`: a float, or (compiled) a 0-d tensor, so that no value is baked into the compiled kernel."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    out = (z.gather(1, labels[:, None]).squeeze(1) - lse, lse)
    return out + (_entropy_from(z, lse),) if entropy else out


def _logits_grad_fused(logits: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
                       temperature, dtype: torch.dtype) -> torch.Tensor:
    """:func:`_logits_grad` written for Inductor (compiled on CUDA): one read of the logits, one write of the
    result, where the eager form makes six passes over an fp32 block."""
    p = torch.exp(logits.float() / temperature - lse[:, None])
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    return ((hit.to(p.dtype) - p) * row_scale[:, None]).to(dtype)


def _label_logp_lse_grad_fused(logits: torch.Tensor, labels: torch.Tensor, temperature, dtype: torch.dtype,
                               entropy: bool = False):
    """:func:`_label_logp_lse_fused` plus the chunk's logits gradient before the row weights,
    ``onehot(labels) - softmax(logits / temperature)`` in `dtype`: what the backward would otherwise recompute
    the logits for. With `entropy`, each row's entropy last."""
    z = logits.float() / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    hit = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    g = (hit.to(z.dtype) - p).to(dtype)
    out = (z.gather(1, labels[:, None]).squeeze(1) - lse, lse, g)
    return out + (lse - (p * z).sum(-1),) if entropy else out


COMPILE_HEAD = True
"""Compile the loss head's per-chunk elementwise work on CUDA, and keep each chunk's logits gradient from the
forward there when the products are 16-bit (:func:`_keeps_logit_grads`); the eager forms elsewhere. A switch for
A/B runs and debugging; the products are cuBLAS either way."""
_compiled: dict = {}
COMPILE_BACKEND = "inductor"  # torch.compile's backend for the head kernels (tests: aot_eager on the CPU)


def _compiles_head(device: torch.device) -> bool:
    """Whether the head's per-chunk kernels are compiled on `device` (CUDA, unless COMPILE_HEAD is off)."""
    return device.type == "cuda" and COMPILE_HEAD


def _compiled_args(device: torch.device, temperature: float, *rows: torch.Tensor):
    """What a compiled head kernel is called with on `device`: the temperature as a 0-d fp32 tensor there (a float
    argument is a constant of the first compile: another value recompiled, as the pretraining bench's 1.0 after
    GRPO's 0.6 did), and the chunk's row dimension of `rows` marked dynamic, so that one kernel serves every row
    count from the first call (a chunk of one row is still its own). Elsewhere (eager kernels) the float as is."""
    if not _compiles_head(device):
        return temperature
    for t in rows:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return torch.full((), temperature, dtype=torch.float32, device=device)


def _head_kernels(device: torch.device):
    """The per-chunk (log p(label), logsumexp) and logits-gradient functions for `device`: compiled on CUDA
    (Inductor fuses each into one pass over the chunk; row counts vary between chunks and batches, so the second
    shape compiles a kernel for any number of rows), eager elsewhere (no C++ compiler needed on CPUs)."""
    if not _compiles_head(device):
        return _label_logp_lse, _logits_grad
    if "fwd" not in _compiled:  # each key on its own: the kept-gradient forward may have been compiled first
        _compiled["fwd"] = torch.compile(_label_logp_lse_fused, backend=COMPILE_BACKEND)
        _compiled["bwd"] = torch.compile(_logits_grad_fused, backend=COMPILE_BACKEND)
    return _compiled["fwd"], _compiled["bwd"]


def _keeps_logit_grads(device: torch.device, mm_dtype: torch.dtype) -> bool:
    """Whether the forward keeps each chunk's 16-bit logits gradient for the backward (R x V x 2 bytes between the
    two: 0.5 GiB for 8192 rows of a 32000 vocabulary) instead of the backward recomputing the chunk's logits (one
    more (R, D) x (D, V) product; docs/performance.md, "The loss head compiled")."""
    return device.type == "cuda" and COMPILE_HEAD and mm_dtype in (torch.bfloat16, torch.float16)


KEEP_LOGIT_GRADS_MAX_BYTES = 2**30
"""The most memory the kept logits gradients may hold between the forward and the backward (R x V 16-bit values
over all of a forward's rows). A forward over more rows recomputes its logits in the backward instead, so the
head's extra memory stays one chunk's however long the rows get: 1 GiB keeps 16384 rows of a 32000 vocabulary
(micro-batch 4 x 4096); a 32K-token row recomputes."""


def _forward_with_grad(device: torch.device):
    if not _compiles_head(device):
        return _label_logp_lse_grad_fused  # eager: tests drive the kept-gradient path on the CPU
    if "fwd_grad" not in _compiled:
        _compiled["fwd_grad"] = torch.compile(_label_logp_lse_grad_fused, backend=COMPILE_BACKEND)
    return _compiled["fwd_grad"]


def _add_weight_grad(grad_w: torch.Tensor | None, g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_w + g.T @ h in fp32 (grad_w None: the first chunk). On CUDA with 16-bit g and h the product
    accumulates into fp32 in cuBLAS's epilogue (`out_dtype`): no 16-bit rounding of each chunk's product and no
    separate cast and add over the (V, D) block."""
    if g.is_cuda and g.dtype in (torch.bfloat16, torch.float16):
        if grad_w is None:
            return torch.mm(g.T, h, out_dtype=torch.float32)
        return torch.addmm(grad_w, g.T, h, out_dtype=torch.float32)
    prod = (g.T @ h).float()
    return prod if grad_w is None else grad_w.add_(prod)


def _chunked_head_backward(ctx, hidden: torch.Tensor, weight: torch.Tensor, chunk_grad):
    """The chunked head's backward (:class:`_ChunkedLabelLogProbs`, log-probs and entropies alike): chunk by
    chunk of rows (`ctx.chunk_size`), the head's logits gradient ``g, s = chunk_grad(i, start, end, h, w)``
    (g (rows, V) in `ctx.mm_dtype`; s: a (rows, 1) scale of each row, or None) becomes grad_h = (g @ W) s and
    grad_w += g^T (s h), the products in `ctx.mm_dtype`, grad_w summed in fp32. Returns (grad_h, grad_w), each
    None when `ctx.needs_input_grad` does not ask for it."""
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = None
    w, hid = weight.to(ctx.mm_dtype), hidden.to(ctx.mm_dtype)  # once, not per chunk (no copy if equal)
    for i, start in enumerate(range(0, hidden.shape[0], ctx.chunk_size)):
        end = start + ctx.chunk_size
        h = hid[start:end]
        g, s = chunk_grad(i, start, end, h, w)
        if s is not None:
            if need_h:
                grad_h[start:end] = mm_f32(g, w) * s
            if need_w:
                grad_w = _add_weight_grad(grad_w, g, (h * s).to(h.dtype))
            continue
        if need_h:
            grad_h[start:end] = g @ w
        if need_w:
            grad_w = _add_weight_grad(grad_w, g, h)
    if need_w:
        grad_w = torch.zeros_like(weight) if grad_w is None else grad_w.to(weight.dtype)
    return grad_h, grad_w


class _ChunkedLabelLogProbs(torch.autograd.Function):
    """log softmax(h @ W.T / temperature)[y] for selected rows, one chunk of rows at a time.

    Forward keeps only the (R,) result and the per-row logsumexp; backward recomputes each chunk's logits, so peak
    extra memory is one ``(chunk_size, V)`` fp32 block in both passes (this is what checkpointing per chunk would
    give, without running the forward twice for the rows' values).

    d logp_r / d logits_r = onehot(y_r) - softmax(logits_r); logits = h W^T / temperature.

    Precision: the products run in the dtype the forward's logits came from (the autocast dtype, else the
    weight's), in backward too: autocast is off during backward, and without this the three backward products
    of each chunk ran in fp32 (under bf16-mixed, hidden states and master weights are fp32), several times
    slower than the forward. Softmax, logsumexp and the weight-gradient sum stay fp32. On CUDA the elementwise
    work of each chunk is compiled (:func:`_head_kernels`), and with 16-bit products the forward keeps each
    chunk's logits gradient for the backward instead of the backward recomputing the logits
    (:func:`_keeps_logit_grads`: R x V 16-bit values held between the passes, up to
    `KEEP_LOGIT_GRADS_MAX_BYTES`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, temperature: float, grad_wanted: bool,
                with_entropy: bool = False, entropy_grad: bool = False):
        # hidden (R, D), labels (R,); grad_wanted: grad mode was on and hidden or weight requires grad.
        # Returns (log-probs (R,), entropies (R,), or an empty tensor without `with_entropy`); the entropies are
        # differentiable with `entropy_grad` (the backward then recomputes each chunk's logits for both terms).
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(out)
        ent = torch.empty_like(out) if with_entropy else out.new_empty(0)
        dev = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        keep = (grad_wanted and not entropy_grad and _keeps_logit_grads(hidden.device, mm_dtype)
                and hidden.shape[0] * weight.shape[0] * mm_dtype.itemsize <= KEEP_LOGIT_GRADS_MAX_BYTES)
        fwd = _forward_with_grad(hidden.device) if keep else _head_kernels(hidden.device)[0]
        grads = []
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits, lab = hidden[start:end] @ weight.T, labels[start:end]
            t = _compiled_args(hidden.device, temperature, logits, lab)
            res = fwd(logits, lab, t, *([mm_dtype] if keep else []), entropy=with_entropy)
            out[start:end], lse_all[start:end] = res[0], res[1]
            if with_entropy:
                ent[start:end] = res[-1]
            if keep:
                grads.append(res[2])
        ctx.save_for_backward(hidden, weight, labels, lse_all, ent)
        ctx.logit_grads = grads if keep else None  # intermediates, not inputs or outputs: held on ctx
        ctx.mm_dtype = mm_dtype
        ctx.chunk_size = chunk_size
        ctx.temperature = temperature
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        ctx.set_materialize_grads(False)  # an unused output's gradient comes as None, not as zeros
        return out, ent

    @staticmethod
    def backward(ctx, grad_out, grad_ent):  # grad_out (R,); grad_ent (R,) with entropy_grad, else None
        hidden, weight, labels, lse_all, ent = ctx.saved_tensors
        t = ctx.temperature
        _, logits_grad = _head_kernels(hidden.device)
        if grad_out is None:
            grad_out = torch.zeros_like(lse_all)
        row_scale = grad_out.float() / t  # d logits / d (logits / t) folded into each row's weight
        kept, ctx.logit_grads = ctx.logit_grads, None

        def chunk_grad(i, start, end, h, w):
            if grad_ent is not None:
                # both terms from one recomputed chunk, z = logits / t, p = softmax(z), H its entropy:
                # d logp_y / dz = onehot(y) - p; dH / dz = -p (log p + H); each row weighted by its gradient
                logp = (h @ w.T).float().div_(t).sub_(lse_all[start:end, None])  # log p, in place (fp32)
                a, b = row_scale[start:end, None], grad_ent[start:end, None].float() / t
                p = logp.exp()
                g = logp.add_(ent[start:end, None]).mul_(b).add_(a).mul_(p).neg_()  # -p (a + b (log p + H))
                g.scatter_add_(1, labels[start:end, None], a)  # + a onehot(y)
                return g.to(ctx.mm_dtype), None
            if kept is not None:
                # the forward's (onehot - softmax); the row weights commute out of both products:
                # grad_h = diag(s) (g w), grad_w = g^T (diag(s) h)
                g = kept[i]
                kept[i] = None  # free each block once used
                return g, row_scale[start:end, None]
            logits, lse, lab, scale = h @ w.T, lse_all[start:end], labels[start:end], row_scale[start:end]
            return logits_grad(logits, lse, lab, scale, _compiled_args(h.device, t, logits, lse, lab, scale),
                               ctx.mm_dtype), None

        grad_h, grad_w = _chunked_head_backward(ctx, hidden, weight, chunk_grad)
        return grad_h, grad_w, None, None, None, None, None, None


def _check_hidden_weight_labels(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be (B, T, D) final-normed hidden states, got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(
            f"weight must be the lm_head (V, D) with D = hidden.shape[-1] = {hidden.shape[2]}, "
            f"got shape {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) = {tuple(hidden.shape[:2])} (already shifted, -100 = ignore), "
            f"got shape {tuple(labels.shape)}"
        )


@dataclass(frozen=True)
class LabelRows:
    """Where a (B, T) batch's targets are, found on the host before the batch goes to the GPU, so that the loss
    head selects its rows without reading the device: a `nonzero` over the labels and the check that every target
    is a vocabulary id each stop the host until the GPU has caught up, and leave it idle while the host then
    launches the head. Build with `from_labels` from the host's labels; `to` moves it with the batch.

    shape: the labels' (B, T). rows: (R,) long, flat positions ``b * T + t`` of the labels that are not -100.
    targets: (R,) long, those labels. lo, hi: the smallest and largest target (0 and -1 when R is 0).
    counts: the number of targets of each row, on the host."""

    shape: tuple[int, int]
    rows: torch.Tensor
    targets: torch.Tensor
    lo: int
    hi: int
    counts: tuple[int, ...]

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> LabelRows:
        """From (B, T) labels on the host (on a GPU this would read the device, which is what it exists to avoid)."""
        if labels.dim() != 2:
            raise ValueError(f"labels must be (batch, seq_len), got shape {tuple(labels.shape)}")
        flat = labels.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        targets = flat[rows]
        lo, hi = (int(targets.min()), int(targets.max())) if rows.numel() else (0, -1)
        counts = tuple((labels != IGNORE_INDEX).sum(1).tolist())
        return cls((int(labels.shape[0]), int(labels.shape[1])), rows, targets, lo, hi, counts)

    def to(self, device, non_blocking: bool = False) -> LabelRows:
        """A copy on `device` (page-locked first when copied to a GPU without blocking)."""
        if self.rows.device == torch.device(device):
            return self
        move = (lambda t: to_device(t, device)) if non_blocking else (lambda t: t.to(device))
        return dataclasses.replace(self, rows=move(self.rows), targets=move(self.targets))


def _select_targets(labels: torch.Tensor, V: int, label_rows: LabelRows | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, targets) of the flattened labels that are not -100, every target checked to be in [0, V)."""
    if label_rows is not None:
        if label_rows.shape != tuple(labels.shape):
            raise ValueError(f"label_rows were built for labels of shape {label_rows.shape}, these are "
                             f"{tuple(labels.shape)}: build them from the same batch (LabelRows.from_labels)")
        if label_rows.rows.device != labels.device:
            raise ValueError(f"label_rows are on {label_rows.rows.device}, the labels on {labels.device}: move them "
                             "with the batch (LabelRows.to)")
        if label_rows.lo < 0 or label_rows.hi >= V:
            raise ValueError(
                f"labels contain ids outside [0, {V}) that are not -100 (smallest {label_rows.lo}, largest "
                f"{label_rows.hi}); check the tokenizer's vocab size against the model config and the padding label")
        return label_rows.rows, label_rows.targets
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)  # (R,)
    selected = flat_labels[rows]
    if rows.numel() and bool(((selected < 0) | (selected >= V)).any()):
        bad = selected[(selected < 0) | (selected >= V)][:5].tolist()
        raise ValueError(
            f"labels contain ids outside [0, {V}) that are not -100 (first: {bad}); "
            "check the tokenizer's vocab size against the model config and the padding label"
        )
    return rows, selected


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    label_rows: LabelRows | None = None,
) -> torch.Tensor:
    """Per-token log p(label) under ``softmax(hidden @ weight.T / temperature)``, 0 where the label is -100.

    Args:
        hidden: (B, T, D) final-normed hidden states (``model(..., return_hidden=True)``), any float dtype.
        weight: (V, D) the lm_head (``model.output.weight``).
        labels: (B, T) long, already shifted (``labels[:, t]`` is the target of position t), -100 = ignore.
        chunk_size: rows (tokens) per chunk. Each chunk materialises a (chunk_size, V) fp32 block in forward and
            again in backward. Too large defeats the purpose (OOM at long context: 8192 x 32000 x 4 B = 1 GiB);
            too small (< ~128) leaves the GPU underfed by tiny matmuls.
        temperature: divides the logits. GRPO must use the SAMPLING temperature here (Moxin: 0.6), otherwise
            the importance ratio compares two different distributions and is biased from step one.
        label_rows: `LabelRows` of ``labels``, built on the host: the head then reads nothing from the device.

    Returns:
        (B, T) fp32 log-probs; differentiable w.r.t. ``hidden`` and ``weight``. Only rows with a label are
        computed at all, so prompt and padding tokens cost nothing.
    """
    return _token_logprobs(hidden, weight, labels, chunk_size, temperature, label_rows, False)[0]


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    label_rows: LabelRows | None = None,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`token_logprobs` and, from the same chunks of logits, the entropy of every labelled position's
    next-token distribution (B, T) fp32, 0 where the label is -100: one (tokens x dim x vocab) product a chunk for
    both. The log-probs are differentiable as :func:`token_logprobs`'s; the entropies without gradient (GRPO's
    diagnostic: entropy collapsing towards 0 means the policy stopped exploring) unless `entropy_grad` (GRPO's
    entropy bonus, verl's `entropy_coeff`: the backward then recomputes each chunk's logits once for both
    gradients, instead of keeping the log-probs' logits gradient from the forward)."""
    return _token_logprobs(hidden, weight, labels, chunk_size, temperature, label_rows, True, entropy_grad)


def _token_logprobs(hidden, weight, labels, chunk_size, temperature, label_rows, with_entropy: bool,
                    entropy_grad: bool = False):
    """(log-probs (B, T), entropies (B, T) or None): the shared body of the two functions above."""
    _check_hidden_weight_labels(hidden, weight, labels)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, D = hidden.shape
    V = weight.shape[0]
    rows, selected = _select_targets(labels, V, label_rows)
    h = hidden.reshape(B * T, D).index_select(0, rows)  # (R, D)
    grad_wanted = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    logp_rows, ent_rows = _ChunkedLabelLogProbs.apply(h, weight, selected, int(chunk_size), float(temperature),
                                                      grad_wanted, with_entropy, entropy_grad and grad_wanted)
    out = torch.zeros(B * T, dtype=torch.float32, device=hidden.device)
    out = out.index_put((rows,), logp_rows)  # out-of-place so autograd routes the gradient to logp_rows
    if not with_entropy:
        return out.view(B, T), None
    ent = torch.zeros(B * T, dtype=torch.float32, device=hidden.device).index_put((rows,), ent_rows)
    return out.view(B, T), ent.view(B, T)


def token_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int = 1024,
    label_rows: LabelRows | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over target tokens, in chunks, fp32 logits per chunk.

    Equals ``F.cross_entropy(hidden @ weight.T, labels, reduction="sum", ignore_index=-100)`` (computed in fp32)
    without holding the (B*T, V) logits. Shapes and ``label_rows`` as in :func:`token_logprobs`.

    Returns:
        ``(loss_sum, n_tokens)``: a 0-dim fp32 tensor and a 0-dim long tensor. Divide by the number of target
        tokens summed over gradient accumulation and ranks, NOT by this micro-batch's ``n_tokens`` (the
        per-micro-batch mean over-weights tokens of short batches). ``n_tokens`` may be 0 (all labels -100):
        then ``loss_sum`` is 0 with a zero gradient, never NaN.
    """
    logp = token_logprobs(hidden, weight, labels, chunk_size=chunk_size, label_rows=label_rows)
    n_tokens = (labels != IGNORE_INDEX).sum()
    return -logp.sum(), n_tokens


# --------------------------------------------------------------------------------------------------------------
# DPO family
# --------------------------------------------------------------------------------------------------------------

DPO_LOSS_TYPES = tuple(m.value for m in DPOLoss)


@dataclass
class DPOOutput:
    """Per-pair results of :func:`dpo_loss`; all tensors are (P,) for P pairs.

    ``losses`` carries the gradient: the stage sums it and divides by the number of pairs across accumulation and
    ranks. ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards (detached): ``beta * log-ratio``
    (for ``dpo_norm`` / ``ipo`` the length-averaged log-ratio; for ``simpo`` ``beta * average log-prob``).
    ``margins = chosen_rewards - rejected_rewards``; ``accuracies`` is 1.0 where the margin is > 0.
    Log ``dpo/margin`` and ``dpo/accuracy``: a loss stuck at log 2 = 0.693 with zero margins means the policy
    equals the reference (e.g. a forgotten optimizer step or a wrong reference cache).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    accuracies: torch.Tensor


def _lengths(name: str, lengths: torch.Tensor | None, like: torch.Tensor, loss_type: str) -> torch.Tensor:
    if lengths is None:
        raise ValueError(
            f"loss_type={loss_type!r} averages log-probs over tokens: pass {name} (number of target tokens of "
            "each answer, shape (P,))"
        )
    host = isinstance(lengths, (list, tuple))  # counts the host knows: checked without reading a tensor
    counts = lengths
    lengths = torch.as_tensor(lengths)
    if lengths.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (one count per pair), got {tuple(lengths.shape)}")
    if [n for n in counts if n <= 0] if host else bool((lengths <= 0).any()):
        bad = ([i for i, n in enumerate(counts) if n <= 0] if host
               else (lengths <= 0).nonzero().squeeze(1).tolist())[:5]
        raise ValueError(
            f"{name} has zero-length answers at pair indices {bad}: a pair whose answer has no target tokens "
            "cannot be length-normalised; drop such pairs in the data pipeline (check truncation to max_length "
            "and the label mask)"
        )
    if lengths.device != like.device:
        lengths = to_device(lengths, like.device)
    return lengths.to(like.dtype)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: DPOLoss | str = DPOLoss.DPO,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> DPOOutput:
    """Preference losses over per-sequence SUMMED log-probs (sum of :func:`token_logprobs` over answer tokens).

    All inputs are (P,) for P pairs; lengths are the answer token counts (P,).

    loss_type:
      * ``"dpo"`` — Rafailov et al. 2023 (arXiv 2305.18290), sigmoid loss:
        ``h = (pc - rc) - (pr - rr)``; ``loss = -(1-ls) logsigmoid(beta h) - ls logsigmoid(-beta h)``.
      * ``"dpo_norm"`` — the same loss on length-AVERAGED log-probs (policy and reference both divided by their
        answer's token count), as open-instruct's ``dpo_norm`` (its reference cache is averaged too). Moxin and
        Tülu 3 use it with beta = 5: averaged log-ratios are ~length-times smaller than summed ones, so beta must be
        correspondingly larger; beta 0.1 here trains almost nothing, beta 5 with plain ``dpo`` saturates at once.
      * ``"ipo"`` — Azar et al. 2023 (arXiv 2310.12036): ``loss = (h - 1/(2 beta))^2`` with length-averaged
        log-ratios (as TRL). Regresses the margin to a fixed target instead of pushing it to infinity; a tiny beta
        means a huge target margin 1/(2 beta).
      * ``"simpo"`` — Meng et al. 2024 (arXiv 2405.14734), reference-free: ``loss = -logsigmoid(beta (pc/|c| -
        pr/|r|) - gamma)`` with ``gamma = simpo_gamma``, label smoothing as in ``dpo``. Reference inputs are
        ignored (may be None). The paper uses beta ~2-10 and gamma/beta ~0.3-0.5; gamma too large forces
        a margin the model cannot reach and degrades generation.

    Args:
        beta: inverse temperature / KL strength. Too small: the policy drifts far from the reference (verbose,
            degenerate answers); too large: the loss saturates early and barely moves the policy.
        label_smoothing: conservative DPO (cDPO), the assumed probability that a preference label is flipped;
            0 = trust labels. Values >= 0.5 make the loss prefer the REJECTED answers. Not used by ``ipo``.
        simpo_gamma: SimPO's target reward margin gamma (not gamma/beta).

    Returns:
        :class:`DPOOutput` with per-pair losses (differentiable) and detached reward statistics.

    Raises:
        ValueError: unknown loss_type, mismatched shapes, missing reference log-probs for a reference-based loss,
            or missing / zero lengths for a length-normalised loss.
    """
    loss_type = parse_option(DPOLoss, loss_type, "loss_type")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing} (>= 0.5 inverts the labels)")
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if pc.shape != pr.shape or pc.dim() != 1:
        raise ValueError(
            f"policy_chosen_logps and policy_rejected_logps must both be (P,), got {tuple(pc.shape)} and {tuple(pr.shape)}"
        )

    if not loss_type.needs_reference:  # simpo
        lc = _lengths("chosen_lengths", chosen_lengths, pc, loss_type)
        lr = _lengths("rejected_lengths", rejected_lengths, pr, loss_type)
        chosen_rewards = beta * pc / lc
        rejected_rewards = beta * pr / lr
        logits = chosen_rewards - rejected_rewards - simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    else:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError(f"loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
        rc, rr = ref_chosen_logps.to(pc.device), ref_rejected_logps.to(pc.device)
        if rc.shape != pc.shape or rr.shape != pc.shape:
            raise ValueError(
                f"reference log-probs must match the policy's shape {tuple(pc.shape)}, "
                f"got {tuple(rc.shape)} and {tuple(rr.shape)}"
            )
        chosen_ratio, rejected_ratio = pc - rc, pr - rr  # (P,) log pi/ref of each answer
        if loss_type.averages_over_tokens:  # dpo_norm, ipo
            chosen_ratio = chosen_ratio / _lengths("chosen_lengths", chosen_lengths, pc, loss_type)
            rejected_ratio = rejected_ratio / _lengths("rejected_lengths", rejected_lengths, pr, loss_type)
        h = chosen_ratio - rejected_ratio
        if loss_type is DPOLoss.IPO:
            losses = (h - 1.0 / (2.0 * beta)) ** 2
        else:
            losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
        chosen_rewards = beta * chosen_ratio
        rejected_rewards = beta * rejected_ratio

    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        margins=margins,
        accuracies=(margins > 0).float(),
    )


def sft_nll_per_token(chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair negative log-likelihood per token of the chosen answer: ``-logps / lengths``, (P,).

    An optional auxiliary term (e.g. RPO, Pang et al. 2024, arXiv 2404.19733) added as ``alpha * nll`` to the
    preference loss to stop the chosen answer's likelihood from falling while the margin grows. alpha ~1 is
    typical; a large alpha turns DPO back into SFT on the chosen answers.
    """
    return -chosen_logps / _lengths("chosen_lengths", chosen_lengths, chosen_logps, "sft")


# --------------------------------------------------------------------------------------------------------------
# GRPO family
# --------------------------------------------------------------------------------------------------------------


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (GRPO compares completions of the same prompt), got {group_size}"
        )
    if rewards.dim() == 2:
        if rewards.shape[1] != group_size:
            raise ValueError(f"rewards of shape (N, G) = {tuple(rewards.shape)} do not match group_size={group_size}")
        return rewards
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards must be (N*G,) with N*G divisible by group_size={group_size}, or (N, G); got {tuple(rewards.shape)}. "
            "Completions of one prompt must be contiguous."
        )
    return rewards.view(-1, group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale_by_std: bool = True,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Group-relative advantages: reward minus its group's mean, optionally divided by the group's std.

    GRPO (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300) uses ``(r - mean) / (std + eps)``; Dr. GRPO (Liu et
    al. 2025, arXiv 2503.20783) argues the std division over-weights near-uniform groups (too easy or too hard
    prompts) and drops it (``scale_by_std=False``). std is the unbiased (Bessel) std, as in TRL and verl.

    Args:
        rewards: (N*G,) with the G completions of each prompt contiguous, or (N, G).
        group_size: G, completions per prompt (Moxin: 8).
        eps: added to the std. A group with identical rewards has advantage exactly 0 either way; an eps much
            smaller than the reward scale makes a group with one tiny difference produce huge advantages.

    Returns:
        Advantages in the same shape as ``rewards`` (fp32).
    """
    grouped = _grouped(rewards, group_size).float()
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_by_std:
        adv = adv / (grouped.std(dim=1, keepdim=True) + eps)
    return adv.view(rewards.shape)


def zero_std_groups(rewards: torch.Tensor, group_size: int, expand: bool = False) -> torch.Tensor:
    """Bool mask of groups whose rewards are all equal (zero advantage, so zero policy gradient).

    Log the fraction as ``grpo/frac_zero_std``: near 1 means the prompts are all too easy or all too hard and the
    step learns nothing (DAPO's dynamic sampling filters such groups). Returns (N,), or (N*G,) / (N, G) matching
    ``rewards`` when ``expand=True``.
    """
    grouped = _grouped(rewards, group_size)
    mask = (grouped == grouped[:, :1]).all(dim=1)  # (N,)
    if expand:
        return mask[:, None].expand_as(grouped).reshape(rewards.shape)
    return mask


KL_ESTIMATORS = tuple(m.value for m in KLEstimator)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor,
               estimator: KLEstimator | str = KLEstimator.LOW_VAR_KL) -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from log-probs of SAMPLED tokens (Schulman, "Approximating KL
    divergence", 2020). Any shape; returns the same shape. With ``d = ref_logp - logp``:

    * ``k1``: ``logp - ref_logp`` — unbiased, high variance, can be negative per token.
    * ``k2``: ``0.5 * (logp - ref_logp)^2`` — biased, low variance, >= 0.
    * ``k3`` / ``low_var_kl``: ``exp(d) - d - 1`` — unbiased, >= 0, low variance; ``d`` clamped to [-20, 20] and the
      result to [-10, 10] as verl's ``low_var_kl`` (Moxin's GRPO: coefficient 0.001), so one token the reference
      finds impossible cannot blow up the loss.

    All are exactly 0 where ``logp == ref_logp``. Multiply by the completion mask before summing.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp must have the same shape, got {tuple(logp.shape)} and {tuple(ref_logp.shape)}")
    estimator = parse_option(KLEstimator, estimator, "kl_estimator")
    if estimator is KLEstimator.K1:
        return logp - ref_logp
    if estimator is KLEstimator.K2:
        return 0.5 * (logp - ref_logp) ** 2
    d = (ref_logp - logp).clamp(-20.0, 20.0)  # k3 / low_var_kl
    return (torch.exp(d) - d - 1.0).clamp(-10.0, 10.0)


def completion_mask(
    lengths: torch.Tensor,
    truncated: torch.Tensor,
    max_len: int,
    mask_truncated: bool,
) -> torch.Tensor:
    """(S, max_len) float mask: 1 on the first ``lengths[s]`` tokens of each completion.

    ``mask_truncated=True`` zeroes completions that hit ``max_len`` without a stop token (DAPO's overlong
    filtering, arXiv 2503.14476): a truncated answer usually scores 0 for being cut, not for being wrong, and
    penalising it teaches the model to be short rather than right. Leave it False when the reward already
    accounts for length. If every completion is truncated and masked, the policy loss is 0 for the step; log it.

    Args:
        lengths: (S,) generated tokens per completion (the stop token counts if it is trained on).
        truncated: (S,) bool, True where generation stopped at the length limit.
    """
    lengths = torch.as_tensor(lengths)
    truncated = torch.as_tensor(truncated, device=lengths.device).bool()
    if lengths.dim() != 1 or truncated.shape != lengths.shape:
        raise ValueError(
            f"lengths and truncated must both be (S,), got {tuple(lengths.shape)} and {tuple(truncated.shape)}"
        )
    if bool((lengths < 0).any()) or bool((lengths > max_len).any()):
        raise ValueError(f"lengths must lie in [0, max_len={max_len}], got min {int(lengths.min())} max {int(lengths.max())}")
    mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
    if mask_truncated:
        mask = mask & ~truncated[:, None]
    return mask.float()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    aggregation: Aggregation | str = Aggregation.TOKEN,
    normaliser: float | None = None,
    kl: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-style clipped surrogate for GRPO, with separate lower and upper clip ranges.

    Per token: ``r = exp(logp - old_logp)``; ``l = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    + kl_coef * kl``. ``clip_high > clip_low`` is DAPO's "clip-higher" (arXiv 2503.14476): it lets unlikely
    tokens with positive advantage grow, against entropy collapse. clip_high too large (> ~0.4) makes updates
    unstable; clip_low too small freezes the policy.

    Args:
        logp: (S, T) current policy log-probs of the sampled tokens (differentiable).
        old_logp: (S, T) log-probs under the policy that sampled them (detached). With one optimizer step per
            batch, pass ``logp.detach()``: the ratio is 1 but the gradient is the policy gradient.
        advantages: (S,) per sequence (broadcast over tokens) or (S, T) per token.
        mask: (S, T) 1 on completion tokens that count (see :func:`completion_mask`), 0 elsewhere.
        aggregation: how token losses become one number, divided by ``normaliser``:
            * ``"token"``: sum over all masked tokens / masked tokens (DAPO). Every token weighs the same.
            * ``"sequence"``: each sequence's token mean, summed / sequences (original GRPO); a token of a short
              answer weighs more, which biases towards short correct and long wrong answers (Dr. GRPO).
            * ``"constant"``: sum over masked tokens / a constant (Dr. GRPO, e.g. ``max_new_tokens * n_sequences``).
        normaliser: what the sum is divided by: masked tokens (token), sequences with at least one masked token
            (sequence), or the constant (constant; required). A stage that splits a minibatch over micro-batches
            and ranks passes the count of the WHOLE minibatch on all ranks, so each call returns its exact share and
            the shares add up to the minibatch's loss. None: this call's own count (token, sequence).
        kl: optional (S, T) per-token KL from :func:`kl_penalty` (GRPO's KL-in-loss). kl_coef: its weight (Moxin
            0.001); too large pins the policy to the reference, 0 with no clipping lets it drift.
        entropy: optional (S, T) per-token entropy with its gradient (:func:`token_logprobs_and_entropy`,
            ``entropy_grad``); entropy_coef: the bonus's weight (verl's ``entropy_coeff``, 0.001 in DeepScaleR).
            The loss subtracts entropy_coef x the entropy aggregated like the policy loss (verl: ``pg_loss -
            entropy_coeff * agg_loss(entropy)``); the aggregation is linear, so it is taken per token. 0 or None: the loss is exactly the one without it.

    Returns:
        ``(loss, stats)``: scalar loss, and detached scalars ``clip_frac_low`` (ratio < 1 - clip_low with A < 0,
        gradient stopped), ``clip_frac_high`` (ratio > 1 + clip_high with A > 0), ``approx_kl`` (k3 estimate of
        KL(old || new), masked mean), ``ratio_mean``, ``ratio_max``, ``n_tokens``, ``pg_loss``, ``kl_mean`` and,
        with an entropy bonus, ``entropy_loss`` (the aggregated entropy, before its coefficient).
    """
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be (S, T); got {tuple(logp.shape)}, {tuple(old_logp.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if advantages.dim() == 1:
        if advantages.shape[0] != logp.shape[0]:
            raise ValueError(f"per-sequence advantages must be (S,) = ({logp.shape[0]},), got {tuple(advantages.shape)}")
        advantages = advantages[:, None]
    elif advantages.shape != logp.shape:
        raise ValueError(f"advantages must be (S,) or (S, T) = {tuple(logp.shape)}, got {tuple(advantages.shape)}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    aggregation = parse_option(Aggregation, aggregation, "aggregation")
    if aggregation is Aggregation.CONSTANT and not (normaliser and normaliser > 0):
        raise ValueError("aggregation='constant' needs normaliser > 0 (e.g. max_new_tokens * n_sequences)")
    if normaliser is not None and not normaliser > 0:
        raise ValueError(f"normaliser must be > 0, got {normaliser}")

    mask = mask.to(logp.dtype)
    advantages = advantages.to(logp.dtype)
    log_ratio = logp - old_logp.detach()
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(pg1, pg2)
    pg_per_token = per_token
    if kl is not None and kl_coef != 0.0:
        if kl.shape != logp.shape:
            raise ValueError(f"kl must be (S, T) = {tuple(logp.shape)}, got {tuple(kl.shape)}")
        per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef != 0.0:
        if entropy.shape != logp.shape:
            raise ValueError(f"entropy must be (S, T) = {tuple(logp.shape)}, got {tuple(entropy.shape)}")
        per_token = per_token - entropy_coef * entropy

    n_tokens = mask.sum()
    safe_n = n_tokens.clamp(min=1.0)
    per_seq_n = mask.sum(dim=1)
    if normaliser is not None:
        norm = normaliser
    elif aggregation is Aggregation.TOKEN:
        norm = safe_n
    else:  # sequence: fully masked sequences do not count
        norm = (per_seq_n > 0).sum().clamp(min=1)

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        if aggregation is Aggregation.SEQUENCE:
            return ((x * mask).sum(dim=1) / per_seq_n.clamp(min=1.0)).sum() / norm
        return (x * mask).sum() / norm  # token, constant

    loss = aggregate(per_token)

    with torch.no_grad():
        masked_mean = lambda x: (x * mask).sum() / safe_n  # noqa: E731
        adv = advantages.expand_as(ratio)
        stats = {
            "pg_loss": aggregate(pg_per_token).detach(),
            "clip_frac_low": masked_mean(((ratio < 1.0 - clip_low) & (adv < 0)).to(mask.dtype)),
            "clip_frac_high": masked_mean(((ratio > 1.0 + clip_high) & (adv > 0)).to(mask.dtype)),
            "approx_kl": masked_mean(ratio - 1.0 - log_ratio),
            "ratio_mean": masked_mean(ratio),
            "ratio_max": (ratio * mask).max() if mask.numel() else ratio.new_zeros(()),
            "n_tokens": n_tokens.detach(),
            "kl_mean": masked_mean(kl) if kl is not None else ratio.new_zeros(()),
        }
        if entropy is not None and entropy_coef != 0.0:
            stats["entropy_loss"] = aggregate(entropy).detach()
    return loss, stats
