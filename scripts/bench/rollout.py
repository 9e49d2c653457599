"""GRPO rollout decode under FSDP2: tokens/s per GPU of the gathered copy (`stage.grpo.sharded_rollout=gather`:
each rank gathers the policy once into a 16-bit copy, then decodes its own prompts alone, compiled) against the
eager lockstep path through the sharded model (`lockstep`, every token all-gathers the weights) and against the
same model's one-GPU compiled decode (an unsharded 16-bit copy with fused projections, as `rollout_copy` on one
GPU), all in one run on N GPUs. The gather runs through `GRPOStage.rollout_model`, the stage's own code.

Each rank decodes --prompts x --group sequences of --prompt-len random prompt tokens for --new tokens (sampling at
temperature 0.6, no stop token: every row runs the whole budget), the lockstep path for --lockstep-new tokens (its
rate is flat per token). Decode tokens/s per GPU = rows x (new - 1) / (whole generate - a generate of one token,
i.e. the prefill); the slowest rank's is printed. The gathered row also gives the weight refresh's seconds and its
rate with the refresh counted. The goal of issue #31: gathered >= 0.8x one-GPU. "tokens equal" says whether the
gathered copy sampled the one-GPU model's tokens (same weights, same generator).

    python scripts/bench/rollout.py [--nproc 2 --layers 8 --prompts 8 --group 8 --new 2048] [--out rollout.json]
    python scripts/bench/rollout.py --tiny     # 2 gloo processes on the CPU, tiny model, eager decode

--tp: the policy under tensor parallelism over the N ranks (one data-parallel rank, TP=N). Every rank gathers the
copy (`rollout_model`, the DTensors' full_tensor()); the rollout's --prompts x --group rows are then split over
the group as `GRPOStage.rollout` splits them (each rank its `row_share` with `rows_of`, then `gather_rows`), timed
against one GPU decoding all the rows with the same copy (what each rank of the group decoded before the split).
Printed: decode tokens/s of the rollout (all rows) for both, the split's per GPU, the speedup (ideal N) and
whether the split gave the one-GPU tokens.

    python scripts/bench/rollout.py --tp --nproc 2 [--layers 8 --prompts 8 --group 8 --new 2048]
    python scripts/bench/rollout.py --tp --tiny
It starts itself under torchrun (--nproc processes) unless torchrun started it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from _common import default_out, env, free, sync, table, write_json

from moxin.config import GRPOConfig, ParallelConfig
from moxin.distributed import all_reduce_values, apply_fsdp
from moxin.model import Transformer
from moxin.model.generate import generate
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage, free_storage, kv_cache_bytes, rollout_copy_bytes
from moxin.tensor_parallel import gather_rows, row_share


def timed_generate(model, prompts, new: int, decode: str, seed: int, lockstep: bool = False, rows_of=None):
    """(seconds, output) of one generate call, the device synchronised before and after."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    sync(dev)
    t0 = time.perf_counter()
    out = generate(model, prompts, new, temperature=0.6, generator=g, decode=decode, lockstep=lockstep,
                   rows_of=rows_of)
    sync(dev)
    return time.perf_counter() - t0, out


def decode_rate(model, prompts, new: int, decode: str, seed: int, lockstep: bool = False, rows_of=None):
    """(decode tokens/s, output of the full call, its seconds): rows x (new - 1) over the whole call less a
    prefill-only call, after a warm-up call (compiled: the whole call, which compiles the decode step for this
    cache shape; eager: two tokens). Also (decode seconds) as the fourth item."""
    timed_generate(model, prompts, new if decode == "compiled" else 2, decode, seed, lockstep, rows_of)
    t_full, out = timed_generate(model, prompts, new, decode, seed, lockstep, rows_of)
    t_prefill, _ = timed_generate(model, prompts, 1, decode, seed, lockstep, rows_of)
    t_decode = max(t_full - t_prefill, 1e-9)
    return len(prompts) * (new - 1) / t_decode, out, t_full, t_decode


