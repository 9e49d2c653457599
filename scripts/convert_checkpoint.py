#!/usr/bin/env python
"""Turn any moxin weights into a Hugging Face MistralForCausalLM folder.

    python scripts/convert_checkpoint.py SRC OUT [--dtype bfloat16] [--model tiny-cpu] [--max-shard-gb 5]

SRC: a moxin checkpoint (a .ckpt file from one process / DDP, or the distributed-checkpoint folder
`checkpoints/stepNNNNNN.ckpt/` an FSDP run writes, read here without a process group: the shards of any number
of ranks are merged), a run folder or its checkpoints/ folder (its last.ckpt), a Hugging Face folder, or a
.safetensors file of moxin names. The architecture comes from the source (moxin checkpoints record their model
config; HF folders have config.json); for a bare .safetensors file name a preset or a YAML of conf/model with
--model. OUT is written shard by shard into a temporary folder and renamed into place.

The tokenizer files go in too, as a run's `hf/` export has them (tokenizer.json / tokenizer.model,
tokenizer_config.json with the chat template of post-trained stages, generation_config.json): from the run's saved
config (`<run>/.hydra/config.yaml`, found above SRC) or from --tokenizer / --stage; --no-tokenizer leaves them out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def model_config(spec: str):
    from moxin.presets import load_preset

    p = Path(spec)
    if p.suffix in (".yaml", ".yml") and p.exists():  # a model YAML of one's own (its Hydra defaults list ignored)
        from hydra.utils import instantiate
        from omegaconf import OmegaConf

        node = OmegaConf.load(p)
        node.pop("defaults", None)
        return instantiate(node)
    return load_preset(spec)  # a name in conf/model (model=<name>)


STAGE_TARGETS = {"pretrain": "moxin.stages.pretrain.PretrainStage", "sft": "moxin.stages.sft.SFTStage",
                 "dpo": "moxin.stages.dpo.DPOStage", "grpo": "moxin.stages.grpo.GRPOStage"}


def run_config(src: str):
    """The saved config of the run SRC belongs to (`.hydra/config.yaml` in SRC or a folder above it), or None."""
    from omegaconf import OmegaConf

    p = Path(src).absolute()
    for d in [p, *p.parents][:4]:
        if (d / ".hydra" / "config.yaml").is_file():
            return OmegaConf.load(d / ".hydra" / "config.yaml")
    return None


def tokenizer_config(src: str, model_cfg, tokenizer: str | None, stage: str | None):
    """What the tokenizer export reads: tokenizer, stage (the chat template of SFT/DPO/GRPO models) and
    model.max_seq_len, from the run's config, overridden by --tokenizer / --stage."""
    from omegaconf import OmegaConf

    run = run_config(src)
    tok = tokenizer or (run.get("tokenizer") if run is not None else None) or "mistral"
    target = STAGE_TARGETS[stage] if stage else (OmegaConf.select(run, "stage._target_") if run is not None else None)
    if run is None and not (tokenizer and stage):
        print(f"no run config above {src}: tokenizer {tok!r}, stage {stage or 'pretrain'} "
              "(give --tokenizer / --stage to choose)", file=sys.stderr)
    return OmegaConf.create({"tokenizer": tok, "stage": {"_target_": target or STAGE_TARGETS["pretrain"]},
                             "model": {"max_seq_len": int(model_cfg.max_seq_len)}})


def convert(src: str, out: str, dtype: str | None = None, model: str | None = None, max_shard_gb: float = 5.0,
            tokenizer: str | None = None, stage: str | None = None, with_tokenizer: bool = True) -> Path:
    import torch

    from moxin.checkpoint.resume import config_mismatches
    from moxin.checkpoint.weights import load_model_weights
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
    extra = ""
    if with_tokenizer:
        from moxin.tokenizer.hf_export import write_export_tokenizer

        files = write_export_tokenizer(path, tokenizer_config(src, cfg, tokenizer, stage))
        extra = f", {', '.join(sorted(f.name for f in files))}"
    print(f"{what} -> {path} ({len(names)} tensors{extra})")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("out")
    ap.add_argument("--dtype", default=None, help="cast the weights (bfloat16, float16, float32); default: as stored")
    ap.add_argument("--model", default=None, help="model preset or conf/model YAML (needed for bare safetensors)")
    ap.add_argument("--max-shard-gb", type=float, default=5.0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer of the export (default: the run's, else mistral)")
    ap.add_argument("--stage", default=None, choices=sorted(STAGE_TARGETS),
                    help="stage that made the weights: sft/dpo/grpo exports get the chat template (default: the run's)")
    ap.add_argument("--no-tokenizer", action="store_true", help="weights and config.json only")
    a = ap.parse_args(argv)
    convert(a.src, a.out, a.dtype, a.model, a.max_shard_gb, a.tokenizer, a.stage, not a.no_tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
