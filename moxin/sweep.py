"""What a sweep (`python -m moxin.run -m ...`) leaves for its user: one table of every job, its overrides and
the monitored metric, at the end, also written as `<sweep dir>/sweep_summary.{json,md}`.

A Hydra callback (configured in conf/config.yaml under `hydra.callbacks`):

* `on_job_end` runs where the job ran (in-process for the basic launcher, on the node for submitit) and writes
  `<job dir>/job_result.json`: overrides, monitor, value, status, the error of a failed job;
* `on_multirun_end` runs where the sweep was launched, after all jobs, and reads those files back; this works
  for any launcher that shares the file system (basic, joblib, submitit) and any sweeper (basic, Optuna).

A job whose run never produced the monitored metric (validation every 25 steps in a 5-step job) shows
"never logged" in the table and a warning names it; before, the sweeper silently received None.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

RESULT = "job_result.json"


def _status(job_return) -> tuple[str, Any, str | None]:
    if job_return.status == JobStatus.COMPLETED:
        return "completed", job_return._return_value, None
    err = job_return._return_value
    return "failed", None, f"{type(err).__name__}: {err}" if err is not None else None


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return, **kwargs) -> None:
        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return
        status, value, error = _status(job_return)
        record = {"job": hc.job.num, "overrides": list(job_return.overrides or hc.overrides.task),
                  "monitor": config.get("monitor"), "value": value if isinstance(value, (int, float)) else None,
                  "status": status, "error": error, "dir": hc.runtime.output_dir}
        out = Path(hc.runtime.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / RESULT).write_text(json.dumps(record, indent=2, default=str))

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir)
        if not rows:
            return
        text = format_table(rows)
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2, default=str))
        (sweep_dir / "sweep_summary.md").write_text(text + "\n")
        print(text, flush=True)
        print(f"(also in {sweep_dir.resolve() / 'sweep_summary.md'})", flush=True)


def collect(sweep_dir: Path) -> list[dict]:
    rows = []
    for f in sweep_dir.glob(f"*/{RESULT}"):
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(rows, key=lambda r: int(r.get("job", 0)))


def _varying(rows: list[dict]) -> list[list[str]]:
    """Each job's overrides, without the ones every job shares (those say nothing about the comparison)."""
    sets = [r.get("overrides") or [] for r in rows]
    common = set.intersection(*map(set, sets)) if len(sets) > 1 else set()
    return [[o for o in s if o not in common] or s for s in sets]


def format_table(rows: list[dict]) -> str:
    monitor = next((r["monitor"] for r in rows if r.get("monitor")), "metric")
    done = [r for r in rows if r["status"] == "completed" and r.get("value") is not None]
    best = min(done, key=lambda r: r["value"])["job"] if done else None
    lines = [f"sweep summary: {len(rows)} jobs, monitor={monitor} (lower is better; * best)", "",
             f"| job | overrides | {monitor} |", "|---|---|---|"]
    for r, ov in zip(rows, _varying(rows)):
        if r["status"] != "completed":
            val = f"failed: {(r.get('error') or '')[:120]}"
        elif r.get("value") is None:
            val = "never logged"
        else:
            val = f"{r['value']:.4f}" + (" *" if r["job"] == best else "")
        lines.append(f"| {r['job']} | {' '.join(ov)} | {val} |")
    missing = [r["job"] for r in rows if r["status"] == "completed" and r.get("value") is None]
    if missing:
        lines += ["", f"warning: monitor={monitor} was never produced by job(s) {missing}: the sweeper got None "
                      "for them. Validate more often (trainer.val_every_n_steps) or monitor another metric."]
    return "\n".join(lines)
