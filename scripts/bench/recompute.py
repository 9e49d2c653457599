"""Recomputation policies measured through the real run: one short pretraining run per policy (the user's path:
`python -m moxin.run`, data module, stage, Trainer, FSDP2 when several processes), each printing tokens/s, MFU
and the peak GPU memory of rank zero; the ratios are against `full` (every block recomputed), the policy a
7B run on 80 GB GPUs needs. A policy that does not fit is reported with its error line, not hidden.

    # the issue's setting: full Moxin-7B, FSDP2 on 2 H200s, 2 rows of 4K a GPU, compiled blocks
    python3 scripts/bench/recompute.py --nproc 2 --model moxin-7b --hardware fsdp --policies none mlp full
    # a CPU smoke run of the script itself (tiny model, one process, none and full)
    python3 scripts/bench/recompute.py --smoke

No checkpoint is written (trainer.save_checkpoints=false: a 7B checkpoint is ~97 GB), no HF export, no
validation; every run's own folder (summary.json, metrics.csv, the run log) stays under --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, default_out, table, write_json  # noqa: E402

POLICIES = ("none", "mlp", "attention", "full")


def overrides(a, policy: str, out: Path) -> list[str]:
    rows = a.rows
    per_step = a.seq * rows * a.nproc  # one micro-batch a process, no accumulation
    return [f"model={a.model}", f"hardware={a.hardware}", f"hardware.parallel.activation_checkpointing={policy}",
            f"schedule.tokens_per_step={per_step}", f"schedule.micro_batch_tokens={a.seq * rows}",
            f"schedule.phases=[{{name: bench, seq_len: {a.seq}, tokens: {per_step * a.steps}, "
            "mixture: {prose: 0.45, code: 0.35, cjk: 0.2}}]",
            "trainer.val_every_n_steps=null", "trainer.save_checkpoints=false", "export_hf=false",
            "samples.prompts=[]", "trainer.progress_bar=plain", "trainer.progress_every_n_steps=1",
            f"out_dir={out}", f"run_name=recompute-{policy}"] + (
        [f"hardware.devices={a.nproc}"] if a.nproc > 1 else []) + list(a.extra)


def run_policy(a, policy: str, out_dir: Path) -> dict:
    out = out_dir / policy
    launch = [sys.executable]
    if a.nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]
    cmd = launch + ["-m", "moxin.run"] + overrides(a, policy, out)
    log = out_dir / f"{policy}.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=a.timeout,
                            env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    row = {"policy": policy, "wall_s": time.perf_counter() - t0, "log": str(log)}
    summary = out / "summary.json"
    if rc != 0 or not summary.exists():
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "OutOfMemory" in ln or "Error" in ln), lines[-1] if lines else "")
        return row | {"error": f"exit {rc}: {err.strip()[:200]}"}
    s = json.loads(summary.read_text())
    return row | {"tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"], "peak_gib": s["peak_memory_gib"],
                  "steps": s["optimizer_steps"], "loss": s["metrics"].get("train/loss")}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=["none", "mlp", "full"], choices=POLICIES)
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs); 1 runs without torchrun")
    p.add_argument("--model", default="moxin-7b")
    p.add_argument("--hardware", default="fsdp")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--rows", type=int, default=2, help="rows of --seq tokens a process per step")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps; tokens/s is over the last 5 intervals")
    p.add_argument("--timeout", type=int, default=1800, help="seconds a run may take (compile included)")
    p.add_argument("--out-dir", default=None, help="run folders (default: $OUT/recompute or bench_out/recompute)")
    p.add_argument("--out", default=None, help="JSON of the rows (default: $OUT/recompute.json)")
    p.add_argument("--smoke", action="store_true", help="tiny model, one CPU process, 3 steps, none and full")
    p.add_argument("extra", nargs="*", help="more moxin.run overrides, e.g. hardware.parallel.compile=false")
    a = p.parse_args(argv)
    if a.smoke:
        a.policies, a.nproc, a.model, a.hardware, a.seq, a.steps = ["none", "full"], 1, "tiny-cpu", "cpu", 128, 3
    if a.steps < 3:
        p.error("--steps must be at least 3 (the first step compiles; tokens/s needs two more)")
    out_dir = Path(a.out_dir or Path(a.out or default_out("recompute")).with_suffix(""))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for policy in a.policies:
        r = run_policy(a, policy, out_dir)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "log"}), flush=True)
    base = next((r for r in rows if r["policy"] == "full" and r.get("tokens_per_s")), None)
    for r in rows:
        if base and r.get("tokens_per_s"):
            r["vs_full"] = r["tokens_per_s"] / base["tokens_per_s"]
            if r.get("peak_gib") and base.get("peak_gib"):
                r["mem_vs_full"] = r["peak_gib"] / base["peak_gib"]
    print(table(rows, [("policy", "policy", ""), ("tokens_per_s", "tok/s", ",.0f"), ("mfu", "MFU", ".3f"),
                       ("peak_gib", "peak GiB (rank 0)", ".1f"), ("vs_full", "speed vs full", ".2f"),
                       ("mem_vs_full", "memory vs full", ".2f"), ("wall_s", "wall s", ".0f"), ("error", "error", "")],
                f"recomputation policies: {a.model}, {a.nproc} process(es), {a.rows} x {a.seq} tokens a process"),
          flush=True)
    write_json(a.out or default_out("recompute"), {"args": vars(a), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
