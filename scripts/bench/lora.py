"""LoRA and QLoRA update steps of the full Moxin-7B (36 blocks, random init, no downloads) at 4K tokens on one GPU:
moxin (`stage.lora`: our adapters over the model core, compiled blocks, the chunked loss head) against Hugging Face
transformers + PEFT on the same GPU, shape, rank, targets and batch, in the same run.

Steps, each an optimizer step of the adapters (fused AdamW):
* ``sft``: next-token loss on --rows rows of --seq tokens.
* ``dpo``: --rows pairs (chosen and rejected rows of --seq tokens); the policy forward and backward, and the
  reference as the adapter-off base (no grad): moxin's `adapters_disabled`, PEFT's `disable_adapter()`; the
  sigmoid DPO loss on summed log-probs.
* ``grpo``: GRPO's policy update on --rows sampled sequences of --seq tokens (the first quarter prompt): per-token
  log-probs, the adapter-off reference's (no grad) for the k3 KL (coefficient 0.001), the clipped surrogate with
  one advantage a sequence, on-policy (one optimizer step a rollout, as Moxin's recipe). Rollout generation is not
  timed (scripts/bench/generate.py measures decoding).
Bases: ``lora`` (frozen bf16) and ``qlora`` (frozen NF4: torchao's format for moxin; for PEFT, bitsandbytes'
Linear4bit as `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=bfloat16)` gives it, then PEFT's `prepare_model_for_kbit_training`, as TRL's QLoRA recipe;
skipped with a line saying so when bitsandbytes is not installed). The baseline computes what TRL's SFT, DPO and
GRPO trainers compute per step (HF forward with full logits, upcast to fp32 for the log-softmax), in a bare loop,
so neither side pays for data loading or logging; with --recompute full both recompute every block (HF: gradient
checkpointing, use_reentrant=False).

Prints tokens/s and peak GPU memory of each case and moxin / HF ratios; writes JSON. ``peak GiB``: the most
allocated from the end of the model's build through the timed steps (weights, adapters' optimizer state,
activations); ``build GiB``: the most allocated while building. Both sides build the random model in bf16 on the
GPU and then cast or quantise it, so the build peak is the 16-bit model's (the stages build a LoRA base on the host
and move it a projection at a time: `apply_lora(..., device=)`).

    python scripts/bench/lora.py [--rank 16] [--rows 1] [--seq 4096] [--out lora.json]
    python scripts/bench/lora.py --tiny       # a tiny model on the CPU: checks the script, measures nothing
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util

import torch
import torch.nn.functional as F

from _common import default_out, env, free, table, timed, write_json

from moxin.config import ModelConfig, ParallelConfig
from moxin.distributed import parallelize
from moxin.losses import dpo_loss, kl_penalty, policy_loss, token_cross_entropy, token_logprobs
from moxin.model import Transformer
from moxin.model import lora as L
from moxin.model.hf import moxin_to_hf_config
from moxin.presets import load_preset
from moxin.stages.common import sequence_logps

TARGETS = list(L.TARGETS)


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def batch(cfg: ModelConfig, rows: int, seq: int, dev: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (rows, seq), generator=g)
    labels = ids.roll(-1, 1).clone()
    labels[:, -1] = -100
    labels[:, : seq // 4] = -100  # a prompt part without loss, as in SFT and DPO data
    return ids.to(dev), labels.to(dev)


def grpo_loss(logp, ref, labels):
    """GRPO's clipped surrogate of on-policy log-probs (B, T) with the k3 KL to the reference (Moxin: 0.001); the
    rows' advantages spread over [-1, 1] (a group's normalised rewards)."""
    mask = (labels != -100).float()
    adv = torch.linspace(-1.0, 1.0, logp.shape[0], device=logp.device) if logp.shape[0] > 1 else \
        torch.ones(1, device=logp.device)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, kl=kl_penalty(logp, ref), kl_coef=0.001)
    return loss


def update(loss, params, opt) -> None:
    """The optimizer step both sides take: backward, clip at 1, fused AdamW."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


