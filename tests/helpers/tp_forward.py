"""Two gloo processes, the tiny model under tensor parallelism 2 (FSDP2 over a data dimension of one rank), against
the unsharded model: logits and final hidden states on rows whose length the ranks split evenly and on rows they
do not (padded inside the forward), a loss head's gradients on odd-length rows, and greedy generation through
the rolling cache (prompts of odd lengths, one-token decode steps); a frozen model stays frozen. Writes the
comparisons, the local head counts and the message refusing a fused inference copy as JSON (rank 0)."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ParallelConfig
from moxin.distributed import parallelize
from moxin.model import Transformer, generate
from moxin.presets import load_preset


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main(out_path):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(plain.state_dict())
    parallelize(model, ParallelConfig(), mesh)
    frozen = Transformer(cfg).requires_grad_(False)  # a reference model: its new DTensor parameters stay frozen
    parallelize(frozen, ParallelConfig(), mesh)
    res = {"heads": [model.layers[0].attention.n_heads, model.layers[0].attention.n_kv_heads],
           "frozen_stays_frozen": not any(p.requires_grad for p in frozen.parameters())}
    for T in (8, 7):
        tokens = torch.randint(0, cfg.vocab_size, (2, T))
        pos = torch.cat([torch.arange(3), torch.arange(T - 3)]).expand(2, T)
        with torch.no_grad():
            res[f"logits_{T}"] = torch.allclose(model(tokens, pos), plain(tokens, pos), atol=1e-5)
            res[f"hidden_{T}"] = torch.allclose(model(tokens, pos, return_hidden=True),
                                                plain(tokens, pos, return_hidden=True), atol=1e-5)
    losses = [m(tokens, pos, head=lambda h, w: (h @ w.t()).logsumexp(-1).sum()) for m in (model, plain)]
    for loss in losses:
        loss.backward()
    res["loss_7"] = abs(float(losses[0]) - float(losses[1]))
    grads = dict(plain.named_parameters())
    res["grad_err_7"] = max(float((full(p.grad) - grads[n].grad).abs().max()) for n, p in model.named_parameters())
    prompts = [[1, 5, 9], [2, 7, 11, 13, 4, 8]]
    with torch.no_grad():
        res["generated"] = generate(model, prompts, 6, temperature=0.0, decode="eager", lockstep=True).tokens
        res["generated_plain"] = generate(plain, prompts, 6, temperature=0.0, decode="eager").tokens
    model.requires_grad_(False)
    model.layers[0].feed_forward.fused_weight = torch.zeros(1)  # as fuse() leaves it
    try:
        model(tokens, pos)
        res["fused"] = "not refused"
    except ValueError as e:
        res["fused"] = str(e)
    if dist.get_rank() == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
