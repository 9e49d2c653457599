"""GRPO's rollout split over a tensor-parallel group: 2 gloo processes (TP=2, one data-parallel rank) or 4 (TP=2
x DP=2), the tiny GRPO stage's policy, rollouts through the gathered copy, each rank decoding its share of its
data rank's rows and the group gathering them. Every data rank rolls out the same prompts from its own
generator. Cases: sampled and greedy, 3 prompts x 3 completions (9 rows: 5 and 4 a rank), and gen_batch_size 4
(blocks of 4, 4 and 1 rows: in the last, tensor rank 1 decodes nothing). Also `row_sums` of (1, the global
rank) on every rank. Writes rank 0's JSON: the prompts, the settings, every rank's (data rank, tensor rank,
row sums, each case's rollout as it holds it and the rows it decoded); the policy's weights go to OUT.weights.pt
for the one-process reference (tests/test_tensor_parallel.py). Then the held-out / validation decode
(`moxin.eval.heldout.sampled_completions`) of the 3 prompts as records, split over the pair the same way: greedy,
and 3 samples a record at temperature 1 in batches of 4; each rank's completions, scores, reward and the rows it
decoded (`generate` counted).

    torchrun --nproc_per_node 2 tests/helpers/tp_rollout.py OUT.json    # or 4
"""

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.device_mesh import init_device_mesh

import moxin.rewards as rewards_pkg
from moxin.config import ParallelConfig
from moxin.distributed import parallelize
from moxin.eval import generation
from moxin.eval.heldout import sampled_completions, sampled_reward
# this script's folder is on sys.path when torchrun runs it
from tiny_grpo import ParityVerifier, arithmetic_prompts, tiny_grpo_stage

#: GRPOConfig overrides of the stage, and each case's (the one-process reference uses the same)
STAGE = dict(group_size=3, max_new_tokens=8, sharded_rollout="gather", decode="eager")
CASES = {"sampled": dict(temperature=1.0), "greedy": dict(temperature=0.0),
         "sampled_blocks": dict(temperature=1.0, gen_batch_size=4)}
#: held-out cases: sampled_completions' (samples, temperature, seed) in batches of HELDOUT_BATCH rows
HELDOUT = {"greedy": (1, 0.0, None), "sampled": (3, 1.0, 11)}
HELDOUT_BATCH = 4


def heldout(stage, records, samples, temperature, seed) -> dict:
    """sampled_completions of `records` as JSON, with the rows this rank's `generate` calls decoded."""
    decoded = [0]
    plain = generation.generate

    def counted(model, prompts, *args, **kw):
        decoded[0] += len(prompts)
        return plain(model, prompts, *args, **kw)

    generation.generate = counted
    try:
        rows, texts, results = sampled_completions(stage, records, samples, temperature, seed)
        reward = sampled_reward(stage, records, samples, temperature, seed)
    finally:
        generation.generate = plain
    return {"rows": rows, "texts": texts, "scores": [r.score for r in results], "reward": list(reward),
            "decoded_rows": decoded[0] // 2}  # each call ran twice (completions, then reward)


def record(ro) -> dict:
    """What a rollout holds for the update and the logs, as JSON."""
    return {"input_ids": ro.input_ids.tolist(), "lengths": ro.lengths.tolist(), "rewards": ro.rewards.tolist(),
            "truncated": ro.truncated.tolist(), "completions": ro.completions,
            "decoded_rows": ro.stats["decoded_rows"], "gen_tokens": ro.stats["gen_tokens"]}


def main(out_path):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    rewards_pkg.VERIFIERS["parity"] = ParityVerifier
    stage, tok = tiny_grpo_stage("parity", **STAGE)
    stage.configure_model()
    parallelize(stage.model, ParallelConfig(), mesh)
    strategy = ModelParallelStrategy(data_parallel_size=dist.get_world_size() // 2, tensor_parallel_size=2)
    strategy._device_mesh = mesh
    stage._trainer = SimpleNamespace(strategy=strategy, is_global_zero=dist.get_rank() == 0)
    batch = arithmetic_prompts(tok, prompts_per_step=3).rank_batches(0)[0]
    res = {"batch": [{"prompt_ids": r["prompt_ids"], "answer": r["answer"]} for r in batch], "stage": STAGE,
           "settings": CASES, "heldout": {"cases": HELDOUT, "batch_size": HELDOUT_BATCH}}
    mine = {"data_rank": mesh["data_parallel"].get_local_rank(),
            "tensor_rank": mesh["tensor_parallel"].get_local_rank(),
            "row_sums": stage.row_sums([1.0, float(dist.get_rank())]), "cases": {}}
    for name, case in CASES.items():
        for k, v in (STAGE | {"gen_batch_size": None} | case).items():
            setattr(stage.cfg, k, v)
        mine["cases"][name] = record(stage.rollout(batch, step=1))
    stage.cfg.gen_batch_size = HELDOUT_BATCH
    records = res["batch"]
    mine["heldout"] = {name: heldout(stage, records, *case) for name, case in HELDOUT.items()}
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    res["ranks"] = ranks
    weights = {n: p.full_tensor().detach().clone() for n, p in stage.model.named_parameters()}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
        torch.save(weights, f"{out_path}.weights.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
