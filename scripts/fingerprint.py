"""A finished run's fingerprint: its last logged metrics and a checksum of its final weights.

Two runs with the same seed and config on the same kind of machine must print the same fingerprint; a refactor
that changes the numbers shows here (the structure step's before/after check). Timing columns are left out.

    python scripts/fingerprint.py runs/<run> [runs/<other run> ...]
"""

import argparse
import csv
import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

TIMING = ("time", "tok_s", "tokens_per_s", "per_sec", "per_s", "_s/", "mfu", "eta", "sec", "throughput", "epoch")


def last_metrics(run: Path) -> dict[str, str]:
    """The last non-empty value of every non-timing column of the run's metrics.csv files."""
    values: dict[str, str] = {}
    for path in sorted(run.rglob("metrics.csv")):
        if "warmup" in path.relative_to(run).parts:
            prefix = "warmup:"
        else:
            prefix = ""
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    timing = key.endswith("_s") or any(t in key for t in TIMING)
                    if value not in ("", None) and not timing:
                        values[prefix + key] = value
    return dict(sorted(values.items()))


def weights_checksum(run: Path) -> str:
    """sha256 over the final HF export's tensors in name order (bytes, dtype and shape)."""
    files = sorted((run / "hf").glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{run}/hf: no safetensors export (run with export_hf=true)")
    digest = hashlib.sha256()
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        print(json.dumps({"run": str(run), "weights": weights_checksum(run), "metrics": last_metrics(run)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
