"""GRPO update throughput: packed rows (stage.grpo.pack, sequences whole with document boundaries) against one
right-padded row per sequence, on the same rollouts in the same run.

A synthetic rollout of the recipe's length shape (prompts of about --prompt-len tokens, responses uniform in
[--min-new, --max-new]; those at --max-new count as truncated and are masked, as DAPO's overlong filter does;
random 0/1 rewards, so some groups are filtered) goes through `GRPOStage._update` as a training step runs it:
moxin-7b's blocks (--layers of them), bf16 autocast over fp32 weights, compiled blocks, fused AdamW, the
stage's clipping. Each mode updates once on a warm-up rollout (compilation), then --reps times on timed ones.
tokens/s counts the sequences' real tokens (prompt + response); "through the model" the tokens the forwards
read, padding included. The ratio packed / padded is printed and written to the JSON. Beside them (unless
--no-pretrain), the pretraining bench's bare loop (scripts/bench/train.py: same blocks, compile, autocast and
optimizer, next-token loss) on random rows of --pretrain-seq tokens, twice: one document a row (SDPA's causal
kernel) and packed documents of the rollouts' length distribution (the document-mask kernel pretraining on a real
corpus takes, through the same doc-bounds path as GRPO's packed rows). The update's goal is 0.8x its tokens/s.
Every row records the attention kernels its forwards took (`kernels`) and the compiled block's variants traced
during its timed repetitions (`compiles_timed`: 0 unless a new shape or kernel recompiled inside the timing).

    python scripts/bench/grpo_update.py [--prompts 16 --group 8 --mbs 2 --layers 8] [--out grpo_update.json]
    python scripts/bench/grpo_update.py --tiny    # tiny model, short sequences, CPU, fp32, no compile
    python scripts/bench/grpo_update.py --tiny --compile --compile-backend aot_eager   # compiled blocks on a CPU
    python scripts/bench/grpo_update.py --count --prompts 64 --mbs 1   # only the tokens each way reads (host)
    python scripts/bench/grpo_update.py --layers 2 --prompts 4 --profile 25   # where the time goes, each row
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch

from _common import default_out, env, free, sync, table, timed, write_json
from train import bare_step

from moxin.config import GRPOConfig, OptimConfig, ParallelConfig
from moxin.distributed import parallelize
from moxin.model import Transformer
from moxin.model import attention as A
from moxin.model.transformer import Block
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage


def synthetic_rollout(stage: GRPOStage, prompts: int, prompt_len: int, min_new: int, max_new: int, seed: int):
    """`prompts` x group_size sequences of the recipe's shape, built by the stage's own `build_rollout`."""
    c = stage.cfg
    g = torch.Generator().manual_seed(seed)
    V = stage.model_cfg.vocab_size
    ps, toks, fin = [], [], []
    for _ in range(prompts):
        n_p = int(torch.randint(max(1, prompt_len * 3 // 4), prompt_len + 1, (1,), generator=g))
        p = torch.randint(3, V, (n_p,), generator=g).tolist()
        for _ in range(c.group_size):
            n = int(torch.randint(min_new, max_new + 1, (1,), generator=g))
            ps.append(p)
            toks.append(torch.randint(3, V, (n,), generator=g).tolist())
            fin.append(n < max_new)
    rewards = (torch.rand(len(ps), generator=g) < 0.5).float()
    return stage.build_rollout(ps, toks, fin, rewards)


@contextmanager
def kernels_taken():
    """Counts the attention kernel of every forward inside (`AttentionMask.build`'s choice: causal, dense, flex,
    flash)."""
    seen = Counter()
    real = A.AttentionMask.build

    def spy(*args, **kwargs):
        mask = real(*args, **kwargs)
        seen[mask.kernel if mask.kernel != "flash" else f"flash{mask.flash_version}"] += 1
        return mask

    A.AttentionMask.build = spy
    try:
        yield seen
    finally:
        A.AttentionMask.build = real


def block_variants() -> int:
    """How many variants of the compiled block torch.compile holds (its cache entries for Block.forward)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(Block.forward.__code__))


