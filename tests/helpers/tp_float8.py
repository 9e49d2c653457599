"""Float8 (torchao, emulated) under tensor parallelism on 2 CPU processes, TP=2 (one data-parallel rank, so FSDP2
over a mesh of one), or on 4, TP=2 x DP=2 (FSDP2 over 2 data ranks: tensorwise all-gathers its weights in float8
too; every data rank trains on the same rows, so the mean gradient is one process's), the blocks' projections
planned with torchao's float8 styles (tensorwise) or the plain ones (rowwise). Trains the same steps as fsdp_float8.py tensor-parallel and, on rank 0, unsharded in one process with
float8 and without it, with AdamW and with SGD, and writes to JSON, for each recipe: the loss curves (tp_, single_, fp32_ +
adamw / sgd), the converted layers under TP (names, their weights' placements), how many weights FSDP2
all-gathers in float8, what the first block's q, w1 and
w2 projections are fed (a float8 tensor under tensorwise), and the state-dict keys of the TP float8 model and of
a plain one. Used by tests/test_float8.py.

    torchrun --nproc_per_node 2 tests/helpers/tp_float8.py OUT.json RECIPE [RECIPE ...]    # or 4
"""

import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torchao.float8.float8_linear import Float8Linear

from moxin.config import ParallelConfig
from moxin.distributed import float8_optimizer_hook, parallelize
from moxin.model import Transformer
# this script's folder is on sys.path when torchrun runs it
from fsdp_float8 import train, tiny_config


#: the training's AdamW (which turns a gradient's last-bit differences into whole steps where it is near zero) and
#: plain SGD (whose steps are proportional to the gradients)
OPTIMIZERS = {"adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
              "sgd": lambda params: torch.optim.SGD(params, lr=0.5)}


def gloo_float8_all_gather() -> None:
    """Let gloo carry torchao's float8 all-gathers (the tensorwise styles gather activations, and in the backward
    the outputs' gradients, in float8). NCCL sends a float8 tensor as bytes (ProcessGroupNCCL maps the float8
    dtypes to ncclUint8); gloo refuses the dtype ("Invalid scalar type"). Here the gather sends the same bytes as
    uint8 and waits for them at once, and the result is viewed back as float8: what NCCL moves, the numbers
    unchanged. The one thing this test swaps; the styles, casts and products are torchao's."""
    from torchao.float8.float8_ops import FLOAT8_OPS_TABLE
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    def all_gather_bytes(aten_op, args, kwargs=None):
        x = args[0]
        out = aten_op(x._data.contiguous().view(torch.uint8), *args[1:], **(kwargs or {}))
        out = torch.ops._c10d_functional.wait_tensor(out).view(x._data.dtype)
        return Float8TrainingTensor(out, x._scale, x._orig_dtype, x._linear_mm_config, x._gemm_input_role)

    for op in (torch.ops.c10d_functional.all_gather_into_tensor.default,
               torch.ops._c10d_functional.all_gather_into_tensor.default):
        FLOAT8_OPS_TABLE[op] = all_gather_bytes


def fed(model) -> dict:
    """name -> the type of the input the first forward feeds that projection (recorded by pre-hooks)."""
    seen = {}

    def hook(name):
        def record(module, args):
            x = args[0]  # a DTensor here (the style's hook ran first): what it holds locally
            seen.setdefault(name, type(getattr(x, "_local_tensor", x)).__name__)  # None returned: x goes on
        return record

    for name in ("layers.0.attention.wq", "layers.0.feed_forward.w1", "layers.0.feed_forward.w2"):
        model.get_submodule(name).register_forward_pre_hook(hook(name))
    return seen


def run(recipe, mesh) -> dict:
    """One recipe's loss curves (the one-process ones on rank 0 only) and the TP model's float8 layers."""
    torch.manual_seed(0)
    base = Transformer(tiny_config())
    pcfg = ParallelConfig(float8=recipe, float8_emulate=True)
    curves, inputs, float8, keys, gathered = {}, {}, {}, [], 0
    for name, optim in OPTIMIZERS.items():
        tp = parallelize(copy.deepcopy(base), pcfg, mesh)
        inputs = fed(tp)
        opt = optim(tp.parameters())
        float8_optimizer_hook(opt, tp)
        curves[f"tp_{name}"] = train(tp, opt)
        float8 = {n: [str(p) for p in m.weight.placements] for n, m in tp.named_modules()
                  if isinstance(m, Float8Linear)}
        gathered = sum(type(p._local_tensor).__name__ == "WeightWithDynamicFloat8CastTensor" for p in tp.parameters())
        keys = list(tp.state_dict().keys())
        if dist.get_rank() == 0:
            single = parallelize(copy.deepcopy(base), pcfg)
            curves[f"single_{name}"] = train(single, optim(single.parameters()))
            plain = copy.deepcopy(base)
            curves[f"fp32_{name}"] = train(plain, optim(plain.parameters()))
    return {**curves, "float8": float8, "float8_all_gather": gathered, "inputs": inputs, "keys": keys,
            "plain_keys": list(base.state_dict().keys())}


def main(out_path, recipes):
    dist.init_process_group("gloo")
    gloo_float8_all_gather()
    mesh = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("data_parallel", "tensor_parallel"))
    res = {recipe: run(recipe, mesh) for recipe in recipes}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
