"""One GRPO step of the recipe's shape on one GPU, split into generation, scoring and update seconds, beside the
pretraining bench's tokens/s on the same blocks (issue #31: the update at least 0.8x pretraining).

The stage is `GRPOStage` with Moxin-7B's blocks (--layers of them, random weights, the Mistral tokenizer), bf16
autocast over fp32 weights, compiled blocks, fused AdamW, packed update rows: what `+experiment=grpo_moxin_reasoning`
runs, at --prompts x --group rows of --prompt-len prompt tokens and --new response tokens. A step:
- **generation and scoring**: `GRPOStage.rollout` as a training step calls it (the 16-bit rollout copy refreshed,
  compiled decode in blocks of --gen-batch rows, the completions scored by --verifier during generation). Random
  weights never stop early, so every row decodes the whole budget (the recipe's worst case) and the verifier sees
  gibberish: its seconds are a floor, not the recipe's.
- **update**: `GRPOStage._update` on a rollout of the same rows with the recipe's length spread instead (responses
  uniform in [--min-new, --new], those at --new truncated and masked, random 0/1 rewards: a random model's own
  rollout would give every group the same reward and be filtered to nothing).
--warm steps compile, then --reps are timed; the pretraining bare loop (scripts/bench/grpo_update.py's rows) runs
after on the same blocks unless --no-pretrain.

    python scripts/bench/grpo_step.py [--layers 8 --prompts 64 --group 8 --prompt-len 1024 --new 2048] [--out F]
    python scripts/bench/grpo_step.py --tiny    # tiny model, CPU, eager: a smoke run
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch

from _common import default_out, env, free, sync, table, write_json
from grpo_update import compile_blocks, pretrain_row, synthetic_rollout

from moxin.config import GRPOConfig, OptimConfig
from moxin.presets import load_preset
from moxin.stages.grpo import GRPOStage
from moxin.tokenizer import load_tokenizer


def make_stage(cfg, a, dev: str) -> GRPOStage:
    """The stage outside a trainer, on `dev`, its blocks compiled as a run compiles them, fused AdamW."""
    torch.manual_seed(0)
    stage = GRPOStage(cfg, optim=OptimConfig(lr=1e-6, warmup_steps=0, weight_decay=0.0),
                      grpo=GRPOConfig(group_size=a.group, max_new_tokens=a.new, micro_batch_size=a.mbs,
                                      gen_batch_size=a.gen_batch, temperature=0.6, verifier=a.verifier,
                                      log_completions=0, pack=True),
                      tokenizer=load_tokenizer("mistral"), seed=0)
    stage.configure_model()
    stage.to(dev)
    compile_blocks(stage.model, a, dev)
    opt = torch.optim.AdamW(stage.model.parameters(), lr=1e-6, fused=dev == "cuda")
    stage.optimizers = lambda: opt
    stage.lr_schedulers = lambda: SimpleNamespace(step=lambda: None)
    stage.manual_backward = lambda loss: loss.backward()
    return stage


def prompt_batch(cfg, a, seed: int) -> list[dict]:
    """--prompts records of --prompt-len random token ids (answers the verifier can parse)."""
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(3, cfg.vocab_size, (a.prompt_len,), generator=g).tolist(), "answer": "1"}
            for _ in range(a.prompts)]


def one_step(stage: GRPOStage, cfg, a, dev: str, step: int) -> dict:
    """Seconds of one step's parts and their tokens."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev == "cuda" else nullcontext()
    sync(dev)
    t0 = time.perf_counter()
    with amp:
        ro = stage.rollout(prompt_batch(cfg, a, step), step)
    sync(dev)
    rollout_s = time.perf_counter() - t0
    upd = synthetic_rollout(stage, a.prompts, a.prompt_len, a.min_new, a.new, seed=1000 + step)
    kept = upd.keep.nonzero().squeeze(1)
    sync(dev)
    t1 = time.perf_counter()
    with amp:
        stage._update(upd, step=step)
    sync(dev)
    update_s = time.perf_counter() - t1
    st = ro.stats
    return {"rollout_s": rollout_s, "gen_s": st["gen_s"], "refresh_s": st["refresh_s"], "score_s": st["score_s"],
            "score_busy_s": st["score_busy_s"], "gen_tokens": st["gen_tokens"], "update_s": update_s,
            "update_tokens": int(upd.seq_lengths[kept].sum()), "through_model": stage.last_step_tokens_processed}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", "--smoke", dest="tiny", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--layers", type=int, default=8, help="moxin-7b blocks")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=2048, help="response budget (stage.grpo.max_new_tokens)")
    ap.add_argument("--min-new", type=int, default=300, help="the update's shortest response")
    ap.add_argument("--mbs", type=int, default=2, help="stage.grpo.micro_batch_size")
    ap.add_argument("--gen-batch", type=int, default=128, help="stage.grpo.gen_batch_size (rows a generate call: "
                    "the KV cache of all 512 rows of 3K tokens would not fit beside the training state)")
    ap.add_argument("--verifier", default="deepscaler", help="stage.grpo.verifier (the recipe's reward)")
    ap.add_argument("--ac", default="none", help="activation checkpointing: none | mlp | attention | full")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile", action="store_true", help="on a CPU: compile the blocks too (a GPU always does)")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--warm", type=int, default=1, help="untimed steps first (compilation)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-pretrain", action="store_true")
    ap.add_argument("--pretrain-seq", type=int, default=4096)
    ap.add_argument("--pretrain-rows", type=int, default=2)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.max_new, a.profile = a.new, 0  # grpo_update.py's names, for its pretraining rows
    if a.tiny:
        dev = "cpu"
        cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa")
        a.prompts, a.group, a.prompt_len, a.new, a.min_new, a.gen_batch, a.mbs = 4, 4, 16, 24, 4, 8, 4
        a.pretrain_seq, a.pretrain_rows = 64, 2
    else:
        dev = "cuda"
        cfg = load_preset("moxin-7b", n_layers=a.layers)
    stage = make_stage(cfg, a, dev)
    steps = []
    for i in range(a.warm + a.reps):
        r = one_step(stage, cfg, a, dev, i)
        r["timed"] = i >= a.warm
        print(f"[step {i} ({'timed' if r['timed'] else 'warm-up'})] rollout {r['rollout_s']:.1f} s (generation "
              f"{r['gen_s']:.1f}, refresh {r['refresh_s']:.2f}, scoring after the last token {r['score_s']:.2f}), "
              f"update {r['update_s']:.1f} s", flush=True)  # what a run cut off by a time limit leaves
        steps.append(r)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
    del stage
    free(dev)
    timed = [r for r in steps if r["timed"]]
    mean = {k: sum(r[k] for r in timed) / len(timed) for k in timed[0] if k != "timed"}
    rows = [{"part": "generation (decode; scoring overlaps it)", "s": mean["gen_s"],
             "tok_s": mean["gen_tokens"] / mean["gen_s"], "tokens": mean["gen_tokens"]},
            {"part": "rollout copy refresh", "s": mean["refresh_s"]},
            {"part": "scoring left after the last token", "s": mean["score_s"]},
            {"part": "rollout (generation + scoring + tensors)", "s": mean["rollout_s"]},
            {"part": "update (packed rows)", "s": mean["update_s"], "tok_s": mean["update_tokens"] / mean["update_s"],
             "tokens": mean["update_tokens"]}]
    ratios = {}
    if not a.no_pretrain:
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        pre = pretrain_row(cfg, a, dev, documents=True)
        rows.append({"part": pre["impl"], "s": pre["update_s"], "tok_s": pre["tok_s"], "tokens": pre["tokens"]})
        update = next(r for r in rows if r["part"].startswith("update"))
        ratios["update_vs_pretrain"] = update["tok_s"] / pre["tok_s"]
        update["vs_pretrain"] = ratios["update_vs_pretrain"]
    step_s = mean["rollout_s"] + mean["update_s"]
    print(table(rows, [("part", "part", ""), ("s", "seconds", ".2f"), ("tok_s", "tokens/s", ",.0f"),
                       ("tokens", "tokens", ",.0f"), ("vs_pretrain", "x pretraining", ".2f")],
                f"GRPO step, {a.prompts} prompts x {a.group}, prompt {a.prompt_len}, up to {a.new} new, "
                f"{'tiny' if a.tiny else f'{a.layers} Moxin-7B blocks'} ({dev}): {step_s:.1f} s a step"
                + ("" if peak is None else f", peak {peak:.1f} GiB")))
    if ratios:
        print(" ".join(f"{k}: {v:.2f}x" for k, v in ratios.items()), flush=True)
    write_json(a.out or default_out("grpo_step"), {"env": env(), "args": vars(a), "steps": steps, "rows": rows,
                                                    "step_s": step_s, "peak_gib": peak, "ratios": ratios})


if __name__ == "__main__":
    main()