def tp_worker(a, stage, models: dict, cfg, dev, decode: str) -> None:
    """--tp: the split rollout under TP=world against one GPU's decode of all the rows (module docstring).
    models["one"]: the unsharded copy, taken out of the dict so its memory goes once it has decoded."""
    from torch.distributed.device_mesh import init_device_mesh

    from moxin.distributed import parallelize

    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(dev.type, (1, world), mesh_dim_names=("data_parallel", "tensor_parallel"))
    parallelize(stage.model, stage.parallel_cfg, mesh)
    stage.model.eval()
    B = a.prompts * a.group
    if B < world:
        raise SystemExit(f"--tp: {B} rows (--prompts x --group) for {world} ranks; give each rank a row at least")
    g = torch.Generator().manual_seed(100)  # one data-parallel rank: the same rows on every rank
    prompts = [torch.randint(3, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    prompts = [p for p in prompts for _ in range(a.group)]
    first, end = row_share(B, mesh["tensor_parallel"].get_local_rank(), world)
    with torch.no_grad():
        one = models.pop("one")
        _, one_out, one_full, one_dec = decode_rate(one, prompts, a.new, decode, 7)
        del one
        free(dev)
        sync(dev)
        t0 = time.perf_counter()
        copy_model, _ = stage.rollout_model(sharded=True)  # every rank gathers the whole copy
        sync(dev)
        refresh_s = time.perf_counter() - t0
        _, out, share_full, share_dec = decode_rate(copy_model, prompts[first:end], a.new, decode, 7,
                                                    rows_of=(first, B))
        t0 = time.perf_counter()
        rows, _ = gather_rows(list(range(first, end)), {"tokens": out.tokens}, B, mesh["tensor_parallel"].get_group())
        gather_s = time.perf_counter() - t0
    equal = rows["tokens"] == one_out.tokens
    one_dec, one_full, share_dec, share_full, gather_s, refresh_s = all_reduce_values(
        [one_dec, one_full, share_dec, share_full, gather_s, refresh_s], dev, "max")  # the slowest rank's
    all_equal = all_reduce_values([float(equal)], dev, "min")[0] == 1.0
    tokens = B * (a.new - 1)
    split_rate = tokens / share_dec
    res = [{"impl": f"one GPU decodes all {B} rows (each rank before the split)", "rollout_tok_s": tokens / one_dec,
            "per_gpu": tokens / one_dec, "whole_s": one_full, "speedup": 1.0},
           {"impl": f"TP={world}: split, {end - first} rows a rank + gather", "rollout_tok_s": split_rate,
            "per_gpu": split_rate / world, "whole_s": share_full + gather_s, "speedup": split_rate / (tokens / one_dec),
            "gather_s": gather_s, "refresh_s": refresh_s}]
    ratio = res[1]["speedup"]
    if rank == 0:
        print(table(res, [("impl", "rollout decode", ""), ("rollout_tok_s", "rollout tokens/s", ",.0f"),
                          ("per_gpu", "tokens/s per GPU", ",.0f"), ("speedup", "x one GPU", ".2f"),
                          ("whole_s", "generate s", ".3f"), ("gather_s", "gather s", ".4f"),
                          ("refresh_s", "refresh s", ".3f")],
                    f"GRPO rollout split over TP={world}, {a.layers if not a.tiny else 'tiny'} blocks, {B} rows, "
                    f"prompt {a.prompt_len}, {a.new} new; tokens equal: {all_equal}"))
        print(f"split_vs_one_gpu: {ratio:.2f}x (ideal {world}x; efficiency {ratio / world:.2f})", flush=True)
        write_json(a.out or default_out("rollout_tp"), {"env": env(), "args": vars(a), "world": world, "rows": res,
                                                        "ratios": {"split_vs_one_gpu": ratio},
                                                        "equal_tokens": all_equal})
    dist.destroy_process_group()


def worker(a) -> None:
    cuda = not a.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    cfg = load_preset("tiny", vocab_size=512, attn_backend="sdpa") if a.tiny else \
        load_preset("moxin-7b", n_layers=a.layers)
    decode = "compiled" if cuda else "eager"
    par = ParallelConfig(fsdp_param_dtype="bfloat16" if cuda else None)
    stage = GRPOStage(cfg, grpo=GRPOConfig(group_size=a.group, max_new_tokens=a.new), parallel=par, seed=0)
    torch.manual_seed(0)
    with torch.device(dev):
        stage.configure_model()  # the same initial weights on every rank (same seed)
    stage.to(dev)
    dtype = stage.copy_dtype(sharded=True)
    with torch.device("meta"):
        one = Transformer(cfg)
    one = one.to(dtype).to_empty(device=dev).eval().requires_grad_(False)  # one 16-bit copy: no fp32 double
    with torch.no_grad():
        for (name, p), (name2, q) in zip(one.named_parameters(), stage.model.named_parameters()):
            assert name == name2, (name, name2)
            p.copy_(q)
    one.fuse_projections()
    if a.tp:
        models = {"one": one}
        del one
        return tp_worker(a, stage, models, cfg, dev, decode)
    from torch.distributed.device_mesh import init_device_mesh

    apply_fsdp(stage.model, init_device_mesh(dev.type, (world,)), par.fsdp_param_dtype, par.reshard_after_forward)
    stage.model.eval()
    g = torch.Generator().manual_seed(100 + rank)
    B = a.prompts * a.group
    prompts = [torch.randint(3, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
    prompts = [p for p in prompts for _ in range(a.group)]
    seed = 7 + rank
    rows = []

    with torch.no_grad():
        one_rate, one_out, _, _ = decode_rate(one, prompts, a.new, decode, seed)
        rows.append({"impl": f"one GPU, unsharded {str(dtype)[6:]} copy ({decode})", "tok_s": one_rate})
        del one
        free(dev)

        sync(dev)
        t0 = time.perf_counter()
        copy_model, _ = stage.rollout_model(sharded=True)  # the gather, as a rollout step runs it
        sync(dev)
        refresh_s = time.perf_counter() - t0
        gat_rate, gat_out, gat_full, _ = decode_rate(copy_model, prompts, a.new, decode, seed)
        equal = gat_out.tokens == one_out.tokens
        rows.append({"impl": f"FSDP2 gathered copy ({decode})", "tok_s": gat_rate, "refresh_s": refresh_s,
                     "with_refresh": B * a.new / (gat_full + refresh_s)})
        free_storage(copy_model)  # as the stage does after a sharded rollout
        free(dev)

        lock_rate, _, _, _ = decode_rate(stage.model, prompts, a.lockstep_new, "eager", seed, lockstep=True)
        rows.append({"impl": "FSDP2 lockstep, sharded (eager)", "tok_s": lock_rate})

    # the slowest rank's figures; whether every rank's gathered tokens equal its one-GPU tokens
    slowest = all_reduce_values([r["tok_s"] for r in rows] + [rows[1]["with_refresh"]], dev, "min")
    refresh = all_reduce_values([refresh_s], dev, "max")[0]
    all_equal = all_reduce_values([float(equal)], dev, "min")[0] == 1.0
    for r, v in zip(rows, slowest):
        r["tok_s"] = v
        r["vs_one_gpu"] = v / slowest[0]
    rows[1]["with_refresh"], rows[1]["refresh_s"] = slowest[-1], refresh
    ratios = {"gathered_vs_one_gpu": rows[1]["vs_one_gpu"], "lockstep_vs_one_gpu": rows[2]["vs_one_gpu"],
              "gathered_vs_lockstep": rows[1]["tok_s"] / rows[2]["tok_s"]}
    if rank == 0:
        gib = 2**30
        mem = {"copy_gib": rollout_copy_bytes(cfg, dtype) / gib,
               "cache_gib": kv_cache_bytes(cfg, B, a.prompt_len + a.new, torch.empty((), dtype=dtype).element_size())
               / gib, "peak_gib": torch.cuda.max_memory_allocated(dev) / gib if cuda else None}
        print(table(rows, [("impl", "rollout decode", ""), ("tok_s", "tokens/s per GPU", ",.0f"),
                           ("vs_one_gpu", "x one GPU", ".2f"), ("refresh_s", "refresh s", ".3f"),
                           ("with_refresh", "tokens/s with refresh", ",.0f")],
                    f"GRPO rollout decode, {world} ranks, {a.layers if not a.tiny else 'tiny'} blocks, {B} rows "
                    f"a rank, prompt {a.prompt_len}, {a.new} new ({a.lockstep_new} lockstep); tokens equal: "
                    f"{all_equal}"))
        print(" ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()), f"| copy {mem['copy_gib']:.1f} GiB, cache "
              f"{mem['cache_gib']:.1f} GiB a rank", flush=True)
        write_json(a.out or default_out("rollout"), {"env": env(), "args": vars(a), "world": world, "rows": rows,
                                                     "ratios": ratios, "equal_tokens": all_equal, "memory": mem})
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="tiny model, 2 gloo CPU processes")
    ap.add_argument("--nproc", type=int, default=None, help="processes (default: the GPUs; 2 with --tiny)")
    ap.add_argument("--layers", type=int, default=8, help="moxin-7b blocks")
    ap.add_argument("--prompts", type=int, default=8, help="prompts a rank")
    ap.add_argument("--group", type=int, default=8, help="samples a prompt")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=2048, help="new tokens a row (gathered and one-GPU paths)")
    ap.add_argument("--lockstep-new", type=int, default=128, help="new tokens a row on the lockstep path")
    ap.add_argument("--tp", action="store_true", help="tensor parallelism over the ranks: the split rollout "
                    "against one GPU's decode of all the rows")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.tiny:
        a.prompts, a.group, a.prompt_len, a.new, a.lockstep_new = 2, 2, 8, 12, 12
    if "LOCAL_RANK" not in os.environ:  # start this script under torchrun
        n = a.nproc or (2 if a.tiny else torch.cuda.device_count())
        # --nproc is the launcher's business only (torchrun would read it as its own, ambiguous, option)
        args = [x for i, x in enumerate(sys.argv) if not x.startswith("--nproc")
                and not (i and sys.argv[i - 1] == "--nproc")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]
        sys.exit(subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))
                 .returncode)
    worker(a)


if __name__ == "__main__":
    main()
