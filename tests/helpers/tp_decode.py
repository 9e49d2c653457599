"""Two gloo processes, the tiny model (window 16) under tensor parallelism 2, against the unsharded model: the
rolling-cache decode past the window (prompt + new tokens > 16, so the ring buffer wraps), greedy and sampled
(temperature, top-k, top-p, the same seeded generator on both), left and right padding, chunked prefill of a
prompt longer than the window, the eager and the static decode paths, stop tokens ending rows at different steps,
and the gathered copy GRPO's rollouts decode with (built from the DTensors' full_tensor()), whole on each rank
and split over the pair as GRPO's rollouts split it (each rank its `row_share` with `rows_of`, then
`gather_rows` over the tensor group). Writes rank 0's results (each case's tokens and log-probs for each) as
JSON.

    torchrun --nproc_per_node 2 tests/helpers/tp_decode.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ParallelConfig
from moxin.distributed import parallelize
from moxin.model import Transformer, generate
from moxin.presets import load_preset
from moxin.tensor_parallel import gather_rows, row_share

NEW = 20  # new tokens: with prompts of 3..20 tokens every row runs past the window of 16

CASES = {
    "greedy_left": dict(temperature=0.0),
    "greedy_right_chunked": dict(temperature=0.0, pad_side="right", prefill_chunk=4),
    "sampled": dict(temperature=0.9, top_k=50, top_p=0.95, seed=7),
    "sampled_static": dict(temperature=1.0, top_p=0.9, seed=11, decode="static"),
    "greedy_stops": dict(temperature=0.0, stop=True),
}


def gathered_copy(model, cfg):
    """The unsharded copy GRPOStage.rollout_model builds under a sharded strategy: fused projections, every
    parameter gathered from its DTensor (a collective on every rank)."""
    with torch.device("meta"):
        copy = Transformer(cfg)
    copy = copy.to_empty(device="cpu").eval().requires_grad_(False)
    copy.fuse_projections()
    params = dict(copy.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            params[name].copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)
    return copy


def run(model, prompts, case: dict, stop_tokens=(), lockstep=False, rows_of=None):
    kw = {k: v for k, v in case.items() if k not in ("seed", "stop")}
    gen = torch.Generator().manual_seed(case["seed"]) if "seed" in case else None
    out = generate(model, prompts, NEW, generator=gen, stop_tokens=stop_tokens, return_logprobs=True,
                   lockstep=lockstep, rows_of=rows_of, **({"decode": "eager"} | kw))
    return {"tokens": out.tokens, "logprobs": out.logprobs, "finished": out.finished}


def run_split(model, prompts, case: dict, stop_tokens, tp_mesh):
    """This rank's share of the rows decoded alone (the rows' part of the whole batch's draws), then every rank's
    gathered over the tensor group into all the rows, in order."""
    a, b = row_share(len(prompts), tp_mesh.get_local_rank(), tp_mesh.size())
    mine = run(model, prompts[a:b], case, stop_tokens, rows_of=(a, len(prompts)))
    return gather_rows(list(range(a, b)), mine, len(prompts), tp_mesh.get_group())[0]


def main(out_path):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    plain = Transformer(cfg).eval()
    model = Transformer(cfg)
    model.load_state_dict(plain.state_dict())
    parallelize(model, ParallelConfig(), mesh)
    model.eval()
    copy = gathered_copy(model, cfg)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 6, 20, 9)]
    res = {"window": cfg.sliding_window, "new": NEW, "prompt_lens": [len(p) for p in prompts]}
    with torch.no_grad():
        for name, case in CASES.items():
            stops = ()
            if case.get("stop"):  # stop on tokens the plain model emits mid-way, so rows end at different steps
                first = run(plain, prompts, case)["tokens"]
                stops = (first[0][4], first[2][9])
            res[name] = {"tp": run(model, prompts, case, stops, lockstep=True), "plain": run(plain, prompts, case, stops),
                         "copy": run(copy, prompts, case, stops),
                         "split": run_split(copy, prompts, case, stops, mesh["tensor_parallel"])}
    if dist.get_rank() == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
