"""The tiny GRPO stage the GRPO tests train: the `tiny` preset on the real 32000-entry vocabulary, a constant
high learning rate so a few steps move the policy, groups of 4 sampled at temperature 1, verifiers in-process.
Imported by tests/test_eval_grpo.py and by tests/helpers/grpo_fsdp.py (run as a script under torchrun)."""

import torch

from moxin.config import GRPOConfig, OptimConfig
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage
from moxin.tokenizer import load_tokenizer


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
