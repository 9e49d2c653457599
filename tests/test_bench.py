"""The benchmark scripts run end to end on the CPU with tiny shapes (--smoke), so they do not rot.
No assertions on speed: only that each produces its table and JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["attention", "generate", "train", "grpo_update",
                                    # whole runs (25 s): the policies' equal losses and gradients are
                                    # tests/test_distributed.py::test_recompute_policies_give_the_same_loss...'s
                                    pytest.param("recompute", marks=pytest.mark.slow),
                                    # the profiler over a Lightning run (11 s); its gap grouping is tested below
                                    pytest.param("train_profile", marks=pytest.mark.slow),
                                    # 2 torchrun processes: tests/test_grpo_rollout_fsdp.py checks the same path
                                    pytest.param("rollout", marks=pytest.mark.slow),
                                    # a whole GRPO step with the verifier's worker processes (20 s); the rollout
                                    # and update it times are tests/test_grpo.py's
                                    pytest.param("grpo_step", marks=pytest.mark.slow)])
def test_bench_smoke(script, tmp_path):
    out = tmp_path / f"{script}.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench" / f"{script}.py"), "--smoke", "--out", str(out)]
                       + (["--whole-rows", "--device-bounds", "--float8", "rowwise", "--loss-steps", "3"]
                          if script == "train" else [])
                       + (["--lightning"] if script == "train_profile" else []),
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["rows"] and all("error" not in row for row in data["rows"]), data["rows"]
    assert "|" in r.stdout
    if script == "train":  # moxin on the same tokens without document boundaries, beside the packed rows
        assert any("whole rows" in row["impl"] for row in data["rows"])
        assert any("read from the device" in row["impl"] for row in data["rows"])
        assert any("float8 rowwise" in row["impl"] for row in data["rows"])  # float8 (emulated) beside bf16
        curves = data["loss_curves"]
        assert len(curves["curves"]["none"]) == len(curves["curves"]["rowwise"]) == 3
        assert 0 <= curves["max_rel_diff"]["rowwise"] < 0.05
    if script == "grpo_update":  # the same rollouts both ways: packing leaves the padding out of the forwards
        pad, packed = data["rows"][:2]
        assert pad["tokens"] == packed["tokens"] and packed["through_model"] < pad["through_model"]
        assert data["ratio"] > 0
    if script == "grpo_step":  # generation, scoring and update timed, the update beside pretraining
        assert data["step_s"] > 0 and data["ratios"]["update_vs_pretrain"] > 0
        assert all(s["gen_tokens"] > 0 and s["update_tokens"] > 0 for s in data["steps"])
    if script == "rollout":  # 2 gloo ranks: the gathered copy samples the unsharded model's tokens
        assert data["world"] == 2 and data["equal_tokens"] and data["ratios"]["gathered_vs_one_gpu"] > 0
    if script == "generate":
        assert all(v["equal_tokens"] == 1.0 for v in data["greedy_agree"].values())
    if script == "train_profile":  # the families partition the kernel time; products dominate even here
        assert any("L.Trainer" in name for name in data["runs"]) and len(data["runs"]) == 3
        for run in data["runs"].values():
            assert sum(run["families"].values()) == pytest.approx(run["kernel_ms"])
            assert run["families"]["matrix products"] > 0 and run["wall_ms"] >= run["kernel_ms"] * 0.5
    if script == "recompute":  # whole runs through moxin.run: recomputing changes the memory, never the loss
        none, full = data["rows"]
        assert none["steps"] == full["steps"] == 3 and none["tokens_per_s"] > 0 and none["vs_full"] > 0
        assert none["loss"] == pytest.approx(full["loss"], rel=1e-6)


def test_train_profile_idle_gaps_group_the_waits_between_kernels():
    """The profile's idle analysis on a made-up device timeline: overlapping kernels of two streams count as busy,
    gaps of 20 us or more are grouped by the kernels on either side, shorter ones only summed."""
    from types import SimpleNamespace

    import torch

    sys.path.insert(0, str(ROOT / "scripts" / "bench"))
    try:
        from train_profile import idle_gaps
    finally:
        sys.path.remove(str(ROOT / "scripts" / "bench"))

    def k(start, end, name, dev=torch.autograd.DeviceType.CUDA):
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=dev)

    events = [k(0, 100, "sm90_gemm_a"), k(50, 120, "triton_poi_1"),  # overlap: busy to 120
              k(125, 200, "sm90_gemm_b"),                              # 5 us: a short gap
              k(300, 400, "fused_adamw_kernel"),                       # 100 us after a product
              k(400, 410, "cpu_op", torch.autograd.DeviceType.CPU),    # host events are not on the timeline
              k(430, 500, "sm90_gemm_a"),                              # 30 us after the optimizer
              k(530, 600, "sm90_gemm_a")]                              # 30 us after a product
    g = idle_gaps(events, n=2)
    assert g["gaps"] == 3 and g["small_ms"] == pytest.approx(5 / 1e3 / 2)
    assert g["idle_ms"] == pytest.approx((5 + 100 + 30 + 30) / 1e3 / 2)
    assert g["by_pair"][0][0] == "matrix products -> fused_adamw_kernel"
    pairs = {key: (pytest.approx(ms), count) for key, (ms, count) in g["by_pair"]}
    assert pairs == {"matrix products -> fused_adamw_kernel": (0.05, 1),
                     "optimizer + foreach -> sm90_gemm_a": (0.015, 1), "matrix products -> sm90_gemm_a": (0.015, 1)}
    assert idle_gaps(events[:1], n=1) is None
