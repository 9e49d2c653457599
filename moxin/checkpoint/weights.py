"""A model's weights (moxin names) from any source, for ``init_from``, conversion and inspection.

`load_model_weights` reads a moxin ``.ckpt`` file, a distributed-checkpoint folder (without a process group), a run
folder or its checkpoints folder, a Hugging Face folder, a safetensors file or a PEFT LoRA adapter (merged into its
base), with the model config that produced them where the source records it; `load_init_weights` loads them
into a model after checking that names, shapes and the recorded architecture fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load

from moxin.checkpoint.files import LAST, CheckpointError, check_distributed, read_info
from moxin.checkpoint.resume import config_mismatches
from moxin.config import InitFromError, ModelConfig, check_init_from
from moxin.model import Transformer, lora
from moxin.model.hf import hf_to_moxin_config, load_hf


def _strip_model_prefix(sd: dict) -> dict:
    out = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return out or sd


def load_distributed_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a distributed checkpoint folder, full (unsharded) on the CPU, read without a
    process group: DCP reshards any saved layout into one. Optimizer shards are not read."""
    check_distributed(path)
    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    sd: dict[str, Any] = {}
    for key, meta in md.state_dict_metadata.items():
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata):
            sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not sd:
        raise CheckpointError(f"{path}: no model tensors (state_dict.*) in this distributed checkpoint")
    load(sd, storage_reader=reader, no_dist=True)
    return _strip_model_prefix({k[len("state_dict."):]: v for k, v in sd.items()})


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any, str]:
    """(moxin-named tensors, the ModelConfig that produced them or None when the source does not record one,
    a description of the source) from a moxin .ckpt, a distributed-checkpoint folder, a run's checkpoints
    folder or run folder, a Hugging Face folder, a safetensors file or a PEFT adapter."""
    check_init_from(path)
    p = Path(path)
    if lora.is_peft_adapter(p):  # a PEFT LoRA adapter: its base (adapter_config.json) with the adapter merged in
        base = json.loads((p / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise InitFromError(f"init_from={str(path)!r} is a LoRA adapter whose base_model_name_or_path "
                                f"({base!r}, in {p / lora.ADAPTER_CONFIG}) is not a local folder: set it to the "
                                "base model's Hugging Face folder (or a moxin checkpoint) and retry")
        sd, cfg, what = load_model_weights(base)
        return lora.merge_peft_adapter(sd, p), cfg, f"LoRA adapter {p} merged into {what}"
    if p.is_dir() and not (p / ".metadata").exists():
        if (p / "config.json").exists():
            cfg = hf_to_moxin_config(json.loads((p / "config.json").read_text()), source=str(p / "config.json"))
            return load_hf(p).state_dict(), cfg, f"Hugging Face folder {p}"
        for sub in (p / LAST, p / "checkpoints" / LAST):
            if sub.exists():
                return load_model_weights(sub)
        raise InitFromError(f"init_from={str(path)!r}: no config.json (Hugging Face), .metadata (distributed "
                            "checkpoint) or last.ckpt inside")
    if p.suffix == ".safetensors":
        return load_file(str(p)), None, f"safetensors file {p}"
    info = read_info(p)
    mc = info.moxin.get("model_config")
    cfg = ModelConfig(**{k: v for k, v in mc.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}) \
        if mc else None
    if p.is_dir():
        sd, what = load_distributed_weights(p), f"distributed checkpoint {p} (step {info.step})"
    else:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
        sd, what = _strip_model_prefix(ckpt.get("state_dict", ckpt)), f"checkpoint {p} (step {info.step})"
    saved_lora = info.moxin.get("lora")
    if saved_lora:  # a LoRA run's checkpoint holds its adapters: merged into the base that run started from
        base, _, base_what = load_model_weights(saved_lora["base"])
        lora.merge_adapters(base, lora.adapters_by_weight(sd), saved_lora["alpha"] / saved_lora["rank"], str(p))
        return base, cfg, f"{what}: LoRA adapters merged into {base_what}"
    return sd, cfg, what


def load_init_weights(model: Transformer, path: str) -> None:
    """Initialise from a Hugging Face MistralForCausalLM directory, a moxin checkpoint (a .ckpt file or the
    distributed-checkpoint folder an FSDP run writes), a run folder or a safetensors file of moxin names.

    Names and shapes must match, and so must the architecture the source records (HF config.json, or the
    model config moxin stores in its checkpoints): a window, RoPE base or norm epsilon that differs leaves
    every shape equal but computes something else, so it is refused with the fields named."""
    src, src_cfg, what = load_model_weights(path)
    if src_cfg is not None:
        bad = config_mismatches(model.cfg, src_cfg)
        if bad:
            raise ValueError(f"init_from={path}: the {what} was trained with another architecture than this "
                             f"run's model config: " + "; ".join(bad) + ". Set those model.* keys to the source's "
                             "values (or pick a model config that matches it)")
    own = model.state_dict()
    if model.cfg.tie_embeddings:
        src = {k: v for k, v in src.items() if k != "output.weight"} | {"output.weight": src.get(
            "output.weight", src.get("tok_embeddings.weight"))}
    missing = sorted(set(own) - set(src))
    unexpected = sorted(set(src) - set(own))
    if missing or unexpected:
        raise KeyError(f"init_from={path}: checkpoint does not fit the model config; missing {missing[:5]}"
                       f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in src.items():
        if v.shape != own[k].shape:
            raise ValueError(f"init_from={path}: tensor {k} has shape {tuple(v.shape)} in the checkpoint but "
                             f"{tuple(own[k].shape)} in the model; the model config does not match the checkpoint")
    model.load_state_dict(src)
