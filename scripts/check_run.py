"""Check that a finished moxin run did what a chain needs: it trained, its metrics are finite, and (with
`--after`) it started from exactly the weights the previous run ended with.

    python scripts/check_run.py runs/sft                      # ran, finite
    python scripts/check_run.py runs/dpo --after runs/sft     # ... and its init_from carried runs/sft's weights

Reads each run's summary.json: `optimizer_steps`, `metrics`, `weights_checksum` (sum of every parameter in
float64 when the run ended) and `init_checksum` (the same sum over the weights `init_from` loaded, before any
step). A run with an SFT warm-up (`warmup.steps`, moxin/warmup.py: its own run in `<run>/warmup`) is checked as
the chain it is: the warm-up ran and started from `--after`'s final weights, and the run from the warm-up's.
Prints one line per run; exits 1 naming what failed. Used by scripts/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# metrics that say a stage really computed something; at least one must be present and finite
PROGRESS = ("train/loss", "grpo/reward_mean", "val/loss", "val/dpo_accuracy")


def load_summary(run: Path) -> dict:
    f = run / "summary.json"
    if not f.is_file():
        raise SystemExit(f"FAIL {run}: no summary.json (the run did not finish)")
    return json.loads(f.read_text())


def check(run: Path, after: Path | None, rel_tol: float) -> list[str]:
    s = load_summary(run)
    errors = []
    if s.get("optimizer_steps", 0) <= 0:
        errors.append(f"no optimizer step ran (optimizer_steps={s.get('optimizer_steps')})")
    m = s.get("metrics", {})
    present = {k: m[k] for k in PROGRESS if k in m}
    if not present:
        errors.append(f"none of {PROGRESS} was logged")
    bad = {k: v for k, v in m.items() if not math.isfinite(v)}
    if bad:
        errors.append(f"non-finite metrics: {bad}")
    if not math.isfinite(s.get("weights_checksum", float("nan"))):
        errors.append(f"final weights are not finite (checksum {s.get('weights_checksum')})")
    warmup = run / "warmup"
    if (warmup / "summary.json").is_file():  # the run's SFT warm-up: after -> warm-up -> run
        errors += [f"warm-up: {e}" for e in check(warmup, after, rel_tol)]
        after = warmup
    if after is not None:
        prev = load_summary(after)
        want, got = prev.get("weights_checksum"), s.get("init_checksum")
        if got is None:
            errors.append(f"init_from was not used (init_from={s.get('init_from')!r})")
        elif not math.isclose(got, want, rel_tol=rel_tol, abs_tol=1e-6):
            errors.append(f"hand-off: init_from={s.get('init_from')} loaded weights with checksum {got!r}, but "
                          f"{after} ended with {want!r}")
    line = ", ".join(f"{k} {v:.4g}" for k, v in present.items())
    hand = "" if after is None else f", init = {after.name}'s final weights"
    print(f"{'OK  ' if not errors else 'FAIL'} {run}: {s.get('optimizer_steps')} steps, {s.get('seconds')} s, "
          f"{line}{hand}" + ("".join(f"\n     - {e}" for e in errors)))
    return errors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="the run's out_dir (holds summary.json)")
    ap.add_argument("--after", type=Path, help="the run whose final weights this one must have started from")
    ap.add_argument("--rel-tol", type=float, default=1e-6,
                    help="relative tolerance of the checksum comparison (summation order differs when sharded)")
    a = ap.parse_args(argv)
    return 1 if check(a.run, a.after, a.rel_tol) else 0


if __name__ == "__main__":
    sys.exit(main())
