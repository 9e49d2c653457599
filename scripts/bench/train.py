"""Training throughput of the moxin-7b block shape (8 of its 36 layers), sequence 4096, bf16-mixed (fp32
master weights + bf16 autocast), fused AdamW, through the real stage and data path:
PretrainStage + PretrainDataModule (built-in sample corpus, real Mistral tokenizer, packed to 4096; the
readers start a new pass when a source runs out, so the small sample repeats) + L.Trainer with the `gpu`
hardware profile's settings (compiled blocks; attention `--attn`, default auto: FlashAttention-4 where
installed on Hopper, else FlexAttention; several values time each in the same run). Baselines in the same
run: a bare loop of our model on batches of the same loader (same compile/optimizer/loss), and Hugging Face
MistralForCausalLM of the same shape measured as shared/baselines/hf_anchor.py does (eager SDPA; compiled SDPA unless --no-hf-compile).

tokens/s over steady-state steps (after --warm steps), MFU vs 989 TFLOP/s with ModelConfig.flops_per_token.

--float8 RECIPE...: the moxin rows again with torchao float8 linear layers in the blocks (hardware.parallel.float8),
beside the bf16 ones and HF compiled in the same run. --loss-steps N: N optimizer steps of the sample corpus
through the stage with bf16 and with each --float8 recipe (same seed, same batches), both curves in the JSON and
the largest relative difference per step (and over 10-step means) printed.

    python scripts/bench/train.py [--mbs 2 4] [--out bench.json]
    python scripts/bench/train.py --mbs 2 --float8 rowwise tensorwise --loss-steps 200
    python scripts/bench/train.py --smoke     # tiny model, short sequence, CPU (float8 emulated)
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import lightning as L
import torch

from _common import PEAK_TFLOPS, default_out, env, free, sync, table, timed, write_json

from moxin.config import ModelConfig, OptimConfig, ParallelConfig
from moxin.data.pretrain_data import PretrainDataModule
from moxin.data.sample import sample_path
from moxin.losses import token_cross_entropy
from moxin.model import attention as A
from moxin.model.attention import DocBounds
from moxin.presets import load_preset
from moxin.stages.pretrain import PretrainStage
from moxin.tokenizer import load_tokenizer


class StepTimer(L.Callback):
    """Wall time between the end of optimizer step `warm` and of step `warm + n` (synchronised there only)."""

    def __init__(self, warm: int, n: int):
        self.warm, self.n = warm, n
        self.t0 = self.t1 = None
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.global_step
        if s == self.warm and self.t0 is None:
            sync(pl_module.device); self.t0 = time.perf_counter()
        elif s == self.warm + self.n and self.t1 is None:
            sync(pl_module.device); self.t1 = time.perf_counter()
            m = trainer.callback_metrics.get("train/loss")
            if m is not None:
                self.losses.append(float(m))

    @property
    def seconds_per_step(self):
        return (self.t1 - self.t0) / self.n


class LossCurve(L.Callback):
    """train/loss after every optimizer step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics.get("train/loss")
        if m is not None and trainer.global_step > len(self.losses):
            self.losses.append(float(m))


def make_dm(seq, mbs, steps, workers, world=1):
    srcs = [{"name": n, "path": str(sample_path(f"{n}.jsonl")), "text_field": "text"} for n in ("prose", "code", "cjk")]
    return PretrainDataModule(
        sources=srcs, tokenizer=load_tokenizer("mistral"), tokens_per_step=mbs * seq, micro_batch_tokens=mbs * seq,
        phases=[{"name": "bench", "seq_len": seq, "tokens": steps * mbs * seq,
                 "mixture": {"prose": 0.45, "code": 0.35, "cjk": 0.2}}],
        max_seq_len=max(seq, 32768), num_workers=workers, val_percent=0, world_size=world)


def parallel_cfg(compile_, float8, dev) -> ParallelConfig:
    """The stage's parallel settings: compiled blocks, float8 (emulated on a CPU) or not."""
    return ParallelConfig(compile=compile_, float8=float8, float8_emulate=float8 != "none" and dev == "cpu")


