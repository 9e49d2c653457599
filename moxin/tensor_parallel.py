"""Tensor parallelism of the model core over the mesh's ``tensor_parallel`` dimension, torchtitan's Llama plan:
column-wise q/k/v and w1/w3, row-wise wo and w2, sequence-parallel norms (the residual stream split on the
sequence between blocks), row-wise embedding, column-wise output; attention runs on each rank's share of the
query and key/value heads. `moxin.distributed.parallelize` applies it first, before activation checkpointing,
compile and FSDP2 over the data dimension. Loss heads get the whole hidden states and output weight; rows of any
length and the rolling-cache decode work (padded inside the forward). docs/architecture.md, "Tensor parallelism".
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

__all__ = ["apply_tensor_parallel", "data_parallel_group", "data_rank_and_world", "gather_rows",
           "model_tensor_parallel_size", "row_share", "tensor_parallel_group", "tensor_parallel_mesh",
           "tensor_parallel_size"]


def tensor_parallel_mesh(mesh):
    """The mesh's ``tensor_parallel`` dimension, or None when it has none or its size is 1."""
    if mesh is None or not mesh.mesh_dim_names or "tensor_parallel" not in mesh.mesh_dim_names:
        return None
    tp = mesh["tensor_parallel"]
    return tp if tp.size() > 1 else None


def tensor_parallel_size(strategy) -> int:
    """The tensor-parallel group size of a Lightning strategy (1 without a ``tensor_parallel`` mesh dimension)."""
    mesh = getattr(strategy, "_device_mesh", None)
    tp = tensor_parallel_mesh(mesh)
    return 1 if tp is None else tp.size()


def tensor_parallel_group(strategy) -> tuple[int, int, dist.ProcessGroup | None]:
    """(this rank's index in its tensor-parallel group, T, the group's process group) of a Lightning strategy;
    (0, 1, None) without tensor parallelism."""
    tp = tensor_parallel_mesh(getattr(strategy, "_device_mesh", None))
    return (0, 1, None) if tp is None else (tp.get_local_rank(), tp.size(), tp.get_group())


def data_parallel_group(strategy) -> dist.ProcessGroup | None:
    """The process group of this rank's data-parallel peers under tensor parallelism: the mesh's
    ``data_parallel`` dimension (all of HSDP's replicate x shard ranks), one rank of each tensor group. None (the
    default group, the whole world) without tensor parallelism, where every rank is a data-parallel rank."""
    mesh = getattr(strategy, "_device_mesh", None)
    if tensor_parallel_mesh(mesh) is None:
        return None
    return mesh["data_parallel"].get_group()


def row_share(n: int, rank: int, size: int) -> tuple[int, int]:
    """[first, end) of rank `rank`'s contiguous share when `size` ranks split `n` rows: shares differ by one row
    at most, the first n % size ranks taking the larger (torch.tensor_split's split); empty when n < size."""
    q, m = divmod(n, size)
    first = rank * q + min(rank, m)
    return first, first + q + (rank < m)