# ---- moxin ------------------------------------------------------------------------------------------------------
def moxin_model(cfg: ModelConfig, args, quantize: str | None, dev: str):
    with torch.device(dev), default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32):
        model = Transformer(cfg)
    L.apply_lora(model, L.LoRAConfig(rank=args.rank, alpha=2 * args.rank, targets=TARGETS, quantize=quantize),
                 dev)
    parallelize(model, ParallelConfig(activation_checkpointing=args.recompute, compile=args.compile and dev == "cuda"))
    return model


def moxin_step(model, kind: str, ids, labels, dev: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    amp = dict(device_type=torch.device(dev).type, dtype=torch.bfloat16, enabled=dev == "cuda")

    def step():
        with torch.autocast(**amp):
            if kind == "sft":
                loss, n = model(ids, pos, head=lambda h, w: token_cross_entropy(h, w, labels, 4096))
                loss = loss / n
            elif kind == "grpo":
                head = lambda h, w: token_logprobs(h, w, labels, 4096)  # noqa: E731
                logp = model(ids, pos, head=head)
                with torch.no_grad(), L.adapters_disabled(model):
                    ref = model(ids, pos, head=head)
                loss = grpo_loss(logp, ref, labels)
            else:
                P = ids.shape[0] // 2
                logp, _ = sequence_logps(model, ids, labels, pos, 4096)
                with torch.no_grad(), L.adapters_disabled(model):
                    ref, _ = sequence_logps(model, ids, labels, pos, 4096)
                loss = dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:], beta=0.1, loss_type="dpo").losses.mean()
        update(loss, params, opt)
    return step


# ---- Hugging Face transformers + PEFT -----------------------------------------------------------------------------
def hf_model(cfg: ModelConfig, args, quantize: str | None, dev: str):
    import peft
    from transformers import MistralConfig, MistralForCausalLM

    hcfg = MistralConfig(**{k: v for k, v in moxin_to_hf_config(cfg).items() if k not in ("architectures",)})
    hcfg._attn_implementation = "sdpa"
    with torch.device(dev), default_dtype(torch.bfloat16 if dev == "cuda" else torch.float32):
        model = MistralForCausalLM(hcfg)
    if quantize:
        _to_bnb_nf4(model)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.recompute == "full",
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    elif args.recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lcfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, bias="none",
                           target_modules=[L.TARGETS[t][2] for t in TARGETS], task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lcfg)


