"""Two gloo processes reduce a few numbers with moxin.distributed.all_reduce_values (Python numbers, 0-d tensors
and bools mixed, as the stages pass them) under sum, max and min; writes what each rank got as JSON."""

import json
import sys

import torch
import torch.distributed as dist

from moxin.distributed import all_reduce_values, rank_and_world


def main(out_path):
    dist.init_process_group("gloo")
    rank, world = rank_and_world()
    mine = [float(rank + 1), torch.tensor(10 * (rank + 1), dtype=torch.int64), torch.tensor(0.5 * rank), rank == 0]
    got = {op: all_reduce_values(mine, "cpu", op) for op in ("sum", "max", "min")}
    res = [None] * world
    dist.all_gather_object(res, {"rank": rank, "world": world, **got})
    if rank == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
