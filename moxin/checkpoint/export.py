"""The stage's model as a Hugging Face folder, from any strategy (one process, DDP or FSDP2 shards), and a LoRA
run's adapters beside it in PEFT's format."""

from __future__ import annotations

import os
from pathlib import Path

from moxin.model import lora
from moxin.model.hf import write_hf


def export_hf(stage, hf_dir: str | os.PathLike, *, is_global_zero: bool, max_shard_bytes: int = 5 * 1024**3,
              tokenizer_files: list[str] | None = None) -> Path | None:
    """Write the stage's model as a Hugging Face folder. Under FSDP2 every rank must call this (each parameter
    is gathered with ``DTensor.full_tensor()``, a collective); rank 0 keeps at most one safetensors shard of
    gathered tensors in host memory, writes it and drops it. Returns the folder on rank 0, None elsewhere."""
    model = stage.model

    def gathered():
        if lora.has_lora(model):  # the merged model (W + alpha / r B A, fp32), gathered tensor by tensor
            for name, full in lora.merged_items(model):
                yield name, full if is_global_zero else None
            return
        for name, t in model.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective under FSDP2: all ranks
            yield name, full if is_global_zero else None

    out = write_hf(gathered(), model.cfg, hf_dir, is_global_zero=is_global_zero, max_shard_bytes=max_shard_bytes,
                   tokenizer_files=tokenizer_files)
    if lora.has_lora(model):  # and the adapters alone, in PEFT's format, for the base the run started from
        base = getattr(stage, "init_from", None)
        base = str(Path(base).resolve()) if base and Path(base).exists() else base
        lora.save_peft_adapter(model, Path(hf_dir).with_name(Path(hf_dir).name + "_adapter"), base,
                               is_global_zero=is_global_zero)
    return out