def _to_bnb_nf4(model) -> None:
    """Every block projection of a HF model as bitsandbytes' Linear4bit (NF4, double quantisation, bf16 compute):
    what `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")` gives, without weights on disk."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True, device="meta")
                q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                setattr(parent, name, q.to(lin.weight.device))
    model.is_loaded_in_4bit = True


def _hf_token_logps(model, ids, labels):
    logits = model(input_ids=ids).logits.float()  # (B, T, V), as TRL upcasts before the log-softmax
    mask = labels != -100
    lp = torch.gather(F.log_softmax(logits, -1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return lp * mask


def _hf_logps(model, ids, labels):
    return _hf_token_logps(model, ids, labels).sum(-1)


def hf_step(model, kind: str, ids, labels, dev: str):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev == "cuda")
    model.train()

    def step():
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=dev == "cuda"):
            if kind == "sft":
                loss = model(input_ids=ids, labels=labels).loss  # HF shifts labels itself: pass the inputs
            elif kind == "grpo":
                logp = _hf_token_logps(model, ids, labels)
                with torch.no_grad(), model.disable_adapter():
                    ref = _hf_token_logps(model, ids, labels)
                loss = grpo_loss(logp, ref, labels)
            else:
                P = ids.shape[0] // 2
                logp = _hf_logps(model, ids, labels)
                with torch.no_grad(), model.disable_adapter():
                    ref = _hf_logps(model, ids, labels)
                loss = dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:], beta=0.1, loss_type="dpo").losses.mean()
        update(loss, params, opt)
    return step


# ---- the run ------------------------------------------------------------------------------------------------------
def measure(impl: str, kind: str, base: str, cfg: ModelConfig, args, dev: str) -> dict:
    row = {"impl": impl, "step": kind, "base": base}
    quantize = "nf4" if base == "qlora" else None
    free(dev)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        if impl == "hf+peft" and quantize and importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError("bitsandbytes is not installed (pip install bitsandbytes): no HF + PEFT QLoRA baseline")
        rows = args.rows * (2 if kind == "dpo" else 1)
        ids, labels = batch(cfg, rows, args.seq, dev)
        if impl == "moxin":
            model = moxin_model(cfg, args, quantize, dev)
            step = moxin_step(model, kind, ids, labels, dev)
        else:
            model = hf_model(cfg, args, quantize, dev)
            # HF's loss shifts the labels itself: the inputs, with -100 where our (shifted) labels have none
            hf_labels = ids.masked_fill(labels.roll(1, 1) == -100, -100) if kind == "sft" else labels
            step = hf_step(model, kind, ids, hf_labels, dev)
        if dev == "cuda":
            row["build_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        s = timed(step, dev, args.warm, args.reps)
        row.update(seconds=s, tokens_per_s=rows * args.seq / s,
                   trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
        if dev == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        del model, step
    except ImportError as e:
        row["error"] = f"skipped: {e}"
        print(f"{impl} {kind} {base}: skipped: {e}", flush=True)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    free(dev)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rows", type=int, default=1, help="SFT rows / DPO pairs / GRPO sequences a step")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--recompute", default="full", choices=["none", "full"])
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--steps", nargs="+", default=["sft", "dpo", "grpo"], choices=["sft", "dpo", "grpo"])
    ap.add_argument("--bases", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    ap.add_argument("--impls", nargs="+", default=["moxin", "hf+peft"], choices=["moxin", "hf+peft"])
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: checks the script")
    ap.add_argument("--out", default=default_out("lora"))
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:
        cfg = load_preset("tiny", vocab_size=512, attn_backend="sdpa", max_seq_len=256)
        args.seq, args.rank, args.warm, args.reps = min(args.seq, 64), min(args.rank, 4), 1, 2
    else:
        cfg = load_preset("moxin-7b")
    rows = []
    for kind in args.steps:
        for base in args.bases:
            for impl in args.impls:
                r = measure(impl, kind, base, cfg, args, dev)
                rows.append(r)
                print(r, flush=True)
    for r in rows:  # moxin / HF + PEFT on the same step and base
        other = next((o for o in rows if o["impl"] == "hf+peft" and o["step"] == r["step"] and o["base"] == r["base"]
                      and o.get("tokens_per_s")), None)
        if r["impl"] == "moxin" and r.get("tokens_per_s") and other:
            r["speedup"] = r["tokens_per_s"] / other["tokens_per_s"]
            if r.get("peak_gib") and other.get("peak_gib"):
                r["memory_ratio"] = r["peak_gib"] / other["peak_gib"]
    print(table(rows, [("step", "step", ""), ("base", "base", ""), ("impl", "impl", ""),
                       ("tokens_per_s", "tok/s", ",.0f"), ("peak_gib", "peak GiB", ".1f"), ("build_gib", "build GiB", ".1f"),
                       ("speedup", "x HF+PEFT", ".2f"), ("memory_ratio", "mem / HF", ".2f"), ("error", "note", "")],
                f"LoRA update steps: {'tiny (CPU)' if args.tiny else 'Moxin-7B'}, rank {args.rank}, "
                f"{args.rows} x {args.seq} tokens (DPO: pairs), recompute {args.recompute}"))
    write_json(args.out, {"env": env(), "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
