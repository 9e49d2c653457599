"""The options of the configs, as enums whose properties carry the rules that depend on them (open-instruct's
``DPOLossType``), and :func:`parse_option`, which reads one from a config value naming the key and the choices."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["parse_option", "DPOLoss", "KLEstimator", "Aggregation", "ReferenceMode", "Recompute", "Float8Recipe",
           "GradientSync", "ReduceDtype", "DecodePath", "EvalAfter", "TaskKind", "FewshotSampler", "ContaminatedAction"]


def parse_option(enum_cls, value, key: str):
    """``enum_cls(value)``, or a ValueError that names the config key and the choices."""
    try:
        return enum_cls(value)
    except ValueError:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(m.value for m in enum_cls)}") from None


class DPOLoss(StrEnum):
    """The preference losses of :func:`moxin.losses.dpo_loss` (papers there)."""

    DPO = "dpo"
    DPO_NORM = "dpo_norm"
    IPO = "ipo"
    SIMPO = "simpo"

    @property
    def needs_reference(self) -> bool:
        """SimPO is reference-free; the others compare with a reference model's log-probs."""
        return self is not DPOLoss.SIMPO

    @property
    def averages_over_tokens(self) -> bool:
        """Whether the loss works on length-averaged log-probs (needs the answers' token counts)."""
        return self is not DPOLoss.DPO


class KLEstimator(StrEnum):
    """Per-token KL estimators of :func:`moxin.losses.kl_penalty` (Schulman 2020); ``low_var_kl`` is verl's name
    for k3."""

    K1 = "k1"
    K2 = "k2"
    K3 = "k3"
    LOW_VAR_KL = "low_var_kl"


class Aggregation(StrEnum):
    """How :func:`moxin.losses.policy_loss` turns token losses into one number, and what its ``normaliser``
    counts."""

    TOKEN = "token"
    """sum over masked tokens / masked tokens (DAPO): every token weighs the same."""
    SEQUENCE = "sequence"
    """mean over each sequence's tokens, summed / sequences (original GRPO)."""
    CONSTANT = "constant"
    """sum over masked tokens / a constant (Dr. GRPO: max_new_tokens x sequences)."""


class ReferenceMode(StrEnum):
    """Where DPO's reference log-probs come from (moxin/stages/dpo.py)."""

    CACHED = "cached"
    """computed once before training, stored on disk under a hash of everything they depend on"""
    FROZEN = "frozen"
    """a second, frozen model sharded like the policy, run on every batch"""
    NONE = "none"
    """no reference (SimPO)"""


class Recompute(StrEnum):
    """Which activations a block recomputes in the backward instead of keeping (activation checkpointing)."""

    NONE = "none"  # keep everything: fastest, most memory
    MLP = "mlp"  # recompute the SwiGLU MLP (its hidden_dim-wide activations are most of a block's memory)
    ATTENTION = "attention"  # recompute the attention sub-layer (projections, RoPE, the kernel)
    FULL = "full"  # recompute the whole block: ~1/3 more compute, keeps only each block's input


class Float8Recipe(StrEnum):
    """torchao's float8 training recipes for the blocks' linear layers (``hardware.parallel.float8``; applied by
    `moxin.distributed.apply_float8`)."""

    NONE = "none"
    """bf16 (or the run's precision) everywhere."""
    TENSORWISE = "tensorwise"
    """one scale per tensor: the fastest; under FSDP2 the weights are all-gathered in float8 (half the bytes)."""
    ROWWISE = "rowwise"
    """one scale per row (power-of-2 scales): more accurate where rows differ in range, slightly slower."""

    @property
    def fsdp_float8_all_gather(self) -> bool:
        """FSDP2 can all-gather the weights already cast to float8 (tensorwise scales only: a row-wise scale
        depends on the whole row's other shards)."""
        return self is Float8Recipe.TENSORWISE


class GradientSync(StrEnum):
    """When FSDP2's gradient collectives run under gradient accumulation (``hardware.parallel.gradient_sync``;
    applied before each backward by `moxin.distributed.set_gradient_sync`). The last micro-batch of an optimizer
    step always runs them all."""

    AUTO = "auto"
    """Reduce-scatter within the shard group every micro-step (gradients stay sharded: no memory cost); HSDP's
    all-reduce across the replica groups, the inter-node traffic, once per optimizer step (FSDP2's partial sums
    wait in the reduce dtype until then). Plain FSDP2: every micro-step, as micro_step."""
    MICRO_STEP = "micro_step"
    """Every micro-step reduce-scatters and, under HSDP, all-reduces (the reference behaviour)."""
    STEP = "step"
    """No collective before the last micro-step: one reduce-scatter (and all-reduce) per optimizer step, but every
    rank holds its unsharded gradients across the micro-steps (the reduce dtype's bytes for every parameter)."""

    @property
    def defers_all_reduce(self) -> bool:
        """The HSDP all-reduce across replica groups waits for the step's last micro-batch."""
        return self is not GradientSync.MICRO_STEP

    @property
    def defers_reduce_scatter(self) -> bool:
        """The reduce-scatter waits too (gradients accumulate unsharded)."""
        return self is GradientSync.STEP


class ReduceDtype(StrEnum):
    """The dtype FSDP2 reduces gradients in (``hardware.parallel.reduce_dtype``; its `MixedPrecisionPolicy`)."""

    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    """Half the reduce-scatter and all-reduce bytes (torchtitan's ``mixed_precision_reduce``); the sum over ranks
    is rounded to bf16's 8 bits of mantissa."""


class DecodePath(StrEnum):
    """How `moxin.model.generate` runs its single-token steps (its module docstring); every path gives the same
    tokens."""

    AUTO = "auto"
    """graph on CUDA, eager elsewhere (no compilation: one-off generations start at once)."""
    EAGER = "eager"
    STATIC = "static"
    GRAPH = "graph"
    COMPILED = "compiled"
    """The fastest on a GPU once compiled (about a minute for Moxin-7B, once per cache shape)."""


class EvalAfter(StrEnum):
    """When a training run evaluates (``eval.after``; moxin.callbacks.evaluation.EvalCallback)."""

    phase = "phase"
    """At the end of every phase (Lightning epoch) of a pretraining schedule, and so also at the end of the run."""
    stage = "stage"
    """Once, when the stage's fit ends."""


class TaskKind(StrEnum):
    multiple_choice = "multiple_choice"
    generation = "generation"


class FewshotSampler(StrEnum):
    default = "default"
    """lm-eval's default: a seeded random draw per item (``fewshot_seed``)."""
    first_n = "first_n"
    """The first ``num_fewshot`` records of the pool (lm-eval's first_n, used where examples have a canonical order)."""


class ContaminatedAction(StrEnum):
    """What the preparation does with a training record that shares an n-gram with an evaluation split
    (``data.decontaminate.action``, moxin/data/decontaminate.py)."""

    DROP = "drop"
    FLAG = "flag"

    @property
    def keeps_record(self) -> bool:
        """A flagged record is trained on and listed in the report; a dropped one is not written."""
        return self is ContaminatedAction.FLAG
