"""weights_checksum under FSDP2 with bf16 compute parameters, after a forward without a backward (validation,
a sample, a frozen reference): the root module and the last block then keep their gathered bf16 parameters,
and a checksum over those counted bf16-rounded values instead of the fp32 shards. Writes both checksums
(`weights_checksum` and the float64 sum of the gathered fp32 state dict) to JSON. Used by
tests/test_distributed.py.

    torchrun --nproc_per_node 2 tests/helpers/fsdp_checksum.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ModelConfig
from moxin.distributed import apply_fsdp, weights_checksum
from moxin.model import Transformer


def main(out_path):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                      max_seq_len=64)
    model = Transformer(cfg)
    with torch.no_grad():  # values that bf16 cannot hold exactly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    apply_fsdp(model, mesh, "bfloat16", reshard_after_forward=True)
    full = sum(float((t.full_tensor() if hasattr(t, "full_tensor") else t).double().sum())
               for t in model.state_dict().values())
    before = weights_checksum(model)
    with torch.no_grad():
        model(torch.randint(0, 256, (2, 16)))
    gathered_after_forward = [n for n, p in model.named_parameters() if not hasattr(p, "to_local")]
    after = weights_checksum(model)
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump({"state_dict": full, "before": before, "after": after,
                       "gathered_after_forward": gathered_after_forward}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
