"""Two gloo processes, the tiny model under tensor parallelism 2 (FSDP2 over a data dimension of one rank): the
logits and the final hidden states equal the unsharded model's; a generation forward (a RollingKVCache) and a row
length the ranks cannot split evenly are refused. Writes the messages and local head counts as JSON (rank 0)."""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ParallelConfig
from moxin.distributed import parallelize
from moxin.model import RollingKVCache, Transformer
from moxin.presets import load_preset


def refusal(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "not refused"


def main(out_path):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    plain = Transformer(cfg)
    model = Transformer(cfg)
    model.load_state_dict(plain.state_dict())
    parallelize(model, ParallelConfig(), mesh)
    tokens = torch.randint(0, cfg.vocab_size, (2, 8))
    pos = torch.cat([torch.arange(3), torch.arange(5)]).expand(2, 8)
    with torch.no_grad():
        logits_match = torch.allclose(model(tokens, pos), plain(tokens, pos), atol=1e-5)
        hidden_match = torch.allclose(model(tokens, pos, return_hidden=True), plain(tokens, pos, return_hidden=True),
                                      atol=1e-5)
        cache = RollingKVCache(cfg, 2, 16)
        res = {"cache": refusal(lambda: model(tokens, pos, cache=cache)),
               "uneven": refusal(lambda: model(tokens[:, :7], pos[:, :7])),
               "heads": [model.layers[0].attention.n_heads, model.layers[0].attention.n_kv_heads],
               "logits_match": logits_match, "hidden_match": hidden_match}
    if dist.get_rank() == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
