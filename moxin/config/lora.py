"""LoRAConfig: LoRA / QLoRA adapters (``stage.lora``); the adapters themselves are moxin/model/lora.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from moxin.config.errors import ConfigError

__all__ = ["LoRAConfig", "TARGETS", "QUANTIZE", "BASE_DTYPES"]

#: target name -> (the block's sub-module, the projection's attribute, PEFT's module name in HF Mistral)
TARGETS = {
    "q": ("attention", "wq", "q_proj"), "k": ("attention", "wk", "k_proj"), "v": ("attention", "wv", "v_proj"),
    "o": ("attention", "wo", "o_proj"), "gate": ("feed_forward", "w1", "gate_proj"),
    "up": ("feed_forward", "w3", "up_proj"), "down": ("feed_forward", "w2", "down_proj"),
}
QUANTIZE = ("nf4",)
BASE_DTYPES = ("auto", "bfloat16", "float32")

@dataclass
class LoRAConfig:
    rank: int = 0
    """r, the adapters' inner width; 0 = LoRA off (full fine-tuning). 8-64 is usual; larger learns more and costs
    memory linearly (2 x r x (in + out) parameters a projection)."""
    alpha: float = 16.0
    """Scale alpha: the update is (alpha / r) B A, so alpha / r is the adapters' learning-rate multiplier. Keep alpha
    fixed when sweeping r (PEFT's convention), or the step size changes with r."""
    dropout: float = 0.0
    """Dropout on the adapters' input only (the frozen path never drops); 0.05-0.1 helps small data sets."""
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    """Projections that get adapters: any of q, k, v, o, gate, up, down (all by default, as QLoRA found best)."""
    quantize: str | None = None
    """null: frozen base in base_dtype | nf4: QLoRA, every block projection in 4-bit NormalFloat (torchao), about
    0.5 bytes a weight, dequantised in the forward (slower per token than a bf16 base; pick it when bf16 does not
    fit)."""
    base_dtype: str = "auto"
    """Storage of the frozen base: auto = bfloat16 on a GPU, float32 (the master weights as configured) on a CPU |
    bfloat16 | float32. The adapters and their optimizer state are always float32."""

    def __post_init__(self):
        problems = []
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
            problems.append(f"stage.lora.rank={self.rank!r} must be an integer >= 0 (0: LoRA off)")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            problems.append(f"stage.lora.alpha={self.alpha!r} must be a number > 0")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"stage.lora.dropout={self.dropout!r} must be in [0, 1)")
        self.targets = [str(t) for t in self.targets]
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets or len(set(self.targets)) != len(self.targets):
            problems.append(f"stage.lora.targets={self.targets}: give distinct names out of {list(TARGETS)}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            problems.append(f"stage.lora.quantize={self.quantize!r}: choose null or nf4")
        if self.base_dtype not in BASE_DTYPES:
            problems.append(f"stage.lora.base_dtype={self.base_dtype!r}: choose one of {list(BASE_DTYPES)}")
        if self.quantize and not self.rank:
            problems.append(f"stage.lora.quantize={self.quantize} quantizes the frozen base of LoRA: set "
                            "stage.lora.rank (e.g. 16) too")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def check_parallel(self, strategy: str | None, gpu: bool, fsdp_param_dtype: str | None) -> None:
        """Combinations this LoRA cannot run with the hardware profile, named with the fix: QLoRA under FSDP2, and a
        16-bit base with fp32 adapters under FSDP2 without its mixed precision (FSDP2 gathers a block's parameters
        in one dtype). moxin.errors.preflight calls it before any work; the stage again, with its strategy."""
        if not self.enabled or strategy != "fsdp2":
            return
        if self.quantize:
            raise ConfigError(f"stage.lora.quantize={self.quantize} (QLoRA) runs on one GPU; under FSDP2 "
                              "(hardware.strategy=fsdp2) use a 16-bit base: stage.lora.quantize=null")
        base16 = self.base_dtype == "bfloat16" or (self.base_dtype == "auto" and gpu)
        if base16 and not fsdp_param_dtype:
            raise ConfigError("stage.lora with a bfloat16 base under FSDP2 needs FSDP2's mixed precision to gather the "
                              "fp32 adapters with it: set hardware.parallel.fsdp_param_dtype=bfloat16 (or "
                              "stage.lora.base_dtype=float32)")

    def base_torch_dtype(self, device_type: str) -> torch.dtype | None:
        """The frozen base's storage dtype on `device_type` (None: leave it as built)."""
        if self.base_dtype == "auto":
            return torch.bfloat16 if device_type == "cuda" else None
        return getattr(torch, self.base_dtype)
