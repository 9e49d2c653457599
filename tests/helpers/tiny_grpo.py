"""The tiny GRPO stage the GRPO tests train, its arithmetic prompts and a one-epoch fit: the `tiny` preset on the
real 32000-entry vocabulary, a constant high learning rate so a few steps move the policy, groups of 4 sampled at
temperature 1, verifiers in-process; ParityVerifier, a reward that varies on a random model.
Imported by tests/test_grpo.py, tests/test_eval_grpo.py, tests/test_checkpoints_and_failures.py, and by
tests/helpers/grpo_fsdp.py (a script under torchrun: the FSDP2 trainer and run settings here)."""

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from moxin.config import GRPOConfig, OptimConfig
from moxin.data.grpo_data import PromptDataModule
from moxin.presets import load_preset
from moxin.rewards import RewardResult
from moxin.stages.grpo import GRPOStage
from moxin.tokenizer import load_tokenizer

#: GRPOConfig overrides of tests/helpers/grpo_fsdp.py's FSDP2 run (its one-process reference rollout uses them too)
FSDP_GRPO = dict(max_new_tokens=6, micro_batch_size=2, ppo_epochs=2, num_minibatches=2, kl_coef=0.1)


class ParityVerifier:
    """A stand-in reward that varies on a random model: 1 when the completion text has an odd length."""

    def __call__(self, completion: str, reference: str) -> RewardResult:
        return RewardResult(float(len(completion) % 2), "correct" if len(completion) % 2 else "wrong")


def tiny_grpo_stage(verifier: str, **grpo) -> tuple[GRPOStage, object]:
    """(stage, tokenizer); `grpo` overrides GRPOConfig fields (max_new_tokens, micro_batch_size, ...)."""
    tok = load_tokenizer("mistral")
    torch.manual_seed(0)
    cfg = dict(group_size=4, temperature=1.0, verifier=verifier, verifier_workers=0, log_completions=0,
               mask_truncated=False) | grpo
    stage = GRPOStage(load_preset("tiny", vocab_size=32000, attn_backend="sdpa"),
                      optim=OptimConfig(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0),
                      grpo=GRPOConfig(**cfg), tokenizer=tok, seed=3)
    return stage, tok


def arithmetic_prompts(tok, steps: int = 1, prompts_per_step: int = 2) -> PromptDataModule:
    """`steps` rollout steps of `prompts_per_step` arithmetic prompts of up to 64 tokens, seed 0."""
    return PromptDataModule(source="arithmetic", prompts_per_step=prompts_per_step, steps=steps, tokenizer=tok,
                            seed=0, max_prompt_tokens=64)


def fit_one_epoch(stage, dm, root) -> L.Trainer:
    """Train `stage` on `dm` for one epoch on the CPU, without logger, checkpoints or sanity validation."""
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                        num_sanity_val_steps=0)
    trainer.fit(stage, datamodule=dm)
    return trainer


def fsdp2_trainer(accelerator: str = "cpu") -> L.Trainer:
    """One epoch on 2 processes (CPU or GPU) under FSDP2 (Lightning's ModelParallelStrategy, launched by torchrun),
    without logger, checkpoints or sanity validation; each rank reads its own prompts (no distributed sampler)."""
    return L.Trainer(accelerator=accelerator, devices=2, strategy=ModelParallelStrategy(data_parallel_size=2,
                                                                                 tensor_parallel_size=1),
                     max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False)
