"""Shared helpers of the benchmarks: timing (CUDA events or host clock), tables, JSON output."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989.0  # dense bf16, H100/H200 SXM datasheet (the MFU convention of the issues)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warm: int = 3, reps: int = 10) -> float:
    """Median seconds of `fn()` after `warm` calls (CUDA events on a GPU, perf_counter elsewhere)."""
    for _ in range(warm):
        fn()
    sync(device)
    ts = []
    cuda = torch.device(device).type == "cuda"
    for _ in range(reps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def env() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    return out


def table(rows: list[dict], cols: list[tuple[str, str, str]], title: str) -> str:
    """cols: (key, header, format) -> a fixed-width text table (markdown pipes)."""
    cells = [[h for _, h, _ in cols]]
    for r in rows:
        line = []
        for k, _, f in cols:
            v = r.get(k)
            line.append("-" if v is None else (format(v, f) if f else str(v)))
        cells.append(line)
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    fmt = lambda c: "| " + " | ".join(x.rjust(w[i]) for i, x in enumerate(c)) + " |"
    lines = [title, fmt(cells[0]), "|" + "|".join("-" * (n + 2) for n in w) + "|"] + [fmt(c) for c in cells[1:]]
    return "\n".join(lines)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=str))
    print(f"wrote {path}", flush=True)


def free(device) -> None:
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def default_out(name: str) -> str:
    base = os.environ.get("OUT") or "bench_out"
    return str(Path(base) / f"{name}.json")
