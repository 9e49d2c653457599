"""Two gloo processes, the tiny model under tensor parallelism 2 with compiled blocks and each recomputation
policy, and eager with full recomputation (through `moxin.distributed.parallelize`), against the unsharded eager
model: the loss of a head and every parameter's gradient (the embedding's included: it gets the gradient back
through the blocks). Writes {policy and compile: [loss difference, largest gradient difference]} as JSON (rank 0).

    torchrun --nproc_per_node 2 tests/helpers/tp_compile.py OUT.json [cpu|cuda]
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ParallelConfig
from moxin.distributed import parallelize
from moxin.model import Transformer
from moxin.presets import load_preset
from tp_forward import full  # this script's folder is on sys.path


def main(out_path, device="cpu"):
    if device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    mesh = init_device_mesh(device, (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    cfg = load_preset("tiny")
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    pos = torch.cat([torch.arange(5), torch.arange(11)]).expand(2, 16).to(device)
    res = {}
    for policy, compile in (("none", True), ("mlp", True), ("full", True), ("full", False)):
        torch.manual_seed(0)
        plain, model = Transformer(cfg).to(device), Transformer(cfg).to(device)
        model.load_state_dict(plain.state_dict())
        parallelize(model, ParallelConfig(activation_checkpointing=policy, compile=compile), mesh)
        losses = [m(tokens, pos, head=lambda h, w: (h @ w.t()).logsumexp(-1).sum()) for m in (model, plain)]
        for loss in losses:
            loss.backward()
        want = {n: p.grad for n, p in plain.named_parameters()}
        err = max(float((full(p.grad) - want[n.replace("_checkpoint_wrapped_module.", "")]).abs().max())
                  for n, p in model.named_parameters())
        res[f"{policy}, compile={compile}"] = [abs(float(losses[0]) - float(losses[1])), err]
    if dist.get_rank() == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
