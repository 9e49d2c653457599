"""Parallelism applied to the model from outside, in one fixed order (torchtitan's):

    float8 linear layers -> tensor parallelism -> activation checkpointing -> torch.compile -> FSDP2 sharding

The model file knows nothing of this. Stages call `parallelize` from `configure_model`, where Lightning's
`ModelParallelStrategy` has set up the device mesh (one data-parallel dimension for FSDP2). With
`hardware.parallel.replicate=R > 1` that dimension is laid out as a (replicate R, shard world/R) mesh, rank =
replica * (world/R) + shard as torchtitan's ParallelDims orders it, and `fully_shard` over the 2-D mesh is HSDP.
With ``hardware.tensor_parallel_size=T > 1`` the strategy's mesh is (data_parallel world/T, tensor_parallel T):
the model is first planned over the tensor dimension (moxin/tensor_parallel.py), then sharded by FSDP2 over the
data dimension (its parameters are then 2-D DTensors).

Under gradient accumulation `set_gradient_sync` decides, before each micro-batch's backward, which of FSDP2's
gradient collectives run (``hardware.parallel.gradient_sync``): by default HSDP's all-reduce across the replica
groups runs once per optimizer step, on the last micro-batch, not once per micro-batch.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from moxin.config import Float8Recipe, GradientSync, ParallelConfig, Recompute, ReduceDtype
from moxin.devices import to_device
from moxin.model import lora
from moxin.tensor_parallel import apply_tensor_parallel, tensor_parallel_mesh

FLOAT8_DIM_MULTIPLE = 16  # torch._scaled_mm needs both dimensions of a float8 product to be multiples of 16


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """The layers float8 converts: the blocks' linear layers (q/k/v/o, gate/up/down) whose dimensions the float8
    product can take. The loss head, embeddings and norms stay in the run's precision (the head's logits are the
    most range-sensitive product of the model, and torchtitan keeps it out too)."""
    return (fqn.startswith("layers.") and isinstance(module, nn.Linear)
            and module.in_features % FLOAT8_DIM_MULTIPLE == 0 and module.out_features % FLOAT8_DIM_MULTIPLE == 0)


def apply_float8(model: nn.Module, cfg: ParallelConfig, fsdp: bool) -> list[str]:
    """Swap the linear layers `float8_module_filter` picks for torchao's `Float8Linear` with the recipe
    ``cfg.float8`` (in place, before compile and FSDP2, as torchtitan's float8 converter does); returns their
    names. Float8Linear subclasses nn.Linear with the same parameters, so state dicts keep their keys. Under FSDP2
    the tensorwise recipe all-gathers the weights in float8, with the scales of all of them computed in one
    all-reduce after each optimizer step (`float8_optimizer_hook`)."""
    recipe = Float8Recipe(cfg.float8)
    if recipe == Float8Recipe.NONE:
        return []
    cfg.check_float8(gpu=torch.cuda.is_available(), lora=lora.has_lora(model))
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training  # optional: checked just above

    all_gather = fsdp and recipe.fsdp_float8_all_gather
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe.value), emulate=cfg.float8_emulate,
                                 enable_fsdp_float8_all_gather=all_gather)
    names = [n for n, m in model.named_modules() if float8_module_filter(m, n)]
    convert_to_float8_training(model, module_filter_fn=float8_module_filter, config=config)
    model._moxin_float8_precompute = all_gather
    return names


def float8_optimizer_hook(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """After every step of `optimizer`, and once before `model`'s first forward, compute the float8 scales of its
    FSDP2-sharded weights in one all-reduce (torchao's `precompute_float8_dynamic_scale_for_fsdp`), which the
    forwards' float8 all-gathers then use instead of one reduction per weight. Before the first forward too:
    without a precomputed scale torchao reduces a weight's amax over the FSDP2 mesh only, so under tensor
    parallelism each tensor rank would scale its own shard of the weight, not the whole weight as one process
    does. Nothing for a model `apply_float8` gave no float8 all-gather."""
    if not getattr(model, "_moxin_float8_precompute", False):
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp  # optional: apply_float8 checked it

    def first_forward(module, args):
        handle.remove()
        precompute_float8_dynamic_scale_for_fsdp(module)

    handle = model.register_forward_pre_hook(first_forward)
    optimizer.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))


def apply_activation_checkpointing(model: nn.Module, policy: str = Recompute.FULL) -> None:
    """Wrap each block (full) or one of its sub-layers (attention, mlp) so its activations are recomputed in the
    backward. The wrapper's state-dict hooks drop its prefix: checkpoints keep the plain parameter names."""
    policy = Recompute(policy)
    if policy == Recompute.NONE:
        return
    for i, block in enumerate(model.layers):
        if policy == Recompute.FULL:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
        elif policy == Recompute.MLP:
            block.feed_forward = checkpoint_wrapper(block.feed_forward, preserve_rng_state=False)
        else:
            block.attention = checkpoint_wrapper(block.attention, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    for block in model.layers:
        block.compile()  # in place: parameter names (and so checkpoints) stay the same


def apply_fsdp(model: nn.Module, mesh, param_dtype: str | None, reshard_after_forward: bool,
               reduce_dtype: str = ReduceDtype.FLOAT32) -> None:
    """`fully_shard` each block, then the root, over `mesh` (1-D: FSDP2; (replicate, shard): HSDP). Parameters are
    gathered in `param_dtype` (None: their own) and gradients reduced in `reduce_dtype`; with neither set, no
    mixed-precision policy (a float64 model then reduces in float64)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # optional: torch builds without distributed

    mp = None
    if param_dtype is not None or ReduceDtype(reduce_dtype) != ReduceDtype.FLOAT32:
        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype) if param_dtype is not None else None,
                                  reduce_dtype=getattr(torch, ReduceDtype(reduce_dtype).value))
    kw = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for i, block in enumerate(model.layers):
        # the last block's parameters are needed right away by the backward: no point resharding them
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(model.layers) - 1, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


def set_gradient_sync(model: nn.Module, cfg: ParallelConfig, last: bool) -> None:
    """Before a micro-batch's backward on an FSDP2 `model`: which gradient collectives it runs. `last`: it is the
    last micro-batch of its optimizer step, where every collective runs (the sums of the earlier ones included).
    Before it, by ``cfg.gradient_sync`` (`GradientSync`): auto keeps the reduce-scatter (the gradients stay
    sharded) and lets HSDP's all-reduce across replica groups wait (FSDP2 adds the micro-batches' reduce-scattered
    shards into a partial sum that the last one's all-reduce carries); step lets both wait (the unsharded gradients
    accumulate); micro_step runs both. Nothing for a model FSDP2 does not shard."""
    from torch.distributed.fsdp import FSDPModule  # optional: torch builds without distributed

    if not isinstance(model, FSDPModule):
        return
    sync = GradientSync(cfg.gradient_sync)
    model.set_requires_gradient_sync(last or not sync.defers_reduce_scatter)  # (both flags: set the all-reduce's after)
    model.set_requires_all_reduce(last or not sync.defers_all_reduce)


def hsdp_mesh(mesh, replicate: int, tp: int = 1):
    """The (replicate, shard) device mesh of HSDP over the ranks of `mesh`: consecutive ranks (one node's GPUs, when
    R is the node count) form a shard group, and rank i of each group is replicated across the R groups
    (torchtitan's dp_replicate before dp_shard). With tensor parallelism (tp > 1) the mesh is (replicate, shard,
    tensor_parallel), the tensor dimension innermost as in Lightning's (data_parallel, tensor_parallel) mesh, so
    the tensor groups and the data ranks are Lightning's. Made once per strategy mesh and kept on it (creating a
    mesh creates process groups, collectively), so the policy and a frozen reference share it and a later run in
    the same process (a warm-up, then the run) gets its own."""
    from torch.distributed.device_mesh import init_device_mesh

    shard = mesh.size() // (replicate * tp)
    shape, names = ((replicate, shard, tp), ("replicate", "shard", "tensor_parallel")) if tp > 1 else (
        (replicate, shard), ("replicate", "shard"))
    made = getattr(mesh, "_moxin_hsdp", None)
    if made is None or made.shape != shape:
        made = init_device_mesh(mesh.device_type, shape, mesh_dim_names=names)
        mesh._moxin_hsdp = made
    return made


def parallel_meshes(mesh, cfg: ParallelConfig):
    """(the tensor-parallel mesh or None, the mesh FSDP2 shards over) of the strategy's mesh: its data-parallel
    dimension, or HSDP's (replicate, shard) mesh over it; with both HSDP and tensor parallelism, the two come from
    one 3-D mesh (FSDP2 composes with TP over submeshes of one mesh)."""
    tp_mesh = tensor_parallel_mesh(mesh)
    dp_mesh = mesh["data_parallel"] if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names else mesh
    if cfg.replicate == 1:
        return tp_mesh, dp_mesh
    cfg.check_world(dp_mesh.size())
    if tp_mesh is None:
        return None, hsdp_mesh(mesh, cfg.replicate)
    made = hsdp_mesh(mesh, cfg.replicate, tp_mesh.size())
    return made["tensor_parallel"], made["replicate", "shard"]


def is_sharded(strategy) -> bool:
    """True when the trainer's strategy shards the model with FSDP2 (Lightning's ModelParallelStrategy or a
    subclass, as moxin's AsyncCheckpointStrategy): every forward is then collective and parameters are DTensor shards."""
    return strategy is not None and any(c.__name__ == "ModelParallelStrategy" for c in type(strategy).__mro__)


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the default process group's size; (0, 1) when no process group is set up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _group_size(group) -> int:
    """Ranks of `group` (None: the default group); 1 without a process group."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_values(values: list, device, op: str = "sum", group=None) -> list[float]:
    """A few numbers (Python numbers or 0-d tensors) reduced over all ranks (or those of process group `group`) in
    one float64 collective on `device` (the stage's device: NCCL needs the GPU, gloo the CPU); op is sum, max or
    min. Without a process group, or with one rank, the values come back as floats with no collective. Every
    rank must call it with the same number of values."""
    if _group_size(group) == 1 and not any(isinstance(v, torch.Tensor) and v.device.type != "cpu" for v in values):
        return [float(v) for v in values]  # the host's own numbers: no round trip through the device (a read)
    return all_reduce_tensor(values, device, op, group).tolist()


def all_reduce_tensor(values: list, device, op: str = "sum", group=None) -> torch.Tensor:
    """As `all_reduce_values`, but the (len(values),) float64 result stays on `device`: no host sync, so it can
    join other device numbers before the one `.tolist()` a step needs."""
    device = torch.device(device)

    def on_device(v):
        return isinstance(v, torch.Tensor) and v.device.type != "cpu"

    # the host's numbers in one copy that does not block (a blocking copy to a GPU waits for all queued work)
    host = torch.tensor([float(v) for v in values if not on_device(v)], dtype=torch.float64)
    host = to_device(host, device)
    if len(host) == len(values):
        t = host
    else:
        rest = iter(host.unbind(0))
        t = torch.stack([v.to(device=device, dtype=torch.float64).reshape(()) if on_device(v) else next(rest)
                         for v in values])
    if _group_size(group) > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op],
                        group=group)
    return t


def reshard(model: nn.Module) -> None:
    """Free the gathered parameters of an FSDP2 model after a forward that has no backward (a frozen reference).
    FSDP2 keeps the root module's (and our last block's) parameters gathered after the forward, expecting the
    backward to need them at once; a model that never runs a backward would hold them, and show plain tensors instead of its shards,
    until the next forward. No-op for a model that is not sharded."""
    for m in model.modules():  # the root and the last block keep theirs (see apply_fsdp)
        if hasattr(m, "reshard"):
            m.reshard()


@torch.no_grad()
def weights_checksum(model: nn.Module) -> float:
    """Sum of every parameter in float64: a cheap fingerprint that says whether two models hold the same weights
    (a hand-off loaded what the previous stage wrote). Under FSDP2 the parameters are Shard(0) DTensors: each rank
    sums its own shard and the sums are all-reduced, so this is collective (every rank must call it) and never
    gathers a full tensor. Tied parameters count once.

    After a forward without a backward (validation, samples) FSDP2 leaves the root and the last block gathered,
    and their parameters are then the gathered compute-dtype (bf16) copies: reshard first so the sum is over the
    fp32 shards, the weights the checkpoint and the export hold."""
    reshard(model)
    device = next(model.parameters()).device
    plain = torch.zeros((), dtype=torch.float64, device=device)
    sharded = torch.zeros((), dtype=torch.float64, device=device)
    group = None
    for p in model.parameters():
        if hasattr(p, "to_local"):  # DTensor
            shard_dims = [i for i, pl in enumerate(p.placements) if pl.is_shard()]
            if len(shard_dims) != 1 or any(not (pl.is_shard() or pl.is_replicate()) for pl in p.placements):
                p = p.full_tensor()  # a placement other than FSDP2's / HSDP's: the whole tensor, counted once
                plain += p.double().sum()
                continue
            # FSDP2: Shard(0) over the one dimension; HSDP: (Replicate, Shard(0)), summed within a shard group
            # (every replica group then holds the same total)
            group = p.device_mesh.get_group(shard_dims[0])
            sharded += p.to_local().double().sum()
        else:
            plain += p.double().sum()
    if group is not None:
        dist.all_reduce(sharded, group=group)
    return float(plain + sharded)


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh=None) -> nn.Module:
    """Apply, in order, float8 linear layers, tensor parallelism (when the mesh has a tensor_parallel dimension of
    size > 1), activation checkpointing, compile and (when a mesh is given) FSDP2 sharding (HSDP with
    cfg.replicate > 1)."""
    tp_mesh, dp_mesh = parallel_meshes(mesh, cfg) if mesh is not None else (None, None)
    apply_float8(model, cfg, fsdp=mesh is not None)
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh, float8_tensorwise=Float8Recipe(cfg.float8) == Float8Recipe.TENSORWISE)
    if tp_mesh is not None and cfg.compile and cfg.activation_checkpointing == Recompute.FULL:
        # a compiled block cannot hold the checkpoint of a tensor-parallel block (torch asserts on the DeviceMesh
        # the checkpoint saves with the DTensor residual): compile each block, then checkpoint it
        apply_compile(model)
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
    else:
        apply_activation_checkpointing(model, cfg.activation_checkpointing)
        if cfg.compile:
            apply_compile(model)
    if mesh is not None:
        apply_fsdp(model, dp_mesh, cfg.fsdp_param_dtype, cfg.reshard_after_forward, cfg.reduce_dtype)
    return model
