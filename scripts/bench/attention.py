"""Sliding-window attention through `moxin.model.attention.attend` (flex; flash when installed: FlashAttention-4
on Hopper, else flash-attn 2) against SDPA
causal attention, forward + backward, bf16, 32/8 heads, head dim 128, W = 4096, at 4K / 16K / 32K tokens.

    python scripts/bench/attention.py [--out bench.json]      # on a GPU
    python scripts/bench/attention.py --smoke                 # tiny shapes on the CPU (sdpa backend)

FLOPs as shared/baselines/hf_anchor.py counts them: 4*H*D*(visible pairs)*3.5 (forward 2 matmuls, backward
~2.5x). The ideal speedup of a window over full causal is the ratio of visible pairs, (S^2/2)/(S*W - W^2/2);
"of ideal" is the measured speedup as a fraction of it. Rows "4 docs" add a document mask (4 equal documents per
row, as packed pretraining blocks hold); their speedup is against SDPA causal, which masks no documents. Also checks flex against the SDPA reference with a
dense window mask (max abs error, bf16), with the window biting (W < S) and with packed documents.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import default_out, env, free, table, timed, write_json

from moxin.model import attention as A


def pairs(S: int, W: int | None) -> float:
    if W is None or W >= S:
        return S * S / 2
    return S * W - W * W / 2


def correctness(dev, backends, S, W, H, KV, D) -> list[dict]:
    out = []
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, H, S, D, device=dev, generator=g)
    k = torch.randn(1, KV, S, D, device=dev, generator=g)
    v = torch.randn(1, KV, S, D, device=dev, generator=g)
    pos = torch.cat([torch.arange(S // 3), torch.arange(S - S // 3)]).to(dev).unsqueeze(0)  # two packed docs
    for window in (W, W // 4):
        for docs in (False, True):
            doc_ids = (pos == 0).cumsum(1) if docs else None
            ref32 = A.attend(q, k, v, window=window, doc_ids=doc_ids, backend="sdpa")
            qb, kb, vb = (t.bfloat16() for t in (q, k, v))
            ref = A.attend(qb, kb, vb, window=window, doc_ids=doc_ids, backend="sdpa")
            for be in backends:
                o = A.attend(qb, kb, vb, window=window, doc_ids=doc_ids, backend=be)
                out.append({"backend": be, "S": S, "W": window, "docs": docs,
                            "max_abs_err_vs_sdpa_bf16": float((o.float() - ref.float()).abs().max()),
                            "max_abs_err_vs_fp32": float((o.float() - ref32).abs().max()),
                            "sdpa_bf16_err_vs_fp32": float((ref.float() - ref32).abs().max())})
    return out


FLEX_OPTIONS = [  # kernel_options tried by --sweep (block sizes must divide the block mask's 128)
    {"BLOCK_M": 64, "BLOCK_N": 64},
    {"BLOCK_M": 128, "BLOCK_N": 64},
    {"BLOCK_M": 64, "BLOCK_N": 128},
    {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 3},
    {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
    {"BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64},
    {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32},
    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 64, "BLOCK_N1": 128, "BLOCK_M2": 128, "BLOCK_N2": 64},
    {"USE_TMA": True},
    {"PRESCALE_QK": True},
    {"WRITE_DQ": False},
    # faster at 32K on an H200 (18.5 vs 19.5 ms) but its output held NaN there (torch 2.11): not safe to use
    {"ROWS_GUARANTEED_SAFE": True, "BLOCKS_ARE_CONTIGUOUS": True},
]


def flex_sweep(name, S, mask, q, k, v, go, t_ref, ideal, dev, warm, reps) -> list[dict]:
    """The same flex call under other kernel options. (max-autotune, which searches them itself, was tried on an
    H200 at 4K: 52 ms against 1.1 ms with the defaults, so it is not offered.)"""
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 256  # every option set is a recompile of the same function
    variants = [(f"  options {o}", torch.compile(flex_attention, dynamic=False), o) for o in FLEX_OPTIONS]
    out = []
    for label, fn, opts in variants:
        kw = {"kernel_options": opts} if opts else {}

        def run():
            fn(q, k, v, block_mask=mask.block_mask, enable_gqa=True, **kw).backward(go)
        try:
            t = timed(run, dev, warm, reps)
        except Exception as ex:
            out.append({"kernel": name + label, "S": S, "error": repr(ex)[:200]})
            continue
        out.append({"kernel": name + label, "S": S, "ms": t * 1e3, "speedup": t_ref / t,
                    "of_ideal": None if ideal is None else (t_ref / t) / ideal})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--seqs", type=int, nargs="*", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sweep", action="store_true",
                    help="also time FlexAttention kernel options and max-autotune on every flex row")
    a = ap.parse_args(argv)
    if a.smoke:
        dev, dtype, H, KV, D, W, seqs, backends = "cpu", torch.float32, 4, 2, 16, 32, a.seqs or [64, 128], ["sdpa"]
        warm, reps = 1, 2
    else:
        dev, dtype, H, KV, D, W, seqs = "cuda", torch.bfloat16, 32, 8, 128, 4096, a.seqs or [4096, 16384, 32768]
        backends = ["flex"] + (["flash"] if A.HAS_FLASH else [])
        warm, reps = 3, 10
    torch.backends.cuda.matmul.allow_tf32 = True
    check = correctness(dev, backends, 256 if a.smoke else 4096, W if not a.smoke else 32, H, KV, D)

    rows = []
    for S in seqs:
        q = torch.randn(1, H, S, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, KV, S, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, KV, S, D, device=dev, dtype=dtype, requires_grad=True)
        go = torch.randn(1, H, S, D, device=dev, dtype=dtype)

        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(go)

        t_ref = timed(sdpa, dev, warm, reps)
        f_ref = 4 * H * D * pairs(S, None) * 3.5
        ideal = pairs(S, None) / pairs(S, W)
        rows.append({"kernel": "sdpa causal", "S": S, "ms": t_ref * 1e3, "tflops": f_ref / t_ref / 1e12,
                     "speedup": 1.0, "ideal": 1.0, "of_ideal": None})
        # the model builds one mask per forward and every layer uses it: time the attention with the mask built
        # (what each layer pays) and the build on its own (paid once per forward, shared by n_layers)
        doc_ids = (torch.arange(S, device=dev) // (S // 4)).unsqueeze(0)  # packed block: four documents per row
        for case, docs in (("", None), (" 4 docs", doc_ids)):
            for be in backends:
                name = f"moxin {f'flash{A.flash_version(dev)}' if be == 'flash' else be} W={W}{case}"
                try:
                    build = lambda: A.AttentionMask.build(be, W, docs, 1, S, D, q.device)  # noqa: E731
                    mask = build()
                    t_mask = timed(build, dev, warm, reps)
                    t = timed(lambda: mask.apply(q, k, v).backward(go), dev, warm, reps)
                except Exception as ex:  # keep the other rows
                    rows.append({"kernel": name, "S": S, "error": repr(ex)[:200]})
                    continue
                # with documents the speedup is against SDPA causal, which cannot mask documents at all (the
                # issue's bar: no slower than it); the ideal counts the window only
                f = 4 * H * D * pairs(S, W) * 3.5
                rows.append({"kernel": name, "S": S, "ms": t * 1e3, "mask_ms": t_mask * 1e3,
                             "tflops": None if docs is not None else f / t / 1e12, "speedup": t_ref / t,
                             "ideal": None if docs is not None else ideal,
                             "of_ideal": None if docs is not None else (t_ref / t) / ideal, "kernel_used": mask.kernel})
                if a.sweep and mask.kernel == "flex":
                    rows += flex_sweep(name, S, mask, q, k, v, go, t_ref, ideal if docs is None else None, dev,
                                       warm, reps)
        del q, k, v, go
        free(dev)

    print(table(rows, [("kernel", "kernel", ""), ("S", "S", "d"), ("ms", "ms fwd+bwd", ".2f"),
                       ("mask_ms", "mask build ms (once a forward)", ".2f"),
                       ("tflops", "TFLOP/s", ".0f"), ("speedup", "speedup", ".2f"), ("ideal", "ideal", ".2f"),
                       ("of_ideal", "of ideal", ".0%")],
                f"attention fwd+bwd, {H}/{KV} heads, hd {D}, {str(dtype).removeprefix('torch.')}, {dev}"))
    print(table(check, [("backend", "backend", ""), ("S", "S", "d"), ("W", "W", "d"), ("docs", "docs", ""),
                        ("max_abs_err_vs_sdpa_bf16", "max|err| vs SDPA dense mask (bf16)", ".2e"),
                        ("max_abs_err_vs_fp32", "max|err| vs fp32 ref", ".2e"),
                        ("sdpa_bf16_err_vs_fp32", "SDPA bf16 vs fp32", ".2e")], "correctness"))
    write_json(a.out or default_out("attention"), {"env": env(), "rows": rows, "correctness": check,
                                                   "shape": {"H": H, "KV": KV, "D": D, "W": W}})
    return rows, check


if __name__ == "__main__":
    main()