def compile_blocks(model, a, dev: str) -> None:
    """The blocks compiled as a run compiles them: `parallelize` on a GPU (unless --no-compile); on a CPU only with
    --compile, each block with --compile-backend. torch.compile's caches are emptied first, so that each row
    compiles for itself, as a run would."""
    torch._dynamo.reset()
    if dev == "cuda":
        parallelize(model, ParallelConfig(compile=not a.no_compile, activation_checkpointing=a.ac))
    elif a.compile:
        for block in model.layers:
            block.compile(backend=a.compile_backend)


@contextmanager
def profiled(what: str, dev: str, top: int):
    """With `top` > 0, profile the body and print its `top` operators by self time on the device (CPU: the host):
    where an update's time goes beside a pretraining step's."""
    if top <= 0:
        yield
        return
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        yield
    sort = "self_cuda_time_total" if dev == "cuda" else "self_cpu_time_total"
    print(f"== profile: {what}\n" + prof.key_averages().table(sort_by=sort, row_limit=top), flush=True)


def make_stage(cfg, pack: bool, a, dev: str) -> tuple[GRPOStage, torch.optim.Optimizer]:
    """The stage outside a trainer: its model on `dev` (compiled on a GPU), fused AdamW, no scheduler."""
    torch.manual_seed(0)
    stage = GRPOStage(cfg, optim=OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0),
                      grpo=GRPOConfig(group_size=a.group, max_new_tokens=a.max_new, micro_batch_size=a.mbs,
                                      pack=pack, pack_tokens=a.pack_tokens, temperature=0.6), seed=0)
    stage.configure_model()
    stage.to(dev)  # the LightningModule, so that stage.device (where the update sends its rows) follows
    compile_blocks(stage.model, a, dev)
    opt = torch.optim.AdamW(stage.model.parameters(), lr=1e-6, fused=dev == "cuda")
    stage.optimizers = lambda: opt
    stage.lr_schedulers = lambda: SimpleNamespace(step=lambda: None)
    stage.manual_backward = lambda loss: loss.backward()
    return stage, opt


