"""Kill a tiny pretraining run at random moments (SIGKILL to the whole process group, as a node failure would),
resume it with resume=auto until it finishes, and compare it with an uninterrupted run.

    python tests/helpers/kill_loop.py OUT --mode single|fsdp --kills 6 --seed 0

Both runs train on a corpus written to OUT/corpus whose exact duplicates come late (after the first kills),
so a resume that lost its dedup set trains on them.

Writes OUT/kill_loop.json: kills, resumes, for every resume the newest complete checkpoint at the kill and the
step resume=auto chose (they must be equal: no progress lost beyond the last checkpoint), steps retrained,
the largest train-loss difference over every logged step, the largest weight difference of the final
checkpoint, `state_diff`: every leaf of the final checkpoints that differs (weights, optimizer state, loop and
loader state, reader states with their dedup sets, tokens_seen, RNG states; [] when equal), and the final
val/loss of both runs. Used by tests/test_fsdp_checkpoints_and_kill_loops.py.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

if str(ROOT) not in sys.path:  # run as a script: the repository root, for tests.helpers
    sys.path.insert(0, str(ROOT))
from tests.helpers.tiny_overrides import TINY_PRETRAIN, replaced  # noqa: E402

#: the tiny pretraining run with a checkpoint and a flushed metrics row at every step
TINY = replaced(TINY_PRETRAIN, "trainer.checkpoint_every_n_steps=1", "hardware.num_workers=0",
                "+logger.csv.flush_logs_every_n_steps=1")


LEGACY_FSDP = ["hardware=fsdp", "hardware.accelerator=cpu", "hardware.devices=2", "hardware.precision=32-true",
               "hardware.num_workers=0", "hardware.peak_tflops=null", "hardware.parallel.compile=false",
               "hardware.parallel.activation_checkpointing=none", "hardware.parallel.fsdp_param_dtype=null"]


def command(mode: str, out: Path, port: int, legacy: bool = False, data: tuple[str, ...] = ()) -> list[str]:
    args = TINY + list(data) + [f"out_dir={out}", f"run_name={out.name}", "resume=auto"]
    if mode == "fsdp":
        hw = LEGACY_FSDP if legacy else ["hardware=fsdp_cpu"]
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(port),
                "-m", "moxin.run"] + hw + args
    return [sys.executable, "-m", "moxin.run"] + args


def launch(mode: str, out: Path, port: int, log: Path, code: Path = ROOT, legacy: bool = False,
           data: tuple[str, ...] = ()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(code))
    return subprocess.Popen(command(mode, out, port, legacy, data), cwd=code, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def versions(out: Path) -> set[str]:
    return {p.name for p in out.glob("logs/version_*")}


def first_step(out: Path, names: set[str]) -> int | None:
    steps = []
    for n in names:
        f = out / "logs" / n / "metrics.csv"
        if f.exists():
            for r in csv.DictReader(open(f, errors="replace")):
                if (r.get("step") or "").isdigit() and r.get("train/loss"):
                    steps.append(int(r["step"]))
    return min(steps, default=None)


def kill_tree(p) -> None:
    """SIGKILL the launcher and every process under it at once, as a node failure would (torchrun starts its
    workers in sessions of their own, so killing its process group alone would leave them training)."""
    import psutil

    try:
        procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    for q in procs:
        try:
            q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    p.wait()
    psutil.wait_procs(procs, timeout=30)


def logged(out: Path) -> tuple[dict[int, float], dict[int, float], int]:
    """Per step: the train loss of the latest launch that logged it, val losses, and the highest step logged."""
    train, val, top = {}, {}, -1
    versions = sorted(out.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    for f in versions:
        for r in csv.DictReader(open(f, errors="replace")):
            try:
                step = int(r["step"])
                if r.get("train/loss"):
                    train[step] = float(r["train/loss"])
                    top = max(top, step)
                if r.get("val/loss"):
                    val[step] = float(r["val/loss"])
            except (TypeError, ValueError, KeyError):
                continue  # a line cut by the kill
    return train, val, top


def saved_step(out: Path) -> int:
    """The highest step file name in the checkpoint folder (-1 for none); renamed into place only when complete."""
    steps = [int(m.group(1)) for p in (out / "checkpoints").glob("step*.ckpt")
             if (m := re.match(r"step(\d+)\.ckpt$", p.name))] if (out / "checkpoints").is_dir() else []
    return max(steps, default=-1)


def newest_complete(out: Path) -> int | None:
    sys.path.insert(0, str(ROOT))
    from moxin.checkpoint.resume import find_resume

    info, _ = find_resume(out)
    return None if info is None else info.step


def final_weights(out: Path):
    sys.path.insert(0, str(ROOT))
    from moxin.checkpoint.weights import load_model_weights

    return load_model_weights(out / "checkpoints" / "last.ckpt")[0]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["single", "fsdp"], default="single")
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--code", default=str(ROOT), help="the moxin tree to run (another checkout: a before/after "
                    "comparison; the analysis always uses this tree's readers)")
    ap.add_argument("--legacy", action="store_true", help="the code predates hardware=fsdp_cpu")
    a = ap.parse_args()
    root, code = Path(a.out), Path(a.code)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    sys.path.insert(0, str(ROOT))
    from tests.helpers.resume_state import (load_checkpoint, sources_override, state_diff,
                                            write_corpus_with_late_duplicates)

    data = (sources_override(write_corpus_with_late_duplicates(root / "corpus")),)

    ref = root / "ref"
    p = launch(a.mode, ref, a.port, root / "ref.log", code, a.legacy, data)
    if p.wait() != 0:
        print((root / "ref.log").read_text()[-3000:])
        return 1

    run = root / "killed"
    kills, events, failure = 0, [], None
    launches = 0
    while True:
        log = root / f"launch{launches}.log"
        before = versions(run)
        if events:
            events[-1]["_versions_before"] = before
        p = launch(a.mode, run, a.port + 1 + launches, log, code, a.legacy, data)
        launches += 1
        if kills < a.kills:
            # a random moment once this launch trains: after 1-3 more checkpoints (one per step), then 0-2.5 s
            # on (steps here take about a second: kills land in forward/backward, checkpoint writes, validation)
            target = saved_step(run) + rng.randint(1, 3)
            while p.poll() is None and saved_step(run) < target:
                time.sleep(0.1)
            if p.poll() is None:
                delay = rng.uniform(0.0, 2.5)
                try:
                    p.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    kill_tree(p)
                    kills += 1
                    _, _, top = logged(run)
                    events.append({"kill_after_step_s": round(delay, 2), "highest_step_logged": top,
                                   "newest_complete_checkpoint": newest_complete(run)})
                    continue
        rc = p.wait()
        if rc != 0:
            lines = [l for l in log.read_text().splitlines() if l.strip()]
            failure = {"launch": launches - 1, "rc": rc,
                       "error": next((l for l in reversed(lines) if "Error" in l), lines[-1] if lines else "")[:300]}
        break
    # which step each launch after a kill resumed from: resume=auto names it; older code: the first step the
    # launch logged
    for i, ev in enumerate(events):
        lp = root / f"launch{i + 1}.log"
        text = lp.read_text() if lp.exists() else ""
        m = re.search(r"continuing from .*\(optimizer step (\d+)\)", text)
        new = versions(run) - ev.pop("_versions_before", set())
        ev["resumed_from"] = int(m.group(1)) if m else first_step(run, new)
        top = ev["highest_step_logged"]
        ev["steps_retrained"] = max(0, top + 1 - ev["resumed_from"]) if ev["resumed_from"] is not None else None
        ev["ok"] = ev["resumed_from"] == ev["newest_complete_checkpoint"]
    ta, va, _ = logged(ref)
    tb, vb, _ = logged(run)
    res = {
        "mode": a.mode, "code": str(code), "kills": kills, "launches": launches, "failure": failure,
        "resumes": sum(e["resumed_from"] is not None for e in events), "events": events,
        "all_resumed_from_newest_complete": all(e["ok"] for e in events),
        "steps_retrained": sum(e["steps_retrained"] or 0 for e in events),
        "steps_lost_beyond_newest_checkpoint": sum(max(0, (e["newest_complete_checkpoint"] or 0) - (e["resumed_from"] or 0))
                                                   for e in events if e["resumed_from"] is not None),
        "steps_ref": sorted(ta), "steps_killed": sorted(tb),
        "max_loss_diff": max((abs(ta[s] - tb[s]) for s in ta if s in tb), default=None),
        "missing_steps": sorted(set(ta) - set(tb)),
        "final_val_ref": va.get(max(va)) if va else None, "final_val_killed": vb.get(max(vb)) if vb else None,
        "val_steps_ref": sorted(va), "val_steps_killed": sorted(vb),
        "max_val_diff": max((abs(va[s] - vb[s]) for s in va if s in vb), default=None),
        "leftover_temporaries": sorted(p.name for p in (run / "checkpoints").glob(".*")),
        "checkpoint_files": sorted(p.name for p in (run / "checkpoints").iterdir()),
    }
    try:
        wa, wb = final_weights(ref), final_weights(run)
        res["max_weight_diff"] = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    except Exception as e:  # noqa: BLE001 - a before-run may leave no usable final checkpoint
        res["max_weight_diff"] = f"unreadable: {type(e).__name__}: {e}"[:300]
    try:
        diff = state_diff(*(load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (ref, run)))
        res["state_diff"] = diff[:20] + ([f"... {len(diff) - 20} more"] if len(diff) > 20 else [])
    except Exception as e:  # noqa: BLE001 - as above
        res["state_diff"] = [f"unreadable: {type(e).__name__}: {e}"[:300]]
    (root / "kill_loop.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0 if failure is None else 3


if __name__ == "__main__":
    sys.exit(main())
