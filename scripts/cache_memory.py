"""Bytes the rolling KV cache really allocates, against a full cache, for a model config.

    python scripts/cache_memory.py --preset moxin-7b --tokens 32768 [--device cuda]

Allocates both caches (bf16, batch 1) and reports `RollingKVCache.nbytes()` of each: for Moxin-7B at 32K tokens
the rolling cache holds 4096 slots per layer against 32768, 1/8 of the bytes.
"""

import argparse
import json

import torch

from moxin.model import RollingKVCache
from moxin.presets import load_preset


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="moxin-7b")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    cfg = load_preset(a.preset)
    rolling = RollingKVCache(cfg, 1, a.tokens, device=a.device, dtype=torch.bfloat16)
    r = rolling.nbytes()
    del rolling
    full = RollingKVCache(cfg.replace(sliding_window=None), 1, a.tokens, device=a.device, dtype=torch.bfloat16)
    f = full.nbytes()
    del full
    out = {"preset": a.preset, "tokens": a.tokens, "rolling_bytes": r, "full_bytes": f, "ratio": f / r,
           "rolling_gib": r / 2**30, "full_gib": f / 2**30, "kv_bytes_per_token": cfg.kv_cache_bytes_per_token()}
    print(f"{a.preset} at {a.tokens} tokens, bf16: rolling cache {r / 2**30:.4f} GiB, full cache {f / 2**30:.4f} GiB, "
          f"ratio {f / r:.3f}")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
