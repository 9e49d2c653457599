"""Two gloo processes generate; rank 0's rows stop after one token, rank 1's never stop. With lockstep=True both
ranks must run the same number of forwards (as FSDP2's collective forwards require); writes counts as JSON."""

import json
import sys

import torch
import torch.distributed as dist

from moxin.model import Transformer, generate
from moxin.presets import load_preset


def main(out_path, lockstep):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny")).eval()
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    prompts = [[1, 5, 9, 13], [1, 7, 2]]
    first = generate(model, prompts, 1, temperature=0.0).tokens[0][0]
    calls[0] = 0
    stop = (first,) if rank == 0 else ()
    out = generate(model, prompts[:1], 12, temperature=0.0, stop_tokens=stop, lockstep=lockstep == "1")
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, {"forwards": calls[0], "tokens": out.tokens[0], "finished": out.finished[0]})
    if rank == 0:
        json.dump(counts, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
