"""Evaluation (moxin.eval.evaluate, lockstep) of the tiny model under tensor parallelism 2 on 2 gloo processes: a
multiple-choice task (log-likelihoods) and a generative one (greedy and sampled, window 16, so the rolling cache
wraps on the few-shot prompts). The tensor pair is one data-parallel rank: both ranks must take the same items.
Writes rank 0's results as JSON; tests/test_tensor_parallel.py holds them to one process's.

    torchrun --nproc_per_node 2 tests/helpers/tp_eval.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moxin.config import ParallelConfig
from moxin.data.sample import sample_path
from moxin.distributed import parallelize
from moxin.eval import evaluate
from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.tokenizer import load_tokenizer


def eval_cfg() -> dict:
    """The tasks: 4 multiple-choice items (1-shot), 3 arithmetic problems, greedy and 2 samples each."""
    return {"verifier_workers": 0, "batch_tokens": 96, "tasks": [
        {"name": "mc", "path": str(sample_path("eval_mc")), "text": "Question: {question}\nAnswer:", "limit": 4,
         "num_fewshot": 1},
        {"name": "math", "kind": "generation", "path": str(sample_path("eval_math")), "verifier": "exact",
         "limit": 3, "num_fewshot": 1, "max_new_tokens": 6, "samples": 2, "k": [1, 2], "temperature": 1.0}]}


def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=512)).eval()


def main(out_path):
    dist.init_process_group("gloo")
    m = model()
    parallelize(m, ParallelConfig(), init_device_mesh("cpu", (1, 2), mesh_dim_names=("data_parallel",
                                                                                     "tensor_parallel")))
    m.eval()
    res = evaluate(m, load_tokenizer("mistral"), eval_cfg(), lockstep=True)
    if dist.get_rank() == 0:
        json.dump(res, open(out_path, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
