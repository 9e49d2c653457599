"""ParallelConfig: float8, activation checkpointing, compile, FSDP2 and HSDP settings (gradient reduction included) (``hardware.parallel``), which
moxin/distributed.py applies to the model from outside; and the shape checks of tensor parallelism
(``hardware.tensor_parallel_size``, Lightning's own argument, so it sits beside ``hardware.data_parallel_size``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from moxin.config.errors import ConfigError
from moxin.config.options import Float8Recipe, GradientSync, Recompute, ReduceDtype, parse_option

__all__ = ["ParallelConfig", "check_tensor_parallel"]


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
    ``reduce_dtype``, master weights stay fp32. None: parameters computed in their own dtype (use Lightning's
    autocast instead)."""
    reduce_dtype: str = ReduceDtype.FLOAT32
    """float32 | bfloat16: the dtype FSDP2's reduce-scatter and HSDP's all-reduce carry gradients in (the
    `MixedPrecisionPolicy`'s reduce_dtype). bfloat16 halves those bytes (torchtitan's ``mixed_precision_reduce``),
    the sum over ranks then rounded to bf16; the sharded gradients the optimizer reads are fp32 either way. With
    fsdp_param_dtype=null and float32 here, gradients are reduced in the parameters' own dtype (float64 tests)."""
    gradient_sync: str = GradientSync.AUTO
    """auto | micro_step | step: when FSDP2's gradient collectives run under accumulation (`GradientSync`). auto:
    reduce-scatter every micro-step, HSDP's replica all-reduce once per optimizer step; micro_step: both every
    micro-step; step: one reduce-scatter (and all-reduce) per step, holding unsharded gradients in between
    (Moxin-7B: 30 GiB a GPU in fp32; docs/architecture.md, "Gradient accumulation")."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3). False keeps them until backward (ZeRO-2-like)."""
    replicate: int = 1
    """HSDP: R groups of world/R ranks; each block is sharded within a group and replicated across the groups
    (FSDP2 over a (replicate, shard) mesh). Set R to the node count so the per-block all-gathers and
    reduce-scatters stay inside a node and only one gradient all-reduce per step crosses nodes; 1 shards over the
    whole world (plain FSDP2). Needs hardware.strategy=fsdp2 and a world size R divides."""
    float8: str = Float8Recipe.NONE
    """none | tensorwise | rowwise: torchao's float8 training on the blocks' linear layers (the loss head,
    embeddings and norms stay in the run's precision). Needs torchao and a GPU with float8 tensor cores (compute
    capability 8.9+: H100/H200, L40S, RTX 4090); pays off with compile=true. Checkpoints keep plain parameter
    names: a float8 run's checkpoint loads into a bf16 run and exports to Hugging Face as any other."""
    float8_emulate: bool = False
    """Tests and CPU only: torchao emulates the float8 casts in high precision, so the float8 path runs anywhere
    (same rounding, no speed). Without it float8 on a CPU is refused."""

    def __post_init__(self):
        ac = self.activation_checkpointing
        if isinstance(ac, bool):
            ac = Recompute.FULL if ac else Recompute.NONE
        # kept as the plain string (OmegaConf, which saves this config with the run, types it str | bool)
        self.activation_checkpointing = parse_option(Recompute, ac, "hardware.parallel.activation_checkpointing").value
        self.float8 = parse_option(Float8Recipe, self.float8, "hardware.parallel.float8").value
        self.reduce_dtype = parse_option(ReduceDtype, self.reduce_dtype, "hardware.parallel.reduce_dtype").value
        self.gradient_sync = parse_option(GradientSync, self.gradient_sync, "hardware.parallel.gradient_sync").value
        if isinstance(self.replicate, bool) or not isinstance(self.replicate, int) or self.replicate < 1:
            raise ConfigError(f"hardware.parallel.replicate={self.replicate!r}: the number of HSDP replica groups, "
                              "an integer >= 1 (1: plain FSDP2 over every rank)")

    def check_world(self, world: int, strategy: str = "fsdp2") -> None:
        """Refuse, before any work, a replicate count the run's process layout cannot hold, and FSDP2 gradient
        settings under a strategy that does not shard with FSDP2."""
        self.check_reduction(strategy)
        if self.replicate == 1:
            return
        if strategy != "fsdp2":
            raise ConfigError(f"hardware.parallel.replicate={self.replicate} (HSDP) shards with FSDP2, and this run's "
                              f"hardware.strategy is {strategy!r}; use hardware=fsdp (strategy fsdp2), or "
                              "hardware.parallel.replicate=1")
        if world % self.replicate:
            fits = [r for r in range(1, world + 1) if world % r == 0]
            raise ConfigError(f"hardware.parallel.replicate={self.replicate} does not divide the world size {world} "
                              f"(hardware.devices x hardware.num_nodes): each replica group must hold the same "
                              f"number of ranks. Use one of {fits} (the node count, typically)")

    def check_reduction(self, strategy: str) -> None:
        """``reduce_dtype`` and ``gradient_sync`` set FSDP2's gradient collectives: refuse them away from their
        defaults under another strategy, where they would silently do nothing (Lightning's DDP already all-reduces
        once per optimizer step under accumulation; one device has nothing to reduce)."""
        if strategy == "fsdp2":
            return
        changed = {k: v for k, v in (("reduce_dtype", self.reduce_dtype), ("gradient_sync", self.gradient_sync))
                   if v != getattr(ParallelConfig, k)}
        if changed:
            keys = ", ".join(f"hardware.parallel.{k}={v}" for k, v in changed.items())
            raise ConfigError(f"{keys}: FSDP2's gradient reduction, and this run's hardware.strategy is "
                              f"{strategy!r}, which does not shard with FSDP2 (DDP already all-reduces once per "
                              "optimizer step under accumulation); use hardware=fsdp (strategy fsdp2), or remove "
                              f"the override{'s' if len(changed) > 1 else ''}")

    def check_float8(self, gpu: bool, lora: bool = False) -> None:
        """Refuse, before any work and with the fix, a float8 setting this run cannot train with: torchao missing,
        a CPU run without the emulation flag, a GPU without float8 tensor cores, LoRA / QLoRA (their adapters wrap
        the very projections float8 would replace, over a frozen 16-bit or NF4 base)."""
        if self.float8 == Float8Recipe.NONE:
            return
        key = f"hardware.parallel.float8={self.float8}"
        if importlib.util.find_spec("torchao") is None:
            raise ConfigError(f"{key} trains with torchao's float8 linear layers and torchao is not installed: "
                              "pip install torchao (or hardware.parallel.float8=none)")
        if lora:
            raise ConfigError(f"{key} with stage.lora: LoRA's adapters wrap the projections float8 would convert, "
                              "over a frozen 16-bit (or NF4) base; train LoRA in bf16 (hardware.parallel.float8=none)"
                              " or full weights with float8 (stage.lora.rank=0)")
        if self.float8_emulate:
            return
        if not gpu:
            raise ConfigError(f"{key} needs a GPU with float8 tensor cores (compute capability 8.9+: H100, H200, "
                              "L40S); this run is on the CPU. Use hardware.parallel.float8=none (tests: "
                              "hardware.parallel.float8_emulate=true runs the float8 path emulated)")
        if torch.cuda.is_available():
            cap = torch.cuda.get_device_capability()
            if cap < (8, 9):
                raise ConfigError(f"{key}: {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]}) has "
                                  "no float8 tensor cores (8.9+ needed: H100, H200, L40S); use "
                                  "hardware.parallel.float8=none on this GPU")


