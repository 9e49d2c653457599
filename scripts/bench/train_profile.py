"""Where a training step's GPU time goes, by kernel family: the bare step of scripts/bench/train.py (moxin-7b
blocks x 8, seq 4096, compiled blocks, bf16 autocast over fp32 weights, the chunked loss head, clipping, fused
AdamW) under torch.profiler, beside Hugging Face MistralForCausalLM of the same shape (compiled, SDPA) profiled the
same way in the same run, on the same token rows but without their document boundaries (full causal rows).

Families: matrix products, attention, Inductor's fused kernels (elementwise, norms, casts), the optimizer and
foreach kernels (AdamW, gradient norm, clipping), everything else. ms a step is kernel time summed (kernels of
one stream do not overlap); wall is the step's time between synchronisations, so wall - kernels is idle GPU.
On a GPU it also says where the GPU idles: the gaps between kernels on the device timeline, the largest grouped
by the kernels on either side.

    python scripts/bench/train_profile.py [--mbs 2] [--attn auto] [--no-hf] [--lightning] [--out bench.json]
    python scripts/bench/train_profile.py --smoke     # tiny model, CPU, fp32 (families of CPU ops)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections import defaultdict

import lightning as L
import torch

from _common import default_out, env, free, sync, table, write_json
from train import bare_step, hf_step, lightning_run, make_dm

from moxin.config import ModelConfig
from moxin.distributed import apply_compile
from moxin.model import Transformer
from moxin.model import attention as A
from moxin.presets import load_preset

FAMILIES = (  # first match wins: attention kernels can carry "cutlass" or "gemm" in their names
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "aten::mm", "aten::addmm",
                         "aten::bmm")),
    ("optimizer + foreach", ("multi_tensor_apply", "fused_adam", "foreach", "_fused_adamw")),
    ("Inductor fused", ("triton_",)),
)


def family(name: str) -> str:
    low = name.lower()
    for fam, keys in FAMILIES:
        if any(k in low for k in keys):
            return fam
    return "other"


def _activities(dev) -> list:
    cuda = torch.device(dev).type == "cuda"
    return [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])


def profile(step, dev, warm: int, n: int) -> dict:
    """Kernel time by family (ms a step), the top kernels, and the wall time a step, over n profiled steps."""
    for _ in range(warm):
        step()
    sync(dev)
    with torch.profiler.profile(activities=_activities(dev)) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(dev)
        wall = (time.perf_counter() - t0) / n
    return summarize(prof, dev, wall, n)


class ProfileSteps(L.Callback):
    """Profiles optimizer steps `warm + 1` .. `warm + n` of a Trainer run: the real stage's steps, with
    Lightning's loop, hooks and logging between them (synchronised only at the window's two ends)."""

    def __init__(self, warm: int, n: int):
        self.warm, self.n = warm, n
        self.prof = self.t0 = None
        self.result: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warm and self.prof is None:
            sync(pl_module.device)
            self.prof = torch.profiler.profile(activities=_activities(pl_module.device))
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warm + self.n and self.prof is not None and self.result is None:
            sync(pl_module.device)
            wall = (time.perf_counter() - self.t0) / self.n
            self.prof.__exit__(None, None, None)
            self.result = summarize(self.prof, pl_module.device, wall, self.n)


def summarize(prof, dev, wall: float, n: int) -> dict:
    cuda = torch.device(dev).type == "cuda"
    fams, kernels = defaultdict(float), defaultdict(float)
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False):
            continue  # ranges such as Optimizer.step would count their kernels twice
        if cuda:
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            t = e.self_device_time_total
        else:  # CPU: leaf aten ops only (their self time), the closest to kernels there
            if not e.key.startswith("aten::"):
                continue
            t = e.self_cpu_time_total
        ms = t / 1e3 / n
        if ms > 0:
            fams[family(e.key)] += ms
            kernels[e.key[:90]] += ms
    total = sum(fams.values())
    print(f"profiled: wall {wall * 1e3:.1f} ms a step, kernels {total:.1f} ms: "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(fams.items(), key=lambda kv: -kv[1])), flush=True)
    gaps = idle_gaps(prof.events(), n) if cuda else None
    if gaps:
        print(f"GPU idle between kernels: {gaps['idle_ms']:.1f} ms a step in {gaps['gaps']} gaps of "
              f"{gaps['min_us']} us or more, {gaps['small_ms']:.1f} ms in shorter ones; largest (kernel before -> "
              "kernel after: ms a step, count): "
              + "; ".join(f"{k}: {v[0]:.2f}, {v[1]}" for k, v in gaps["by_pair"][:8]), flush=True)
    return {"wall_ms": wall * 1e3, "kernel_ms": total, "families": dict(fams),
            "top": sorted(kernels.items(), key=lambda kv: -kv[1])[:12], "idle": gaps}


def idle_gaps(events, n: int, min_us: float = 20.0) -> dict | None:
    """Where the GPU waits: the time between one kernel's end and the next kernel's start on the device timeline
    (kernels, copies and memsets of every stream merged), over the profiled steps. Gaps of `min_us` or more are
    grouped by the kernels on either side (their families, the kernel after named), shorter ones only summed
    (launch latency between back-to-back kernels)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False))
    if len(spans) < 2:
        return None
    by_pair, small, big, count = defaultdict(lambda: [0.0, 0]), 0.0, 0.0, 0
    end, before = spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        gap = start - end
        if gap >= min_us:
            key = f"{family(before)} -> {name[:60]}"
            by_pair[key][0] += gap / 1e3 / n
            by_pair[key][1] += 1
            big += gap
            count += 1
        elif gap > 0:
            small += gap
        if stop > end:
            end, before = stop, name
    return {"idle_ms": (big + small) / 1e3 / n, "small_ms": small / 1e3 / n, "gaps": count, "min_us": min_us,
            "by_pair": sorted(by_pair.items(), key=lambda kv: -kv[1][0])}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--attn", default="auto")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--lightning", action="store_true",
                    help="also profile the stage's own steps through L.Trainer (PretrainStage + PretrainDataModule)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        dev, seq, compile_ = "cpu", 128, False
        cfg = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          hidden_dim=128, sliding_window=64, max_seq_len=1024, attn_backend="sdpa")
        warm, n = 1, 1
    else:
        dev, seq, compile_ = "cuda", 4096, True
        cfg = load_preset("moxin-7b", n_layers=8)
        warm, n = a.warm, a.steps
        be = A.resolve_backend(a.attn, torch.device(dev))
        cfg = dataclasses.replace(cfg, attn_backend=be)
    dm = make_dm(seq, a.mbs, warm + n + 1, 0)
    dm.setup("fit")
    batch = next(iter(dm.build_train_loader(0)))
    label = cfg.attn_backend if cfg.attn_backend != "flash" else f"flash{A.flash_version(dev)}"
    runs = {}
    if a.lightning:  # the stage's steps as the bench's first row runs them, data workers and all
        prof = ProfileSteps(warm, n)
        torch.manual_seed(0)
        lightning_run(cfg, seq, a.mbs, warm, n, dev, compile_, 0 if a.smoke else 4, callbacks=[prof])
        runs[f"moxin L.Trainer ({label})"] = prof.result
        torch._dynamo.reset()
        free(dev)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if compile_:
        apply_compile(model)
    runs[f"moxin bare ({label})"] = profile(bare_step(model, batch, dev, autocast=not a.smoke), dev, warm, n)
    del model
    free(dev)
    if not a.no_hf:
        name = "HF MistralForCausalLM sdpa" + (" compiled" if compile_ else " eager")
        step = hf_step(cfg, batch["input_ids"], dev, compile_, autocast=not a.smoke, clip=1.0)  # as bare_step
        runs[name] = profile(step, dev, warm, n)
        free(dev)
    fams = [f for f, _ in FAMILIES] + ["other"]
    rows = []
    for f in fams + ["all kernels", "wall (step)"]:
        r = {"family": f}
        for name, res in runs.items():
            totals = {"all kernels": res["kernel_ms"], "wall (step)": res["wall_ms"]}
            r[name] = totals.get(f, res["families"].get(f, 0.0))
        rows.append(r)
    cols = [("family", "ms a step", "")] + [(name, name, ".1f") for name in runs]
    shape = "tiny model" if a.smoke else f"moxin-7b blocks x {cfg.n_layers}"
    print(table(rows, cols, f"train_profile: {shape}, micro-batch {a.mbs} x {seq}, {dev}"))
    for name, res in runs.items():
        print(f"{name}: top kernels " + "; ".join(f"{k} {v:.2f}" for k, v in res["top"][:8]))
    write_json(a.out or default_out("train_profile"), {"env": env(), "rows": rows, "runs": runs, "mbs": a.mbs,
                                                       "seq": seq})
    return runs


if __name__ == "__main__":
    main()
