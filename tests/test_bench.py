"""The benchmark scripts run end to end on the CPU with tiny shapes (--smoke), so they do not rot.
No assertions on speed: only that each produces its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["attention", "generate", "train", "recompute", "train_profile"])
def test_bench_smoke(script, tmp_path):
    out = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / f"{script}.py"), "--smoke", "--out", str(out)]
                       + (["--whole-rows", "--device-bounds"] if script == "train" else []),
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["rows"] and all("error" not in row for row in data["rows"]), data["rows"]
    assert "|" in r.stdout
    if script == "train":  # moxin on the same tokens without document boundaries, beside the packed rows
        assert any("whole rows" in row["impl"] for row in data["rows"])
        assert any("read from the device" in row["impl"] for row in data["rows"])
    if script == "generate":
        assert all(v["equal_tokens"] == 1.0 for v in data["greedy_agree"].values())
    if script == "train_profile":  # the families partition the kernel time; products dominate even here
        for run in data["runs"].values():
            assert sum(run["families"].values()) == pytest.approx(run["kernel_ms"])
            assert run["families"]["matrix products"] > 0 and run["wall_ms"] >= run["kernel_ms"] * 0.5
    if script == "recompute":  # whole runs through moxin.run: recomputing changes the memory, never the loss
        none, full = data["rows"]
        assert none["steps"] == full["steps"] == 3 and none["tokens_per_s"] > 0 and none["vs_full"] > 0
        assert none["loss"] == pytest.approx(full["loss"], rel=1e-6)