def gather_rows(rows: list[int], columns: dict[str, list], n: int, group, sums: dict | None = None
                ) -> tuple[dict[str, list], dict]:
    """Each rank's per-row values (`columns`: name -> one value for each of its `rows`, host objects) gathered over
    `group` in one collective (all_gather_object) into lists of all `n` rows in row order, and the numbers of
    `sums` summed over the group. Every row must come from exactly one rank."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (list(rows), columns, sums or {}), group=group)
    out = {k: [None] * n for k in columns}
    got = [0] * n
    for part_rows, part_cols, _ in parts:
        for k, vals in part_cols.items():
            for i, v in zip(part_rows, vals, strict=True):
                out[k][i] = v
        for i in part_rows:
            got[i] += 1
    if any(c != 1 for c in got):
        raise RuntimeError(f"gather_rows: rows {[i for i, c in enumerate(got) if c != 1]} came from "
                           f"{sorted(set(c for c in got if c != 1))} ranks, not exactly one")
    total = {k: sum(p[2][k] for p in parts) for k in (sums or {})}
    return out, total


def model_tensor_parallel_size(model: nn.Module) -> int:
    """T of a model `apply_tensor_parallel` planned (read from its parameters' device mesh); 1 for any other."""
    for p in model.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            tp = tensor_parallel_mesh(mesh)
            return 1 if tp is None else tp.size()
    return 1


def data_rank_and_world(model: nn.Module) -> tuple[int, int, int]:
    """(data-parallel rank, data-parallel ranks, T) for work split over ranks that runs `model`'s forwards
    (evaluation, held-out rewards): a tensor-parallel group's T ranks, consecutive in the mesh (rank = data rank x
    T + tensor rank, Lightning's layout and ours under HSDP), take the same rows, since every forward is collective
    over the group and the ranks must feed it alike. (rank, world, 1) without tensor parallelism."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    tp = model_tensor_parallel_size(model)
    return rank // tp, world // tp, tp


def _styles(block: nn.Module, float8_tensorwise: bool) -> dict:
    """name -> the styles (column-wise, row-wise, input preparation) of each of `block`'s projections and of its
    attention / feed_forward inputs. With tensorwise float8, torchao's float8 styles where the projections are
    torchao Float8Linear layers: the input is cast to float8 before the sequence all-gather (half the bytes of
    bf16) and q/k/v (w1/w3) share that one gather; the gradients of the outputs are cast in the backward. A
    projection `float8_module_filter` left in high precision, and a sub-layer with one, keep the plain styles."""
    plain = {"attention": PrepareModuleInput, "feed_forward": PrepareModuleInput}
    users = {"attention": ("wq", "wk", "wv", "wo"), "feed_forward": ("w1", "w3", "w2")}
    if not float8_tensorwise:
        return {**plain, **{f"{m}.{w}": (RowwiseParallel if w in ("wo", "w2") else ColwiseParallel)
                            for m, ws in users.items() for w in ws}}
    # optional: float8 was asked for, and `moxin.config.ParallelConfig.check_float8` found torchao
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                       PrepareFloat8ModuleInput)

    out = {}
    for m, ws in users.items():
        f8 = {w: isinstance(block.get_submodule(f"{m}.{w}"), Float8Linear) for w in ws}
        for w in ws:
            row = w in ("wo", "w2")
            out[f"{m}.{w}"] = ((Float8RowwiseParallel if row else Float8ColwiseParallel) if f8[w] else
                               (RowwiseParallel if row else ColwiseParallel))
        out[m] = PrepareFloat8ModuleInput if all(f8.values()) else PrepareModuleInput
    return out


def _block_plan(block: nn.Module, float8_tensorwise: bool = False) -> dict:
    """The plan of one block (`_styles` picks plain or float8 styles)."""
    st = _styles(block, float8_tensorwise)
    # attention and feed_forward take the sequence-sharded normed input and gather it (their first argument;
    # attention's others, cos / sin / mask / cache / layer index, pass through as they are)
    gather = dict(desired_input_layouts=(Replicate(),), use_local_output=True)
    return {
        "attention_norm": SequenceParallel(),
        "attention": st["attention"](input_layouts=(Shard(1), None, None, None, None, None),
                                     desired_input_layouts=(Replicate(), None, None, None, None, None),
                                     use_local_output=True),
        "attention.wq": st["attention.wq"](),
        "attention.wk": st["attention.wk"](),
        "attention.wv": st["attention.wv"](),
        "attention.wo": st["attention.wo"](output_layouts=Shard(1), use_local_output=False),
        "ffn_norm": SequenceParallel(),
        "feed_forward": st["feed_forward"](input_layouts=(Shard(1),), **gather),
        "feed_forward.w1": st["feed_forward.w1"](),
        "feed_forward.w3": st["feed_forward.w3"](),
        "feed_forward.w2": st["feed_forward.w2"](output_layouts=Shard(1), use_local_output=False),
    }


def _whole(t):
    """A DTensor gathered into the plain tensor every rank holds (autograd carries each rank's share back)."""
    if isinstance(t, DTensor):
        return t.redistribute(placements=[Replicate()] * t.device_mesh.ndim).to_local()
    return t


def _local_cache(cache, n_kv_heads: int) -> None:
    """Give a fresh RollingKVCache this rank's key/value heads (generate builds it from the whole model's config)."""
    if cache.k[0].shape[1] == n_kv_heads:
        return
    if bool((cache.pos >= 0).any()):
        raise ValueError(f"this RollingKVCache already holds {cache.k[0].shape[1]} key/value heads a layer; under "
                         f"tensor parallelism a rank keeps {n_kv_heads}: start generation with a new cache")
    shape = (cache.k[0].shape[0], n_kv_heads, *cache.k[0].shape[2:])
    cache.k = [t.new_zeros(shape) for t in cache.k]
    cache.v = [t.new_zeros(shape) for t in cache.v]


def _pre_forward(tp: int):
    """Transformer.forward under tensor parallelism: rows padded to a multiple of tp (sequence parallelism splits
    them evenly), the loss head given whole tensors, a generation cache with this rank's heads."""

    def pre_hook(model, args, kwargs):
        kwargs = dict(kwargs)
        tokens = args[0] if args else kwargs.pop("tokens")
        positions = args[1] if len(args) > 1 else kwargs.pop("positions", None)
        cache = kwargs.get("cache")
        if any(getattr(m, "fused_weight", None) is not None for m in model.modules()):
            raise ValueError("fuse_projections (an inference copy's fused q/k/v and gate/up products) is not "
                             "supported under tensor parallelism: keep the projections separate")
        if cache is not None:
            _local_cache(cache, model.layers[0].attention.n_kv_heads)
        B, T = tokens.shape
        pad = (-T) % tp
        if pad:
            # padding the ranks never look at: with a cache, positions -1 (neither stored nor attended to); in a
            # training forward, a document of its own after the rows' end (the document mask keeps it apart, and
            # its outputs are cut off below, so it gets no gradient)
            if positions is None:
                positions = torch.arange(T, device=tokens.device).expand(B, T)
            fill = (torch.full((B, pad), -1, dtype=positions.dtype, device=positions.device) if cache is not None
                    else torch.arange(pad, dtype=positions.dtype, device=positions.device).expand(B, pad))
            tokens = F.pad(tokens, (0, pad))
            positions = torch.cat([positions, fill], dim=1)
            if kwargs.get("doc_bounds") is not None:
                kwargs["doc_bounds"] = None  # they describe the unpadded rows
        head = kwargs.get("head")
        if head is not None:  # the loss heads take the whole hidden states and output weight, of the real tokens
            kwargs["head"] = lambda h, w: head(_whole(h)[:, :T], _whole(w))
        model._tp_rows = (T, head is not None)
        return (tokens, positions), kwargs

    return pre_hook


def _post_forward(model, args, kwargs, out):
    """Logits or final hidden states (return_hidden) whole, and of the real tokens only."""
    T, headed = model._tp_rows
    if headed:
        return out
    return _whole(out)[:, :T]


def apply_tensor_parallel(model: nn.Module, tp_mesh, float8_tensorwise: bool = False) -> None:
    """Shard `model` (a `Transformer`) over `tp_mesh` with the plan of this module's docstring. Attention modules
    are set to their local head counts (the views of the projections' outputs use them). Shapes must divide:
    `moxin.config.ParallelConfig.check_tensor_parallel` refuses those that do not, before any work.
    float8_tensorwise: the blocks' projections are torchao Float8Linear layers of the tensorwise recipe
    (`moxin.distributed.apply_float8`, run first): plan them with torchao's float8 styles (`_styles`). The rowwise
    recipe takes the plain styles (torchao's float8 styles assume one scale per tensor; torchtitan does the same):
    its layers cast their DTensor inputs themselves, and the sequence all-gather stays in high precision."""
    tp = tp_mesh.size()
    # parallelize_module makes new Parameters, which want gradients: a frozen model (a DPO / KL reference) stays so
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    tied = model.output.weight is model.tok_embeddings.weight
    if tied:  # the shared weight stays whole on the tensor dimension; the embedding's output is split onto T
        top = {"tok_embeddings": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=Shard(1),
                                                     use_local_output=False),
               "output": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                            use_local_output=True)}
    else:
        top = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                 use_local_output=False),
               "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())}
    top["norm"] = SequenceParallel()
    parallelize_module(model, tp_mesh, top)
    for block in model.layers:
        parallelize_module(block, tp_mesh, _block_plan(block, float8_tensorwise))
        attn = block.attention
        attn.n_heads, attn.n_kv_heads = attn.n_heads // tp, attn.n_kv_heads // tp
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    model.register_forward_pre_hook(_pre_forward(tp), with_kwargs=True)
    model.register_forward_hook(_post_forward, with_kwargs=True)