def check_tensor_parallel(tp, world: int, model, strategy: str = "fsdp2", replicate: int = 1) -> None:
    """Refuse, before any work, a ``hardware.tensor_parallel_size`` the run cannot hold: it must divide the world
    size and every dimension the plan splits (query and key/value heads, the MLP's hidden size and, unless the
    embeddings are tied, the vocabulary), it runs under FSDP2, and HSDP's R must divide the data-parallel ranks
    (world / tp). `model`: the run's ModelConfig."""
    key = "hardware.tensor_parallel_size"
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"{key}={tp!r}: the number of ranks each block's projections are split over, an integer "
                          ">= 1 (1: no tensor parallelism)")
    if tp == 1:
        return
    if strategy != "fsdp2":
        raise ConfigError(f"{key}={tp} runs on Lightning's ModelParallelStrategy and this run's hardware.strategy is "
                          f"{strategy!r}; use hardware=fsdp (strategy fsdp2), or {key}=1")
    if world % tp == 0 and (world // tp) % replicate:
        fits = [r for r in range(1, world // tp + 1) if (world // tp) % r == 0]
        raise ConfigError(f"hardware.parallel.replicate={replicate} does not divide the {world // tp} data-parallel "
                          f"ranks (world size {world} / {key}={tp}): each HSDP replica group must hold the same number "
                          f"of tensor-parallel groups. Use replicate in {fits}")
    split = {"world size (hardware.devices x hardware.num_nodes)": world, "model.n_heads": model.n_heads,
             "model.n_kv_heads": model.n_kv_heads, "model.hidden_dim": model.hidden_dim}
    if not model.tie_embeddings:
        split["model.vocab_size"] = model.vocab_size
    bad = {k: v for k, v in split.items() if v % tp}
    if bad:
        fits = [t for t in range(1, world + 1) if all(v % t == 0 for v in split.values())]
        raise ConfigError(f"{key}={tp} does not divide " + ", ".join(f"{k}={v}" for k, v in bad.items())
                          + f": each tensor-parallel rank takes an equal share of them. Values that fit: {fits}")