def lightning_run(cfg, seq, mbs, warm, n, dev, compile_, workers, callbacks=(), float8="none", lr=1e-4):
    steps = warm + n + 1
    dm = make_dm(seq, mbs, steps, workers)
    L.seed_everything(0, verbose=False)  # the same initial weights for every run (loss curves compared)
    stage = PretrainStage(model=cfg, optim=OptimConfig(lr=lr, warmup_steps=0, schedule="constant"),
                          parallel=parallel_cfg(compile_, float8, dev))
    from moxin.callbacks import Throughput

    timer = StepTimer(warm, n)
    trainer = L.Trainer(accelerator="gpu" if dev == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                        max_epochs=dm.num_epochs, max_steps=warm + n, reload_dataloaders_every_n_epochs=1,
                        accumulate_grad_batches=dm.accumulate_grad_batches, use_distributed_sampler=False,
                        callbacks=[timer, Throughput(peak_tflops=PEAK_TFLOPS), *callbacks], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=1, gradient_clip_val=None)
    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
    trainer.fit(stage, datamodule=dm)
    report = dm.data_report()
    out = {"s_per_step": timer.seconds_per_step, "loss": timer.losses[-1] if timer.losses else None,
           "passes": report}
    batch = next(iter(dm.build_train_loader(0)))  # for the bare loop: same rows, same positions
    model = stage.model
    del trainer, stage
    return out, batch, model


def bare_step(model, batch, dev, chunk=4096, autocast=True, host_bounds=True):
    """One optimizer step of our model without Lightning (a closure): autocast bf16 over fp32 weights (unless
    `autocast` is False: fp32, for quick CPU smoke runs), the stage's loss as the model's head, clipping, fused
    AdamW. `batch` on the host; host_bounds: the rows' DocBounds computed there, as the stages do (False: the
    forward reads them from the device, as before)."""
    model.to(dev)  # Lightning moves the model back to the CPU at the end of fit
    decay = [p for nme, p in model.named_parameters() if p.dim() >= 2 and "tok_embeddings" not in nme]
    rest = [p for nme, p in model.named_parameters() if not (p.dim() >= 2 and "tok_embeddings" not in nme)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=dev == "cuda")
    b = {k: v.to(dev) for k, v in batch.items()}
    bounds = DocBounds.from_positions(batch["positions"]).to(dev) if host_bounds else None

    def step():
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=autocast):
            loss, ntok = model(b["input_ids"], b["positions"], doc_bounds=bounds,
                               head=lambda h, w: token_cross_entropy(h, w, b["labels"], chunk))
        (loss / ntok).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
    return step


def bare_loop(model, batch, warm, n, dev, chunk=4096, host_bounds=True):
    return timed(bare_step(model, batch, dev, chunk, host_bounds=host_bounds), dev, warm, n)


def whole_rows(batch):
    """The same tokens without document boundaries: positions 0..T-1 in every row and every next token a label,
    so attention is full causal over the row, as in the Hugging Face baseline."""
    ids = batch["input_ids"]
    labels = batch["labels"].clone()
    labels[:, :-1] = ids[:, 1:]
    return {**batch, "labels": labels, "positions": torch.arange(ids.shape[1]).expand_as(ids).contiguous()}


def hf_step(cfg, ids, dev, compile_, autocast=True, clip=None):
    """One optimizer step of Hugging Face MistralForCausalLM of `cfg`'s shape (a closure): labels=ids (whole rows,
    no document boundaries), autocast bf16 (unless `autocast` is False), SDPA, fused AdamW, clipping if `clip`."""
    from transformers import MistralConfig, MistralForCausalLM

    hc = MistralConfig(hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                       num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                       vocab_size=cfg.vocab_size, sliding_window=cfg.sliding_window,
                       max_position_embeddings=cfg.max_seq_len, rope_theta=cfg.rope_theta, tie_word_embeddings=False)
    hc._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MistralForCausalLM(hc).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=torch.device(dev).type == "cuda")
    fwd = torch.compile(model) if compile_ else model
    ids = ids.to(dev)

    def step():
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=autocast):
            out = fwd(input_ids=ids, labels=ids)
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step(); opt.zero_grad(set_to_none=True)
    return step


