#!/usr/bin/env python
"""Turn any moxin weights into a Hugging Face MistralForCausalLM folder.

    python scripts/convert_checkpoint.py SRC OUT [--dtype bfloat16] [--model tiny-cpu] [--max-shard-gb 5]

SRC: a moxin checkpoint (a .ckpt file from one process / DDP, or the distributed-checkpoint folder
`checkpoints/stepNNNNNN.ckpt/` an FSDP run writes, read here without a process group: the shards of any number
of ranks are merged), a run folder or its checkpoints/ folder (its last.ckpt), a Hugging Face folder, or a
.safetensors file of moxin names. The architecture comes from the source (moxin checkpoints record their model
config; HF folders have config.json); for a bare .safetensors file name a preset or a YAML of conf/model with
--model. OUT is written shard by shard into a temporary folder and renamed into place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def model_config(spec: str):
    from moxin.model import ModelConfig

    p = Path(spec)
    if p.suffix in (".yaml", ".yml") and p.exists():  # a model YAML of one's own (its Hydra defaults list ignored)
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        node = OmegaConf.load(p)
        node.pop("defaults", None)
        return instantiate(node)
    return ModelConfig.preset(spec)  # a name in conf/model (model=<name>)


def convert(src: str, out: str, dtype: str | None = None, model: str | None = None, max_shard_gb: float = 5.0) -> Path:
    import torch

    from moxin.checkpointing import config_mismatches, load_model_weights
    from moxin.model.hf import _natural, write_hf

    tensors, cfg, what = load_model_weights(src)
    if model is not None:
        given = model_config(model)
        if cfg is not None and config_mismatches(given, cfg):
            raise SystemExit(f"--model {model} does not match the {what}: {config_mismatches(given, cfg)}")
        cfg = given
    if cfg is None:
        raise SystemExit(f"the {what} records no architecture; name it with --model PRESET_OR_YAML")
    names = sorted(tensors, key=_natural)
    dt = getattr(torch, dtype) if dtype else None
    path = write_hf(((n, tensors[n]) for n in names), cfg, out, dtype=dt,
                    max_shard_bytes=int(max_shard_gb * 1024**3))
    print(f"{what} -> {path} ({len(names)} tensors)")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--dtype", default=None, help="cast the weights (bfloat16, float16, float32); default: as stored")
    ap.add_argument("--model", default=None, help="model preset or conf/model YAML (needed for bare safetensors)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    a = ap.parse_args(argv)
    convert(a.src, a.out, a.dtype, a.model, a.max_shard_gb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
