"""ParallelConfig: activation checkpointing, compile and FSDP2 settings (``hardware.parallel``), which
moxin/distributed.py applies to the model from outside."""

from __future__ import annotations

from dataclasses import dataclass

from moxin.config.options import Recompute, parse_option

__all__ = ["ParallelConfig"]


@dataclass
class ParallelConfig:
    activation_checkpointing: str | bool = Recompute.NONE
    """Recomputation per block: none | mlp | attention | full (true = full, false = none). Full is what 7B at 4K
    context needs on 80 GB GPUs; on 141 GB H200s under FSDP2 less may fit (docs/performance.md has the figures);
    small models keep everything."""
    compile: bool = False
    """torch.compile each block (per-block, so recompiles stay cheap and FSDP hooks sit between blocks)."""
    fsdp_param_dtype: str | None = None
    """FSDP2 mixed precision: parameters gathered in this dtype for compute (e.g. bf16), gradients reduced in
    fp32, master weights stay fp32. None: no FSDP mixed-precision policy (use Lightning's autocast instead)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3). False keeps them until backward (ZeRO-2-like)."""

    def __post_init__(self):
        ac = self.activation_checkpointing
        if isinstance(ac, bool):
            ac = Recompute.FULL if ac else Recompute.NONE
        # kept as the plain string (OmegaConf, which saves this config with the run, types it str | bool)
        self.activation_checkpointing = parse_option(Recompute, ac, "hardware.parallel.activation_checkpointing").value
