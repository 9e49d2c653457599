"""Rollout throughput of the moxin-7b shape (random weights, bf16, 36 layers): batch 64, prompt 128, 256 new
tokens, sampling, every row forced to produce all 256 tokens (no stop tokens), through `moxin.model.generate`
(eager reference decode, static sync-free decode, CUDA-graph decode, compiled CUDA-graph decode) and Hugging
Face `generate` on the same weights (our state dict copied into `MistralForCausalLM`), measured in the same run.
"first call" is the untimed first generation (it captures the graph and, for decode=compiled, compiles).
A path may carry suffixes: ``+fused`` runs it after `Transformer.fuse_projections` (one q/k/v and one gate/up
product a block; paths without it run first), ``:sdpa`` keeps SDPA as the compiled decode's attention
(`moxin.model.cache.FLEX_DECODE` off) for the A/B against FlexAttention's decoding kernel.
--autocast-fp32 adds the compiled decode of the same weights held in fp32 under bf16 autocast: what GRPO's
rollouts ran before `stage.grpo.rollout_copy` (the policy's fp32 master weights; every token recasts them).

Memory-bandwidth bound of decode: every step reads all weights once (plus the KV cache); "of 4.8 TB/s" is
(weight bytes / decode step time) / 4.8e12; "of copy" divides by a device-to-device copy measured here.

    python scripts/bench/generate.py [--out bench.json]
    python scripts/bench/generate.py --smoke          # tiny model on the CPU
    python scripts/bench/generate.py --layers 8 --paths compiled --autocast-fp32 --no-hf
    python scripts/bench/generate.py --paths graph compiled:sdpa compiled compiled+fused
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import default_out, env, free, sync, table, timed, write_json

from moxin.model import Transformer, generate
from moxin.model import cache as cache_mod
from moxin.presets import load_preset


def copy_bandwidth(dev) -> float | None:
    if torch.device(dev).type != "cuda":
        return None
    n = 2 * 1024**3  # 2 GiB, read + written
    a = torch.empty(n, dtype=torch.uint8, device=dev).random_()
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), dev, 3, 10)
    del a, b
    return 2 * n / t


def hf_from_moxin(model: Transformer, dev, dtype):
    from transformers import MistralConfig, MistralForCausalLM

    from moxin.model.hf import moxin_to_hf_config, moxin_to_hf_name

    d = moxin_to_hf_config(model.cfg)
    d.pop("architectures", None); d.pop("model_type", None)
    conf = MistralConfig(**d)
    conf._attn_implementation = "sdpa"
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            hf = MistralForCausalLM(conf)
    finally:
        torch.set_default_dtype(prev)
    sd = {moxin_to_hf_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return hf.eval()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--layers", type=int, default=None, help="blocks of the moxin-7b shape (default all 36)")
    ap.add_argument("--paths", nargs="*", default=["eager", "static", "graph", "compiled", "compiled+fused"],
                    help="decode paths, each optionally with +fused and / or :sdpa (see the module docstring)")
    ap.add_argument("--autocast-fp32", action="store_true",
                    help="also decode=compiled from fp32 weights under bf16 autocast (GRPO before rollout_copy)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.smoke:
        dev, dtype = "cpu", torch.float32
        cfg = load_preset("tiny", vocab_size=512)
        B, P, N = 4, 16, 8
        paths, reps = ["eager", "static", "static+fused"], 1
    else:
        dev, dtype = "cuda", torch.bfloat16
        cfg = load_preset("moxin-7b", **({"n_layers": a.layers} if a.layers else {}))
        B, P, N = a.batch, a.prompt, a.new
        paths, reps = a.paths, 2
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(dev):
        model = Transformer(cfg).eval()
    torch.set_default_dtype(prev)
    model.requires_grad_(False)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, cfg.vocab_size, (B, P), generator=g).tolist()
    bw = copy_bandwidth(dev)

    def prefill_time():
        from moxin.model.cache import RollingKVCache
        cache = RollingKVCache(cfg, B, P + N, device=dev, dtype=dtype)
        toks = torch.tensor(prompts, device=dev)
        pos = torch.arange(P, device=dev).expand(B, P)
        def f():
            cache.reset()
            with torch.no_grad():
                model(toks, pos, cache=cache)
        return timed(f, dev, 1, 3)

    t_prefill = prefill_time()

    # greedy agreement with the eager reference on these weights (unfused): fraction of equal tokens and the
    # largest log-prob difference over the common prefix (random weights give near-tied logits, so one bf16
    # rounding difference can flip an argmax; eager-vs-eager shows the run-to-run baseline)
    def greedy(path):
        return generate(model, prompts[:8], 16, temperature=0, decode=path, return_logprobs=True)
    ref = greedy("eager")
    agree = {}

    rows = []
    specs = sorted(paths, key=lambda p: "+fused" in p)  # fusing is in place: the unfused paths first
    for spec in specs:
        path = spec.split("+")[0].split(":")[0]
        if "+fused" in spec and model.layers[0].attention.fused_weight is None:
            model.fuse_projections()
        cache_mod.FLEX_DECODE = ":sdpa" not in spec
        gen = torch.Generator(device=dev)

        def run():
            gen.manual_seed(5)
            return generate(model, prompts, N, temperature=1.0, generator=gen, decode=path)
        sync(dev)
        t0 = time.perf_counter()
        out = run()
        sync(dev)
        first = time.perf_counter() - t0
        assert all(len(t) == N for t in out.tokens)
        t = timed(run, dev, 0, reps if path in ("graph", "compiled") else 1)
        step = (t - t_prefill) / (N - 1)
        rows.append({"impl": f"moxin generate decode={spec}", "tok_s": B * N / t, "s": t, "first_s": first,
                     "step_ms": step * 1e3,
                     "weights_tbs": weight_bytes / step / 1e12, "of_4p8": weight_bytes / step / 4.8e12,
                     "of_copy": weight_bytes / step / bw if bw else None})
        o = greedy(path)
        eq = [x == y for r1, r2 in zip(o.tokens, ref.tokens) for x, y in zip(r1, r2)]
        diff = 0.0
        for r1, r2, l1, l2 in zip(o.tokens, ref.tokens, o.logprobs, ref.logprobs):
            n = next((i for i, (x, y) in enumerate(zip(r1, r2)) if x != y), len(r1))
            diff = max([diff] + [abs(a - b) for a, b in zip(l1[:n + 1], l2[:n + 1])])
        agree[spec] = {"equal_tokens": sum(eq) / len(eq), "max_logprob_diff": diff}
        free(dev)
    cache_mod.FLEX_DECODE = True
    if a.autocast_fp32:
        import copy

        m32 = copy.deepcopy(model).float()
        gen = torch.Generator(device=dev)

        def run32():
            gen.manual_seed(5)
            with torch.autocast(torch.device(dev).type, dtype=dtype):
                return generate(m32, prompts, N, temperature=1.0, generator=gen, decode="compiled")
        sync(dev)
        t0 = time.perf_counter()
        run32()
        sync(dev)
        first = time.perf_counter() - t0
        t = timed(run32, dev, 0, reps)
        step = (t - t_prefill) / (N - 1)
        rows.append({"impl": "moxin generate decode=compiled, fp32 weights under autocast", "tok_s": B * N / t, "s": t,
                     "first_s": first, "step_ms": step * 1e3, "weights_tbs": weight_bytes / step / 1e12,
                     "of_4p8": weight_bytes / step / 4.8e12, "of_copy": weight_bytes / step / bw if bw else None})
        del m32
        free(dev)
    if not a.no_hf:
        hf = hf_from_moxin(model, dev, dtype)
        ids = torch.tensor(prompts, device=dev)

        def hf_gen():
            with torch.no_grad():
                o = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                                do_sample=True, pad_token_id=0, eos_token_id=None)
            assert o.shape[1] == P + N
        t = timed(hf_gen, dev, 1 if not a.smoke else 0, 1)
        step = (t - t_prefill) / (N - 1)
        rows.append({"impl": "HF MistralForCausalLM.generate (sdpa)", "tok_s": B * N / t, "s": t,
                     "step_ms": step * 1e3, "weights_tbs": weight_bytes / step / 1e12,
                     "of_4p8": weight_bytes / step / 4.8e12, "of_copy": weight_bytes / step / bw if bw else None})
        del hf
        free(dev)
    base = rows[-1]["tok_s"] if not a.no_hf else rows[0]["tok_s"]
    for r in rows:
        r["vs_hf"] = r["tok_s"] / base
    title = (f"generate: {cfg.n_layers} layers, {str(dtype).removeprefix('torch.')}, batch {B}, prompt {P}, "
             f"{N} new tokens (sampling, all forced), weights {weight_bytes / 1e9:.2f} GB, prefill {t_prefill * 1e3:.1f} ms"
             + (f", copy bandwidth {bw / 1e12:.2f} TB/s" if bw else ""))
    print(table(rows, [("impl", "implementation", ""), ("tok_s", "tokens/s", ",.0f"), ("s", "seconds", ".2f"),
                       ("first_s", "first call s", ".1f"),
                       ("step_ms", "ms/decode step", ".2f"), ("weights_tbs", "weights TB/s", ".2f"),
                       ("of_4p8", "of 4.8 TB/s", ".0%"), ("of_copy", "of copy BW", ".0%"),
                       ("vs_hf", "x HF", ".2f")], title))
    print(f"greedy vs decode=eager (8 rows x 16 tokens): {agree}")
    write_json(a.out or default_out("generate"), {"env": env(), "rows": rows, "greedy_agree": agree,
               "weight_bytes": weight_bytes, "copy_bw": bw, "prefill_s": t_prefill, "batch": B, "prompt": P, "new": N})
    return rows, agree


if __name__ == "__main__":
    main()