def run_mode(cfg, pack: bool, a, dev: str) -> dict:
    stage, opt = make_stage(cfg, pack, a, dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else nullcontext()
    secs, real, through = 0.0, 0, 0
    name = "packed rows" if pack else "padded rows"
    with kernels_taken() as kernels:
        # the first --warm rollouts warm up (compile), the next --reps are timed, and with --profile one more is
        # profiled (untimed: the profiler slows it)
        for rep in range(a.warm + a.reps + (a.profile > 0)):
            if rep == a.warm:
                variants = block_variants()
            elif rep == a.warm + a.reps:
                compiles_timed = block_variants() - variants
            what = "warm-up" if rep < a.warm else "timed" if rep < a.warm + a.reps else "profiled"
            ro = synthetic_rollout(stage, a.prompts, a.prompt_len, a.min_new, a.max_new, seed=rep)
            kept = ro.keep.nonzero().squeeze(1)
            sync(dev)
            t0 = time.perf_counter()
            with profiled(f"{name}, one update", dev, a.profile if what == "profiled" else 0), amp:
                stage._update(ro, step=rep)
                sync(dev)
            dt = time.perf_counter() - t0
            print(f"[{name}] rollout {rep} ({what}): {dt:.2f} s, {int(ro.seq_lengths[kept].sum()):,} tokens",
                  flush=True)  # what a run cut off by a time limit leaves
            if what == "timed":
                secs += dt
                real += int(ro.seq_lengths[kept].sum())
                through += stage.last_step_tokens_processed
    if not a.profile:
        compiles_timed = block_variants() - variants
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    del stage, opt  # the weights and AdamW's state, before the next mode's
    free(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return {"impl": name, "update_s": secs / a.reps, "tok_s": real / secs,
            "tokens": real // a.reps, "through_model": through // a.reps, "fill": real / max(through, 1),
            "peak_gib": peak, "kernels": dict(kernels), "compiles_timed": compiles_timed}


def document_positions(a, rows: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """(rows, seq) positions of documents packed back to back, each as long as a rollout's sequence (prompt of
    3/4 to all of --prompt-len, response uniform in [--min-new, --max-new]), the last one cut at the row's end."""
    out = torch.empty(rows, seq, dtype=torch.long)
    for r in range(rows):
        col = 0
        while col < seq:
            n = int(torch.randint(max(1, a.prompt_len * 3 // 4), a.prompt_len + 1, (1,), generator=g))
            n += int(torch.randint(a.min_new, a.max_new + 1, (1,), generator=g))
            n = min(n, seq - col)
            out[r, col:col + n] = torch.arange(n)
            col += n
    return out


def pretrain_row(cfg, a, dev: str, documents: bool) -> dict:
    """The pretraining bench's bare loop on `--pretrain-rows` random rows of `--pretrain-seq` tokens, the same
    blocks compiled the same way: one document a row, or (`documents`) packed documents of the rollouts' lengths,
    whose forward takes the document-mask kernel through the host's DocBounds as a pretraining run does."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(dev)
    compile_blocks(model, a, dev)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (a.pretrain_rows, a.pretrain_seq + 1), generator=g)
    pos = (document_positions(a, a.pretrain_rows, a.pretrain_seq, g) if documents
           else torch.arange(a.pretrain_seq).expand(a.pretrain_rows, -1).contiguous())
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "positions": pos}
    step = bare_step(model, batch, dev, autocast=dev == "cuda")
    with kernels_taken() as kernels:  # (the profiled step below is untimed)
        t = timed(step, dev, warm=2 if a.tiny else 3, reps=2 if a.tiny else 5)
    with profiled(f"pretraining ({'packed documents' if documents else 'one document a row'}), one step", dev,
                  a.profile):
        step()
        sync(dev)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    del model
    free(dev)
    n = a.pretrain_rows * a.pretrain_seq
    what = "packed documents" if documents else "one document a row"
    print(f"[pretraining, {what}] {t:.3f} s a step, {n / t:,.0f} tokens/s", flush=True)
    return {"impl": f"pretraining bare loop ({a.pretrain_rows} x {a.pretrain_seq}, {what})", "update_s": t,
            "tok_s": n / t, "tokens": n, "through_model": n, "fill": 1.0, "peak_gib": peak,
            "kernels": dict(kernels)}


def count_tokens(cfg, a) -> list[dict]:
    """The tokens the update's forwards read over one rollout, packed and padded, from the stage's own plan of
    micro-batches (`_plan`, no model: exact counts on the host, no timing), packed rows padded as on a GPU."""
    rows = []
    for pack in (False, True):
        stage = GRPOStage(cfg, grpo=GRPOConfig(group_size=a.group, max_new_tokens=a.max_new, pack=pack,
                                               micro_batch_size=a.mbs, pack_tokens=a.pack_tokens), seed=0)
        ro = synthetic_rollout(stage, a.prompts, a.prompt_len, a.min_new, a.max_new, seed=1)
        kept = ro.keep.nonzero().squeeze(1)
        host = {"ids": ro.input_ids[kept], "lab": ro.labels[kept], "pos": ro.positions[kept],
                "mask": ro.mask[kept], "len": ro.seq_lengths[kept]}
        plan = stage._plan(torch.arange(len(kept)), host, {k: host[k] for k in ("ids", "lab", "pos", "mask")},
                           bucket=True)
        real = int(host["len"].sum())
        through = sum(mc.ids.numel() for mc in plan)
        rows.append({"impl": "packed rows" if pack else "padded rows", "tokens": real, "through_model": through,
                     "fill": real / through, "micro_batches": len(plan)})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--layers", type=int, default=8, help="moxin-7b blocks")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--min-new", type=int, default=300)
    ap.add_argument("--max-new", type=int, default=2048)
    ap.add_argument("--mbs", type=int, default=2, help="stage.grpo.micro_batch_size")
    ap.add_argument("--pack-tokens", type=int, default=None, help="stage.grpo.pack_tokens (None: max_seq_len)")
    ap.add_argument("--ac", default="none", help="activation checkpointing: none | mlp | attention | full")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="on a CPU: compile the blocks too (a GPU always does)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile on a CPU")
    ap.add_argument("--warm", type=int, default=1, help="warm-up rollouts per mode (compiles)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--no-pretrain", action="store_true", help="leave out the pretraining bare-loop row")
    ap.add_argument("--pretrain-seq", type=int, default=4096)
    ap.add_argument("--pretrain-rows", type=int, default=2)
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="profile one more (untimed) update of "
                    "each mode and one pretraining step; print their K operators of most device time")
    ap.add_argument("--count", action="store_true", help="only count the tokens each way reads (no model, host)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.tiny:
        dev = "cpu"
        cfg = load_preset("tiny", vocab_size=512, attn_backend="sdpa")
        a.prompts, a.group, a.prompt_len, a.min_new, a.max_new, a.reps = 4, 4, 16, 4, 32, 1
        a.pretrain_seq, a.pretrain_rows = 64, 2
    else:
        dev = "cuda"
        cfg = load_preset("moxin-7b", n_layers=a.layers)
    if a.count:
        rows = count_tokens(cfg, a)
        rows[1]["vs_padded"] = rows[0]["through_model"] / rows[1]["through_model"]
        print(table(rows, [("impl", "update", ""), ("tokens", "tokens", ","),
                           ("through_model", "through the model", ","),
                           ("fill", "real/through", ".2f"), ("micro_batches", "micro-batches", ""),
                           ("vs_padded", "x fewer than padded", ".2f")],
                    f"GRPO update's tokens, {a.prompts} prompts x {a.group}, prompt ~{a.prompt_len}, responses "
                    f"{a.min_new}-{a.max_new}, micro_batch_size {a.mbs}"))
        write_json(a.out or default_out("grpo_update_count"), {"args": vars(a), "rows": rows})
        return
    rows = [run_mode(cfg, pack, a, dev) for pack in (False, True)]
    pad, packed = rows
    packed["vs_padded"] = packed["tok_s"] / pad["tok_s"]
    pad["vs_padded"] = 1.0
    ratios = {"packed_vs_padded": packed["vs_padded"]}
    if not a.no_pretrain:
        pre, pre_docs = pretrain_row(cfg, a, dev, documents=False), pretrain_row(cfg, a, dev, documents=True)
        rows += [pre, pre_docs]
        for r in rows:
            r["vs_pretrain"] = r["tok_s"] / pre["tok_s"]
            r["vs_pretrain_docs"] = r["tok_s"] / pre_docs["tok_s"]
        ratios |= {"packed_vs_pretrain": packed["vs_pretrain"], "padded_vs_pretrain": pad["vs_pretrain"],
                   "packed_vs_pretrain_docs": packed["vs_pretrain_docs"],
                   "padded_vs_pretrain_docs": pad["vs_pretrain_docs"]}
    print(table(rows, [("impl", "update", ""), ("update_s", "s/update", ".3f"), ("tok_s", "tokens/s", ",.0f"),
                       ("tokens", "tokens", ","), ("through_model", "through the model", ","),
                       ("fill", "real/through", ".2f"), ("peak_gib", "peak GiB", ".1f"),
                       ("vs_padded", "x padded", ".2f"), ("vs_pretrain", "x pretraining", ".2f"),
                       ("vs_pretrain_docs", "x pretraining (docs)", ".2f"), ("kernels", "attention kernels", ""),
                       ("compiles_timed", "compiles timed", "")],
                f"GRPO update, {a.prompts} prompts x {a.group}, prompt ~{a.prompt_len}, responses "
                f"{a.min_new}-{a.max_new}, micro_batch_size {a.mbs} ({dev})"))
    print(" ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()), flush=True)
    write_json(a.out or default_out("grpo_update"), {"env": env(), "args": vars(a), "rows": rows,
                                                      "ratio": packed["vs_padded"], "ratios": ratios})


if __name__ == "__main__":
    main()