def hf_train(cfg, seq, mbs, dev, compile_, warm, n):
    """As shared/baselines/hf_anchor.py hf_train: random ids, labels=ids, autocast bf16, fused AdamW."""
    ids = torch.randint(0, cfg.vocab_size, (mbs, seq), device=dev)
    return timed(hf_step(cfg, ids, dev, compile_), dev, warm, n)


def loss_curves(cfg, seq, mbs, steps, dev, compile_, workers, recipes, lr) -> dict:
    """`steps` optimizer steps of the sample corpus with bf16 and with each float8 recipe (same seed and batches):
    the curves, and per recipe the largest relative difference from bf16 per step and over 10-step means (a
    step's loss is one micro-batch: the means show the drift without the per-batch noise)."""
    curves = {}
    for recipe in ["none", *recipes]:
        torch._dynamo.reset()
        rec = LossCurve()
        lightning_run(cfg, seq, mbs, 1, steps - 1, dev, compile_, workers, callbacks=[rec], float8=recipe, lr=lr)
        curves[recipe] = rec.losses
        free(dev)
    ref = curves["none"]
    out = {"steps": steps, "lr": lr, "curves": curves, "max_rel_diff": {}, "max_rel_diff_10_step_mean": {}}
    for recipe in recipes:
        got = curves[recipe]
        out["max_rel_diff"][recipe] = max(abs(a - b) / abs(a) for a, b in zip(ref, got))
        means = [(sum(ref[i:i + 10]), sum(got[i:i + 10])) for i in range(0, min(len(ref), len(got)), 10)]
        out["max_rel_diff_10_step_mean"][recipe] = max(abs(a - b) / abs(a) for a, b in means)
        print(f"loss curve, float8 {recipe} vs bf16 over {min(len(ref), len(got))} steps: largest relative "
              f"difference {out['max_rel_diff'][recipe]:.3%} per step, "
              f"{out['max_rel_diff_10_step_mean'][recipe]:.3%} over 10-step means; final loss "
              f"{ref[-1]:.4f} (bf16) vs {got[-1]:.4f}", flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--mbs", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-hf-compile", action="store_true")
    ap.add_argument("--no-moxin", action="store_true", help="only the Hugging Face baselines")
    ap.add_argument("--whole-rows", action="store_true",
                    help="also time moxin's bare loop on the rows without document boundaries (full causal, as HF's)")
    ap.add_argument("--device-bounds", action="store_true",
                    help="also time the bare loop with the forward reading its document bounds from the device "
                         "(reads at the start of every forward, as before DocBounds)")
    ap.add_argument("--attn", nargs="*", default=["auto"], help="moxin attention backends to time (auto flex flash)")
    ap.add_argument("--float8", nargs="*", default=[], choices=["tensorwise", "rowwise"],
                    help="also time the moxin rows with these float8 recipes (torchao; emulated with --smoke)")
    ap.add_argument("--loss-steps", type=int, default=0,
                    help="compare loss curves of bf16 and each --float8 recipe over this many steps (first --mbs)")
    ap.add_argument("--loss-lr", type=float, default=1e-4, help="learning rate of the --loss-steps runs")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        dev, seq, compile_, workers = "cpu", 128, False, 0
        cfg = ModelConfig(vocab_size=32000, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                          hidden_dim=128, sliding_window=64, max_seq_len=1024, attn_backend="sdpa")
        mbs_list, warm, n = [2], 1, 2
    else:
        dev, seq, compile_, workers = "cuda", 4096, True, 4
        cfg = load_preset("moxin-7b", n_layers=a.layers)
        mbs_list, warm, n = a.mbs, a.warm, a.steps
    torch.backends.cuda.matmul.allow_tf32 = True
    fpt = cfg.flops_per_token(seq)
    rows = []

    def add(name, mbs, spstep, **kw):
        tok = mbs * seq / spstep
        rows.append({"impl": name, "mbs": mbs, "tok_s": tok, "ms_step": spstep * 1e3, "mfu": tok * fpt / PEAK_TFLOPS / 1e12,
                     **kw})
        print(rows[-1], flush=True)

    for i, mbs in enumerate(mbs_list):
        torch._dynamo.reset()  # each micro-batch compiles for its own static shapes, as a real run would
        try:
            if a.no_moxin:
                raise StopIteration
            for attn, float8 in [(t, f) for t in (["sdpa"] if a.smoke else a.attn) for f in ["none", *a.float8]]:
                be = A.resolve_backend(attn, torch.device(dev))
                label = f"flash{A.flash_version(dev)}" if be == "flash" else be
                label += f", float8 {float8}" if float8 != "none" else ""
                run_cfg = dataclasses.replace(cfg, attn_backend=be)
                torch._dynamo.reset()
                res, batch, model = lightning_run(run_cfg, seq, mbs, warm, n, dev, compile_, workers, float8=float8)
                peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None
                add(f"moxin PretrainStage + PretrainDataModule + L.Trainer ({label})", mbs, res["s_per_step"],
                    peak_gib=peak, loss=res["loss"])
                rows[-1]["data"] = res["passes"]
                t = bare_loop(model, batch, warm, n, dev)
                add(f"moxin bare loop (same model/compile/loss/optimizer, {label})", mbs, t)
                if a.device_bounds and float8 == "none":
                    t = bare_loop(model, batch, warm, n, dev, host_bounds=False)
                    add(f"moxin bare loop, document bounds read from the device ({label})", mbs, t)
                if a.whole_rows and float8 == "none":
                    t = bare_loop(model, whole_rows(batch), warm, n, dev)
                    add(f"moxin bare loop, whole rows without document boundaries ({label})", mbs, t)
                del model, batch
                free(dev)
                torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
        except StopIteration:
            pass
        except torch.OutOfMemoryError as ex:
            rows.append({"impl": "moxin", "mbs": mbs, "error": "OOM"})
        free(dev)
        if not a.no_hf:
            for comp in ([False] if (a.no_hf_compile or a.smoke or i > 0) else [False, True]):
                try:
                    torch.cuda.reset_peak_memory_stats() if dev == "cuda" else None
                    t = hf_train(cfg, seq, mbs, dev, comp, warm if not a.smoke else 1, 8 if not a.smoke else 2)
                    add(f"HF MistralForCausalLM sdpa{' compiled' if comp else ' eager'}", mbs, t,
                        peak_gib=torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None)
                except torch.OutOfMemoryError:
                    rows.append({"impl": f"HF sdpa compile={comp}", "mbs": mbs, "error": "OOM"})
                free(dev)
    for r in rows:
        base = next((b for b in rows if b["mbs"] == r["mbs"] and b["impl"].startswith("HF") and "tok_s" in b), None)
        if base and "tok_s" in r:
            r["vs_hf_eager"] = r["tok_s"] / base["tok_s"]
        comp = next((b for b in rows if b["mbs"] == r["mbs"] and b["impl"].endswith("compiled") and "tok_s" in b), None)
        if comp and "tok_s" in r:
            r["vs_hf_compiled"] = r["tok_s"] / comp["tok_s"]
    print(table(rows, [("impl", "implementation", ""), ("mbs", "micro-batch", "d"), ("tok_s", "tokens/s", ",.0f"),
                       ("ms_step", "ms/step", ".1f"), ("mfu", "MFU", ".1%"), ("vs_hf_eager", "x HF eager", ".2f"),
                       ("vs_hf_compiled", "x HF compiled", ".2f"),
                       ("peak_gib", "peak GiB", ".1f"), ("error", "error", "")],
                f"train: moxin-7b blocks x {cfg.n_layers}, seq {seq}, bf16-mixed, fused AdamW, {dev}; "
                f"flops/token {fpt / 1e9:.2f} G"))
    curves = None
    if a.loss_steps and a.float8:
        curves = loss_curves(cfg, seq, mbs_list[0], a.loss_steps, dev, compile_, workers, a.float8, a.loss_lr)
    write_json(a.out or default_out("train"), {"env": env(), "rows": rows, "flops_per_token": fpt, "seq": seq,
                                               "layers": cfg.n_layers, "loss_curves": curves})
    return rows


if __name__ == "__main__":
    main()
