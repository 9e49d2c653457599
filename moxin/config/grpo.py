"""GRPOConfig: the knobs of GRPO (``stage.grpo``); what each does, and the papers, in moxin/stages/grpo.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from moxin.config.options import Aggregation, DecodePath, KLEstimator, parse_option

__all__ = ["GRPOConfig", "ShardedRollout"]


class ShardedRollout(StrEnum):
    """How rollouts decode under FSDP2 (`stage.grpo.sharded_rollout`; docs/modules.md, "stages/grpo.py")."""

    AUTO = "auto"
    """gather when every rank's free device memory holds the copy and the cache (a CPU always), else lockstep."""
    GATHER = "gather"
    """Each rank gathers the whole policy once per rollout into the rollout copy, then decodes its own prompts
    alone (compiled on a GPU): no collective per token."""
    LOCKSTEP = "lockstep"
    """The ranks decode eagerly in lockstep through the sharded model: every forward all-gathers the weights."""


@dataclass
class GRPOConfig:
    group_size: int = 8
    """G completions per prompt (Moxin: 8). Too small (2-4) gives noisy advantages and many zero-std groups."""
    temperature: float = 0.6
    """Sampling temperature (Moxin: 0.6). The training log-probs use the same temperature, so the ratio compares
    like with like. Too low: groups agree, frac_zero_std -> 1; too high: gibberish."""
    top_p: float = 1.0
    """Nucleus sampling. <1 samples from a truncated distribution the loss does not model (a biased ratio)."""
    top_k: int | None = None
    max_new_tokens: int = 16384
    """Completion budget (Moxin-Reasoning: 16K). Completions hitting it count as truncated."""
    gen_batch_size: int | None = None
    """Sequences per generate() call (None: all of the rank's G x P at once). Lower it when the cache OOMs."""
    prefill_chunk: int | None = None
    score_during_generation: bool | None = None
    """Score rows while the others still decode (a scoring thread; verifier workers). None: on a GPU only; on a CPU
    the verifier would take cores from generation (the CPU demo generated 20 % slower with it)."""
    decode: DecodePath = DecodePath.AUTO
    """Rollout decode path: auto = compiled on a CUDA device (the decode step compiled once per cache shape,
    about a minute for Moxin-7B, then 1.5x the uncompiled CUDA graph, 1.6x with the rollout copy's fused
    projections), eager on a CPU; or eager, static, graph, compiled. Under FSDP2 the rollouts decode
    the same way from the gathered copy (`sharded_rollout: gather`), or eagerly in lockstep (`lockstep`)."""
    rollout_copy: bool | None = None
    """Decode rollouts (and the held-out / validation generations) with a copy of the policy in the autocast dtype
    (bf16 under bf16-mixed), refreshed from the policy at every rollout step, rather than with the fp32 policy
    under autocast, whose decode casts every weight again for every token and keeps an fp32 cache. Costs a 16-bit
    copy of the weights (2 bytes a parameter).
    None: on one CUDA device under 16-bit autocast. Under FSDP2 `sharded_rollout` decides instead (gather: a copy
    in the autocast dtype, else FSDP2's param dtype, else the parameters')."""
    rollout_copy_keep: bool | None = None
    """Keep the rollout copy's memory between rollout steps (True) or free it after each rollout so the update has
    it (False; the next rollout allocates it again, same module, so compiled code is reused). None: keep on one
    device (the copy costs 2 bytes a parameter beside an unsharded fp32 policy and its optimizer), free under
    FSDP2 (a whole copy on every rank beside 1/N of the training state; docs/performance.md, "GRPO rollouts
    under FSDP2")."""
    sharded_rollout: ShardedRollout = ShardedRollout.AUTO
    """Under FSDP2: gather (a whole copy per rank, refreshed once per rollout, each rank decoding alone), lockstep
    (the sharded model, eagerly, all ranks in step: a weight all-gather per token) or auto (gather when the copy
    and the cache fit every rank's free device memory)."""
    scale_by_std: bool = True
    """Divide advantages by the group std (GRPO) or not (Dr. GRPO)."""
    filter_zero_std: bool = True
    """Leave groups with identical rewards out of the update (DAPO); they contribute zero gradient anyway, but
    with token/sequence aggregation they would dilute the normaliser."""
    mask_truncated: bool = True
    """No loss on completions cut at max_new_tokens (DAPO overlong filtering)."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    """Ratio clip range [1 - clip_low, 1 + clip_high]; clip_high > clip_low is DAPO's clip-higher."""
    aggregation: Aggregation = Aggregation.TOKEN
    """token (DAPO) | sequence (GRPO) | constant (Dr. GRPO: sum / (max_new_tokens x sequences))."""
    constant_norm: float | None = None
    """For aggregation=constant: the divisor per minibatch; None = max_new_tokens x sequences in the minibatch."""
    kl_coef: float = 0.0
    """Weight of KL(policy || frozen initial policy) in the loss (Moxin: 0.001). 0: no reference model is kept."""
    kl_estimator: KLEstimator = KLEstimator.LOW_VAR_KL
    """k1 | k2 | k3 | low_var_kl (k3 clamped as verl; Moxin's choice)."""
    ppo_epochs: int = 1
    """Passes of policy updates over each rollout batch. >1 reuses samples but drifts off-policy (watch clip_frac)."""
    num_minibatches: int = 1
    """Optimizer steps per epoch; the kept completions are split into this many minibatches."""
    micro_batch_size: int = 8
    """Sequences per forward/backward (gradient accumulation inside a minibatch; memory only, not the math)."""
    verifier: str = "exact"
    """Registry name (moxin.rewards.get_verifier): math (Moxin), exact (built-in task), format."""
    verifier_kwargs: dict = field(default_factory=dict)
    verifier_timeout_s: float = 10.0
    verifier_workers: int | None = None
    """Verifier worker processes (None: min(4, cpus)); 0 runs in-process without timeouts (debug only)."""
    max_verifier_failure_fraction: float = 0.5
    """Stop the run when more than this fraction of a step's completions could not be scored (verifier error or
    timeout): their reward would be a silent 0 and the update noise."""
    log_completions: int = 1
    """Print this many (prompt, completion, reward) examples every `log_every` rollout steps (rank 0)."""
    log_every: int = 10
    heldout_every: int = 0
    """Rollout steps between greedy held-out reward measurements (grpo/heldout_reward; moxin/eval/heldout.py);
    0: none. Measured before the rollout of every multiple of it (step 0: the starting policy) and after the last."""
    heldout_prompts: int = 64
    heldout_samples: int = 0
    """Also, at every held-out measurement, this many samples a held-out prompt at the rollout temperature:
    ``grpo/heldout_reward_sampled``, pass@1 averaged over them (as the recipe's n_val; less noisy than the greedy
    pass@1 of a small set). 0: greedy only."""
    heldout_source: str | None = None
    """Held-out problems (jsonl/parquet/hub, the data's fields); None: the arithmetic task's own held-out range."""
    entropy_coef: float = 0.0
    """Entropy bonus: the loss subtracts this x the completion tokens' entropy (with its gradient), aggregated as
    the policy loss (verl's ``entropy_coeff``; DeepScaleR's runs keep verl's default 0.001). 0: no bonus, and no
    extra head pass. Costs one more logits product per chunk in forward and backward."""
    val_source: str | None = None
    """Validation problems (jsonl/parquet/hub, the data's prompt/answer fields; Moxin-Reasoning: AIME), scored by
    the verifier with `n_val` samples a problem: `val/reward_mean` (moxin/eval/heldout.py). None: no validation."""
    val_split: str = "train"
    val_prompts: int | None = None
    """Problems of val_source to validate on (the first ones); None: all."""
    val_every_n_steps: int = 0
    """Rollout steps between validations (verl's trainer.test_freq; the recipe: 20), and one after the last
    step; 0: none during training."""
    val_before_train: bool = True
    """Validate the starting policy before the first rollout (verl's trainer.val_before_train)."""
    n_val: int = 1
    """Samples a validation problem (the recipe: 8); the logged reward is their mean (pass@1 averaged over n)."""
    val_temperature: float = 0.6
    """Sampling temperature of validation (the recipe: 0.6, verl's val_temperature); 0: greedy."""
    pack: bool = True
    """Pack the update's sequences (prompt + completion) whole into rows with document boundaries (positions restart
    per sequence, attention masked by document, as pretraining's rows; verl's and OpenRLHF's sequence packing),
    first-fit longest first, instead of one right-padded row per sequence: a 300-token sequence beside a 16K one
    then costs its 300 tokens. The loss, gradients and statistics equal the padded update's (the log-probs are
    gathered back to the sequences' layout before the loss; tests/test_grpo_packing.py). A micro-batch holds at
    most micro_batch_size x the longest sequence's tokens, the padded micro-batch's budget."""
    pack_tokens: int | None = None
    """Width of a packed row (pack: true); None: model.max_seq_len. Capped by the micro-batch's token budget and
    never below the rollout's longest sequence (a sequence is never split)."""

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"stage.grpo.group_size={self.group_size}: GRPO needs >= 2 completions per prompt")
        self.aggregation = parse_option(Aggregation, self.aggregation, "stage.grpo.aggregation")
        self.kl_estimator = parse_option(KLEstimator, self.kl_estimator, "stage.grpo.kl_estimator")
        self.decode = parse_option(DecodePath, self.decode, "stage.grpo.decode")
        self.sharded_rollout = parse_option(ShardedRollout, self.sharded_rollout, "stage.grpo.sharded_rollout")
        if self.temperature <= 0:
            raise ValueError("stage.grpo.temperature must be > 0 (the ratio needs the sampling distribution)")
        if self.ppo_epochs < 1 or self.num_minibatches < 1 or self.micro_batch_size < 1:
            raise ValueError("stage.grpo.ppo_epochs, num_minibatches and micro_batch_size must be >= 1")
        if self.n_val < 1 or self.val_every_n_steps < 0 or self.val_temperature < 0:
            raise ValueError(f"stage.grpo.n_val={self.n_val} must be >= 1, val_every_n_steps="
                             f"{self.val_every_n_steps} and val_temperature={self.val_temperature} >= 0")
        if self.heldout_samples < 0:
            raise ValueError(f"stage.grpo.heldout_samples={self.heldout_samples} must be >= 0 (0: greedy only)")
        if self.pack_tokens is not None and self.pack_tokens < 1:
            raise ValueError(f"stage.grpo.pack_tokens={self.pack_tokens}: a packed row needs >= 1 token (null: "
                             "model.max_seq_len)")
