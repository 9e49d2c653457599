"""The decode step's matrix products at batch 64, Moxin-7B shapes, against their weight reads at the copy bandwidth
measured in the same run: a block's seven separate products, and the same with q/k/v and gate/up fused (what a
fused-projection decode would run). Each shape is timed over 36 distinct weights (nothing stays in L2) replayed in
a CUDA graph (no launch gaps between the products).

    python scripts/bench/decode_gemm.py     # on a GPU
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from _common import timed

M, D, QD, KVD, FF, LAYERS = 64, 4096, 4096, 1024, 14336, 36


def per_call(name: str, weights: list[torch.Tensor], x: torch.Tensor, bw: float) -> float:
    def run():
        for w in weights:
            F.linear(x, w)

    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    t = timed(g.replay, "cuda", 3, 20) / len(weights)
    ideal = weights[0].nbytes / bw
    print(f"{name:16s} {t * 1e6:8.1f} us   weight read at copy bandwidth {ideal * 1e6:7.1f} us   {ideal / t:4.0%}",
          flush=True)
    return t


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write)."""
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), "cuda", 3, 10)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("decode_gemm.py needs a CUDA GPU")
    dt = torch.bfloat16
    x = torch.randn(M, D, device="cuda", dtype=dt)
    h = torch.randn(M, FF, device="cuda", dtype=dt)
    shapes = {"q": (QD, D), "k": (KVD, D), "v": (KVD, D), "o": (D, QD), "gate": (FF, D), "up": (FF, D),
              "down": (D, FF)}
    W = {n: [torch.randn(o, i, device="cuda", dtype=dt) * 0.02 for _ in range(LAYERS)] for n, (o, i) in shapes.items()}
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; batch {M}; per product, mean over {LAYERS} weights")
    sep = sum(per_call(n, W[n], h if n == "down" else x, bw) for n in shapes)
    ideal = sum(w[0].nbytes for w in W.values()) / bw
    print(f"separate: {sep * 1e6:.1f} us a block, {sep * LAYERS * 1e3:.2f} ms for {LAYERS} blocks "
          f"(weight reads {ideal * LAYERS * 1e3:.2f} ms, {ideal / sep:.0%})")
    qkv = [torch.cat([W["q"][i], W["k"][i], W["v"][i]]) for i in range(LAYERS)]
    gu = [torch.cat([W["gate"][i], W["up"][i]]) for i in range(LAYERS)]
    fused = (per_call("q/k/v fused", qkv, x, bw) + per_call("o", W["o"], x, bw)
             + per_call("gate/up fused", gu, x, bw) + per_call("down", W["down"], h, bw))
    print(f"fused: {fused * 1e6:.1f} us a block, {fused * LAYERS * 1e3:.2f} ms for {LAYERS} blocks "
          f"({ideal / fused:.0%}; {sep / fused:.2f}x the separate products)")


if __name__ == "__main__":
    main()
