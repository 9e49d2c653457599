"""Communication of one training step on many nodes, on paper: the bytes each GPU sends over NVLink and over the
inter-node network for FSDP2 over every GPU, HSDP (shard within a node, replicate across nodes), and tensor
parallelism inside a node with FSDP2 or HSDP across nodes, computed from the model and schedule configs so the
table stays true when they change (docs/performance.md, "Communication at 64 nodes, on paper").

What is counted, as moxin runs it (moxin/distributed.py, moxin/tensor_parallel.py):
- FSDP2 with ``fsdp_param_dtype: bfloat16`` (`MixedPrecisionPolicy`): per micro-step the parameters are
  all-gathered in bf16 in the forward and again in the backward (``reshard_after_forward``; the last block stays
  gathered). The gradients are reduce-scattered in ``reduce_dtype`` (fp32 by default, ``--reduce-dtype bfloat16``
  half that) over the shard group and, under HSDP, the gradient shard all-reduced over the replicas, when
  ``hardware.parallel.gradient_sync`` says (moxin/distributed.py's `set_gradient_sync`): auto (the default) every
  micro-step's reduce-scatter and one all-reduce a step; micro_step both every micro-step; step one of each a step.
- Tensor parallelism with sequence parallelism, per block: forward 2 all-gathers + 2 reduce-scatters of the
  micro-step's activations (bf16), backward as many, and with full recomputation the forward's again; the
  embedding's reduce-scatter (and its all-gather in the backward), and the loss head's all-gather of the hidden
  states and of the output weight.
- Ring collectives: a group of n ranks sends (n - 1) / n x S bytes a rank for an all-gather or reduce-scatter of S
  bytes, twice that for an all-reduce. A ring over k nodes of g ranks each crosses nodes on k of its n hops (NCCL
  runs one ring per NIC, each node's rails taking turns), so 1/g of a rank's bytes go over the network when k > 1,
  all of them when the group has one rank a node, none inside a node. Latency (ring steps) is not counted.
- Step time: the recipe's tokens over the GPUs' throughput at a measured MFU (default 49.9 %, full Moxin-7B under
  FSDP2 on 2 H200s without recomputation, docs/performance.md) of ``--peak-tflops``; rates assume no overlap loss.

    python scripts/bench/comm_projection.py                       # Moxin-7B, conf/schedule/moxin_7b.yaml, 64 x 8
    python scripts/bench/comm_projection.py --nodes 64 --seq-len 4096 --out bench_out/comm_projection.json
    python scripts/bench/comm_projection.py --nodes 8 --gradient-sync micro_step --reduce-dtype bfloat16
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import yaml
from _common import ROOT, table, write_json

from moxin.config import GradientSync, ModelConfig, ReduceDtype
from moxin.presets import load_preset

BF16, FP32 = 2, 4
REDUCE_BYTES = {ReduceDtype.FLOAT32: FP32, ReduceDtype.BFLOAT16: BF16}


@dataclass(frozen=True)
class Layout:
    """One way to place the world: T ranks a tensor group (inside a node), R replica groups across nodes, and FSDP2
    over the world / T / R ranks of a shard group; its gradients reduced in `reduce_dtype` when `gradient_sync`
    says (`moxin.config.GradientSync`)."""

    name: str
    tp: int
    replicate: int
    gradient_sync: str = GradientSync.AUTO
    reduce_dtype: str = ReduceDtype.FLOAT32


@dataclass(frozen=True)
class Cluster:
    nodes: int
    gpus_per_node: int = 8
    nvlink_gb_s: float = 450.0  # a GPU's NVLink send bandwidth: 900 GB/s both ways on an H100 SXM
    network_gb_s: float = 50.0  # a GPU's share of the node's network: 8 x 400 Gb/s a node, one NIC a GPU

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


def ring_split(sent: float, ranks: int, nodes: int) -> tuple[float, float]:
    """(NVLink bytes, network bytes) of `sent` bytes a rank sends in ring collectives over `ranks` ranks spread
    over `nodes` nodes (equally): none on the network inside a node, all of it with one rank a node, else 1/g."""
    if nodes <= 1:
        return sent, 0.0
    net = sent * nodes / ranks
    return sent - net, net


def gathered(size: float, n: int) -> float:
    """Bytes a rank sends in a ring all-gather or reduce-scatter of `size` bytes over `n` ranks."""
    return (n - 1) / n * size


def step_traffic(cfg: ModelConfig, layout: Layout, cluster: Cluster, tokens_per_step: int, micro_batch_tokens: int,
                 recompute: bool = True) -> dict:
    """Bytes one GPU sends over NVLink and the network in one optimizer step of `tokens_per_step` tokens, in
    micro-steps of `micro_batch_tokens` tokens a data-parallel rank (a tensor group reads as one rank)."""
    g, t, r = cluster.gpus_per_node, layout.tp, layout.replicate
    if g % t or cluster.world % (t * r):
        raise ValueError(f"{layout.name}: TP={t} must divide the {g} GPUs of a node and T x R={t * r} the world "
                         f"{cluster.world}")
    dp = cluster.world // t
    shard = dp // r
    accum = tokens_per_step // (micro_batch_tokens * dp)
    if accum < 1 or accum * micro_batch_tokens * dp != tokens_per_step:
        raise ValueError(f"{layout.name}: {tokens_per_step} tokens a step are not a whole number of micro-steps of "
                         f"{micro_batch_tokens} tokens on {dp} data-parallel ranks")
    params = cfg.num_params() / t  # a GPU's tensor shard (norms, replicated under TP, are 0.01 % of it)
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    block = (cfg.num_params(include_embeddings=False) - cfg.dim - head) / cfg.n_layers / t  # one block's shard
    # the shard group: `shard` data ranks, one a tensor group, so shard x T GPUs over nodes: with TP inside a node,
    # the ranks of a shard group sit on separate nodes when shard <= nodes
    shard_nodes = max(1, min(cluster.nodes, shard * t // g)) if shard > 1 else 1
    replica_nodes = min(cluster.nodes, r)
    red = REDUCE_BYTES[ReduceDtype(layout.reduce_dtype)]
    sync = GradientSync(layout.gradient_sync)
    # per step: the all-gathers every micro-step; the reduce-scatter and the replica all-reduce every micro-step or
    # once (on the last micro-step) as gradient_sync says
    fsdp_ag = accum * (0.0 if shard == 1 else gathered(BF16 * (2 * params - block), shard))  # fwd + bwd (last kept)
    fsdp_rs = (1 if sync.defers_reduce_scatter else accum) * (0.0 if shard == 1 else gathered(red * params, shard))
    hsdp_ar = (1 if sync.defers_all_reduce else accum) * (0.0 if r == 1 else 2 * gathered(red * params / shard, r))
    nv_fsdp, net_fsdp = ring_split(fsdp_ag + fsdp_rs, shard, shard_nodes)
    nv_rep, net_rep = ring_split(hsdp_ar, r, replica_nodes)
    tp_bytes = 0.0
    if t > 1:
        act = BF16 * micro_batch_tokens * cfg.dim  # a micro-step's hidden states of a tensor group, bf16
        per_block = (4 + 4 + (4 if recompute else 0)) * gathered(act, t)
        head = gathered(act, t) + gathered(BF16 * cfg.vocab_size * cfg.dim, t)  # hidden states and output weight
        tp_bytes = cfg.n_layers * per_block + 2 * gathered(act, t) + head  # + the embedding's reduce-scatter pair
    nvlink = nv_fsdp + nv_rep + accum * tp_bytes
    network = net_fsdp + net_rep
    return {"layout": layout.name, "tp": t, "replicate": r, "shard": shard, "data_parallel": dp, "accum": accum,
            "gradient_sync": sync.value, "reduce_dtype": ReduceDtype(layout.reduce_dtype).value,
            "micro_batch_tokens": micro_batch_tokens, "nvlink_bytes": nvlink, "network_bytes": network,
            "fsdp_bytes": fsdp_ag + fsdp_rs, "replica_bytes": hsdp_ar, "tp_bytes": accum * tp_bytes,
            "nvlink_s": nvlink / (cluster.nvlink_gb_s * 1e9), "network_s": network / (cluster.network_gb_s * 1e9)}


def layouts(cluster: Cluster, tp: int, gradient_sync: str = GradientSync.AUTO,
            reduce_dtype: str = ReduceDtype.FLOAT32) -> list[Layout]:
    n, g = cluster.nodes, cluster.gpus_per_node
    red = "" if ReduceDtype(reduce_dtype) == ReduceDtype.FLOAT32 else f", {reduce_dtype} reduce"
    sync = "" if GradientSync(gradient_sync) == GradientSync.AUTO else f", sync {gradient_sync}"
    return [Layout(f"FSDP2 over every GPU{sync}{red}", 1, 1, gradient_sync, reduce_dtype),
            Layout(f"HSDP: replicate {n} nodes x shard {g}{sync}{red}", 1, n, gradient_sync, reduce_dtype),
            Layout(f"TP={tp} in a node + FSDP2 over {n} nodes{sync}{red}", tp, 1, gradient_sync, reduce_dtype),
            Layout(f"TP={tp} in a node + HSDP (replicate {n}){sync}{red}", tp, n, gradient_sync, reduce_dtype)]


def project(cfg: ModelConfig, cluster: Cluster, tokens_per_step: int, micro_batch_tokens: int, seq_len: int,
            mfu: float, peak_tflops: float, tp: int = 8, recompute: bool = True,
            gradient_sync: str = GradientSync.AUTO, reduce_dtype: str = ReduceDtype.FLOAT32) -> dict:
    """The table's rows (one a layout, plus the TP ones at a micro-batch T times larger: one micro-step a step, and
    the HSDP ones with the replica all-reduce every micro-step, micro_step, as before `set_gradient_sync`) and the
    step time they are read against."""
    per_gpu = mfu * peak_tflops * 1e12 / cfg.flops_per_token(seq_len)
    step_s = tokens_per_step / (cluster.world * per_gpu)
    lays = layouts(cluster, tp, gradient_sync, reduce_dtype)
    rows = [step_traffic(cfg, lay, cluster, tokens_per_step, micro_batch_tokens, recompute) for lay in lays]
    for lay in lays[2:]:
        rows.append(step_traffic(cfg, lay, cluster, tokens_per_step, micro_batch_tokens * tp, recompute))
    if GradientSync(gradient_sync) != GradientSync.MICRO_STEP:
        for lay in layouts(cluster, tp, GradientSync.MICRO_STEP, reduce_dtype)[1::2]:  # the HSDP ones
            rows.append(step_traffic(cfg, lay, cluster, tokens_per_step, micro_batch_tokens, recompute))
    for row in rows:
        row |= {"nvlink_gb": row["nvlink_bytes"] / 1e9, "network_gb": row["network_bytes"] / 1e9,
                "nvlink_gb_per_s": row["nvlink_bytes"] / 1e9 / step_s,
                "network_gb_per_s": row["network_bytes"] / 1e9 / step_s,
                "network_share": row["network_s"] / step_s, "nvlink_share": row["nvlink_s"] / step_s}
    return {"params": cfg.num_params(), "world": cluster.world, "nodes": cluster.nodes, "step_s": step_s,
            "tokens_per_s_per_gpu": per_gpu, "tokens_per_step": tokens_per_step, "mfu": mfu, "rows": rows,
            "cluster": cluster.__dict__}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="moxin-7b")
    ap.add_argument("--schedule", default="moxin_7b", help="conf/schedule/NAME.yaml (tokens_per_step, "
                                                           "micro_batch_tokens)")
    ap.add_argument("--nodes", type=int, default=64)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--mfu", type=float, default=0.499)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--nvlink-gb-s", type=float, default=450.0)
    ap.add_argument("--network-gb-s", type=float, default=50.0)
    ap.add_argument("--no-recompute", action="store_true", help="activation_checkpointing none (TP's forward "
                                                                "collectives are not rerun)")
    ap.add_argument("--gradient-sync", default=GradientSync.AUTO, choices=[m.value for m in GradientSync],
                    help="hardware.parallel.gradient_sync (auto: HSDP's replica all-reduce once a step)")
    ap.add_argument("--reduce-dtype", default=ReduceDtype.FLOAT32, choices=[m.value for m in ReduceDtype],
                    help="hardware.parallel.reduce_dtype of the gradient reduce-scatter and all-reduce")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    sched = yaml.safe_load((ROOT / "conf" / "schedule" / f"{a.schedule}.yaml").read_text())
    cluster = Cluster(a.nodes, a.gpus_per_node, a.nvlink_gb_s, a.network_gb_s)
    res = project(load_preset(a.model), cluster, int(sched["tokens_per_step"]), int(sched["micro_batch_tokens"]),
                  a.seq_len, a.mfu, a.peak_tflops, a.tp, not a.no_recompute, a.gradient_sync, a.reduce_dtype)
    print(table(res["rows"], [("layout", "layout", ""), ("micro_batch_tokens", "micro-batch tokens", ""),
                              ("accum", "micro-steps", ""), ("nvlink_gb", "NVLink GB/step", ".1f"),
                              ("network_gb", "network GB/step", ".2f"), ("nvlink_gb_per_s", "NVLink GB/s", ".0f"),
                              ("network_gb_per_s", "network GB/s", ".1f"),
                              ("nvlink_share", "NVLink busy", ".0%"), ("network_share", "network busy", ".0%")],
                f"{a.model}: {res['params'] / 1e9:.2f} B parameters, {cluster.world} GPUs ({a.nodes} x "
                f"{a.gpus_per_node}), {res['tokens_per_step']} tokens a step in {res['step_s']:.2f} s at "
                f"{a.mfu:.1%} MFU; bytes each GPU sends"))
    write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
