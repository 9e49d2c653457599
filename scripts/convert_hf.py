#!/usr/bin/env python
"""Hugging Face MistralForCausalLM checkpoints <-> moxin.

    python scripts/convert_hf.py check PATH     # load a HF directory, print its moxin config and parameter count

A moxin training checkpoint (a .ckpt file or an FSDP run's distributed-checkpoint folder) becomes a HF folder with
scripts/convert_checkpoint.py; a HF folder trains on directly (init_from=PATH).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys


def check(path: str) -> int:
    from moxin.model.hf import load_hf

    model = load_hf(path)
    cfg = model.cfg
    for f in dataclasses.fields(cfg):
        print(f"{f.name:16s} {getattr(cfg, f.name)}")
    n = sum(p.numel() for p in model.parameters())
    print(f"parameters       {n:,} ({n / 1e9:.3f} B); config formula {cfg.num_params():,}")
    return 0 if n == cfg.num_params() else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="load a HF MistralForCausalLM directory and print config + parameter count") \
        .add_argument("path")
    args = ap.parse_args(argv)
    if args.cmd == "check":
        return check(args.path)
    return 2


if __name__ == "__main__":
    sys.exit(main())
