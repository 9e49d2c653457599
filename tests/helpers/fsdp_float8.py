"""Float8 (torchao, emulated) under FSDP2 on 2 CPU processes: the tensorwise recipe all-gathers the weights in
float8 with their scales precomputed after each optimizer step (`float8_optimizer_hook`). Trains the same steps
sharded and, on rank 0, unsharded in one process, and writes both loss curves, the state-dict keys of the sharded
float8 model and of a plain model, and the precomputed-scale count to JSON. Used by tests/test_float8.py.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_float8.py OUT.json RECIPE
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ModelConfig, ParallelConfig
from moxin.distributed import float8_optimizer_hook, parallelize
from moxin.model import Transformer

STEPS = 5


def tiny_config() -> ModelConfig:
    """A 2-block model whose projections float8 converts (every dimension a multiple of 16)."""
    return ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                       max_seq_len=64, attn_backend="sdpa")


def batches():
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 256, (STEPS, 4, 1), generator=g)
    return (start + torch.arange(17)) % 256  # (steps, B, T+1): a pattern the model learns


def train(model, opt) -> list[float]:
    losses = []
    for x in batches():
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(out_path, recipe):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    base = Transformer(tiny_config())
    pcfg = ParallelConfig(float8=recipe, float8_emulate=True)
    single = copy.deepcopy(base)
    sharded = copy.deepcopy(base)
    parallelize(sharded, pcfg, init_device_mesh("cpu", (dist.get_world_size(),)))
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    float8_optimizer_hook(opt, sharded)
    sharded_losses = train(sharded, opt)
    precomputed = sum(getattr(p._local_tensor, "_precomputed_scale", None) is not None
                      for p in sharded.parameters() if hasattr(p, "to_local"))
    keys = list(sharded.state_dict().keys())
    if dist.get_rank() == 0:
        parallelize(single, pcfg)
        single_losses = train(single, torch.optim.AdamW(single.parameters(), lr=1e-2))
        with open(out_path, "w") as f:
            json.dump({"sharded": sharded_losses, "single": single_losses, "keys": keys,
                       "plain_keys": list(base.state_dict().keys()), "precomputed": precomputed}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
