"""LoRA and QLoRA adapters over the model core (Hu et al. 2021, arXiv 2106.09685; Dettmers et al. 2023, 2305.14314).

    y = x W^T + (alpha / r) * dropout(x) A^T B^T       W frozen (bf16, or NF4 for QLoRA), A (r, in), B (out, r)

Details: docs/modules.md, "model/lora.py".
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moxin.config import InitFromError, LoRAConfig
from moxin.config.lora import TARGETS

__all__ = ["LoRALinear", "apply_lora", "adapters_disabled", "has_lora", "lora_modules",
           "adapter_state_dict", "merged_items", "merged_checksum", "save_peft_adapter", "merge_peft_adapter",
           "is_peft_adapter", "merge_adapters", "adapters_by_weight", "plain_name", "dequantize", "nf4_available",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
NF4_BLOCK = 64  # weights per absmax scale (QLoRA's and torchao's default)


# ---- NF4 (torchao) --------------------------------------------------------------------------------------------
def _nf4_module():
    """torchao's NF4 module (its path moved between releases), or None when torchao is not installed."""
    import importlib

    for name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def nf4_available() -> bool:
    return _nf4_module() is not None


def _require_nf4():
    mod = _nf4_module()
    if mod is None:
        raise ImportError("stage.lora.quantize=nf4 needs torchao's NF4 tensor: pip install 'moxin[lora]' "
                          "(or pip install torchao)")
    return mod


def _is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def to_nf4(w: torch.Tensor) -> torch.Tensor:
    """`w` in NF4: blocks of 64 weights share an absmax scale, the scales are quantised again in blocks (double
    quantisation). torchao wants the number of scales divisible by the scale block: the largest power of two up to
    its default 256 that divides it (256 for every Moxin-7B projection)."""
    mod = _require_nf4()
    n = w.numel()
    if n % NF4_BLOCK:
        raise ValueError(f"NF4 needs a weight count divisible by {NF4_BLOCK}; this projection has {tuple(w.shape)}")
    scales = n // NF4_BLOCK
    sb = 256
    while scales % sb:
        sb //= 2
    return mod.to_nf4(w.to(torch.bfloat16), NF4_BLOCK, sb)


def dequantize(w: torch.Tensor) -> torch.Tensor:
    """A frozen base weight as a plain tensor (an NF4 weight dequantised to bf16)."""
    return w.get_original_weight() if _is_nf4(w) else w


def _nf4_parts(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plain tensors an NF4 weight is made of: packed codes, quantised scales, their factors and mean, table."""
    return w.quantized_data, w.quantized_scalers, w.quantization_factor, w.scaler_mean, w.nf4


def _nf4_weight(data, scalers, factor, mean, table, out_features: int, dtype: torch.dtype) -> torch.Tensor:
    """torchao's `NF4Tensor.get_original_weight` (bit for bit) from the plain parts, in `dtype`: each byte holds two
    4-bit codes looked up in the 16-value table; each block of 64 weights shares one scale, itself stored as int8
    over a per-256-scales factor plus the mean."""
    scales = (scalers.view(factor.numel(), -1) / factor.unsqueeze(-1)).flatten().to(table.dtype) + mean
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], -1)  # byte b -> (table[b>>4], table[b&15])
    w = F.embedding(data.int(), pairs).view(scales.numel(), -1) * scales.unsqueeze(-1)
    return w.view(out_features, -1).to(dtype)


# The NF4 product as an operator the compiler cannot see into: it saves the NF4 parts (not the dequantised weight)
# for the backward and dequantises again there. torchao's `linear_nf4` does the same in eager mode, but traced by
# torch.compile the partitioner keeps each block's dequantised bf16 weights alive from the forward to the backward
# (without recompute: the whole base in bf16 again; docs/performance.md, LoRA section).
@torch.library.custom_op("moxin::nf4_linear", mutates_args=())
def _nf4_linear(x: torch.Tensor, data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor,
                mean: torch.Tensor, table: torch.Tensor, out_features: int) -> torch.Tensor:
    return F.linear(x, _nf4_weight(data, scalers, factor, mean, table, out_features, x.dtype))


@torch.library.custom_op("moxin::nf4_linear_grad", mutates_args=())
def _nf4_linear_grad(grad: torch.Tensor, data: torch.Tensor, scalers: torch.Tensor, factor: torch.Tensor,
                     mean: torch.Tensor, table: torch.Tensor, out_features: int) -> torch.Tensor:
    return grad @ _nf4_weight(data, scalers, factor, mean, table, out_features, grad.dtype)


@_nf4_linear.register_fake
def _(x, data, scalers, factor, mean, table, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@_nf4_linear_grad.register_fake
def _(grad, data, scalers, factor, mean, table, out_features):
    return grad.new_empty((*grad.shape[:-1], 2 * data.numel() // out_features))


def _nf4_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[1:6])
    ctx.out_features = inputs[6]


def _nf4_backward(ctx, grad):
    return _nf4_linear_grad(grad, *ctx.saved_tensors, ctx.out_features), None, None, None, None, None, None


_nf4_linear.register_autograd(_nf4_backward, setup_context=_nf4_setup)


def linear_nf4(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x W^T for an NF4 weight `w`, W dequantised to x's dtype inside the product and freed after it (also in the
    backward, and under torch.compile)."""
    return _nf4_linear(x, *_nf4_parts(w), w.shape[0])


# ---- the adapted projection -----------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen projection ``weight`` (out, in) with adapters ``lora_A`` (r, in) and ``lora_B`` (out, r), or none
    (r = 0: a frozen, possibly NF4, projection that is not a target). Same parameter name for the base as the
    `Linear` it replaces."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.rank = rank
        self.scaling = alpha / rank if rank else 0.0
        self.enabled = True
        if rank:
            dev = weight.device
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev, dtype=torch.float32))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=torch.float32))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's init: B = 0, so the start is the base
        else:
            self.lora_A = self.lora_B = None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def extra_repr(self) -> str:
        kind = "nf4" if _is_nf4(self.weight) else str(self.weight.dtype).removeprefix("torch.")
        return f"in={self.in_features}, out={self.out_features}, base={kind}, rank={self.rank}, scaling={self.scaling}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the product's dtype: dequantise / cast the base once, to it
            x = x.to(torch.get_autocast_dtype(dev))
        if _is_nf4(w):
            out = linear_nf4(x, w)
        else:
            out = F.linear(x, w if w.dtype == x.dtype or torch.is_autocast_enabled(dev) else w.to(x.dtype))
        if self.lora_A is None or not self.enabled:
            return out
        a, b = self.lora_A, self.lora_B
        if not torch.is_autocast_enabled(dev) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        return out + F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    @torch.no_grad()
    def delta(self) -> torch.Tensor | None:
        """(alpha / r) B A in fp32 (full tensors: gathered under FSDP2, a collective), or None without adapters."""
        if self.lora_A is None:
            return None
        a, b = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (self.lora_A, self.lora_B))
        return (b.float() @ a.float()) * self.scaling


def lora_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def has_lora(model: nn.Module | None) -> bool:
    return model is not None and any(m.lora_A is not None for m in lora_modules(model))


@torch.no_grad()
def apply_lora(model: nn.Module, cfg: LoRAConfig, device_type: str | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """Freeze `model` (a `Transformer`, before any parallelism) and give the target projections of every block
    adapters, in place; returns the model. The base goes to ``cfg.base_torch_dtype(device_type)`` (QLoRA: every
    block projection to NF4), one projection at a time, so the peak is the model as built plus one projection.
    `device`: where the adapted model goes (None: where it is). Each projection is moved there before it is cast
    or quantised, so a model built on the host reaches the GPU without the GPU ever holding its full base in the
    master dtype (QLoRA: only NF4 and one projection in bf16 at a time)."""
    if not cfg.enabled:
        return model
    if device is not None:
        device = torch.device(device)
        device_type = device.type
    device_type = device_type or next(model.parameters()).device.type
    if cfg.quantize:
        _require_nf4()
    model.requires_grad_(False)
    dtype = cfg.base_torch_dtype(device_type)
    for block in model.layers:
        for target, (sub, attr, _) in TARGETS.items():
            parent = getattr(block, sub)
            lin = getattr(parent, attr)
            if isinstance(lin, LoRALinear):
                raise ValueError("apply_lora: the model already has adapters")
            rank = cfg.rank if target in cfg.targets else 0
            if not rank and not cfg.quantize:
                continue  # not a target, not quantised: the plain frozen Linear stays
            w = lin.weight.detach()
            w = w.to(device=device or w.device, dtype=torch.bfloat16 if cfg.quantize else dtype or w.dtype)
            w = to_nf4(w) if cfg.quantize else w
            setattr(parent, attr, LoRALinear(w, rank, cfg.alpha, cfg.dropout))
            del lin
        if hasattr(block.attention, "fused_weight"):
            block.attention.fused_weight = block.feed_forward.fused_weight = None
    if dtype is not None:  # the other frozen weights (embeddings, norms, output layer) in the base dtype too
        for mod in (model.tok_embeddings, model.norm, model.output, *[m for b in model.layers
                                                                     for m in (b.attention_norm, b.ffn_norm)]):
            for p in mod.parameters(recurse=False):
                p.data = p.data.to(dtype)
        for m in lora_modules(model):
            if not _is_nf4(m.weight) and m.weight.dtype != dtype:
                m.weight.data = m.weight.data.to(dtype)
        for name, p in model.named_parameters():
            if "lora_" not in name and not _is_nf4(p) and p.dtype != dtype and p.is_floating_point():
                p.data = p.data.to(dtype)  # a projection left plain (not a target)
    if device is not None:  # the rest (embeddings, norms, output layer, plain projections); adapters are there
        for mod in model.modules():
            if not isinstance(mod, LoRALinear):
                mod._apply(lambda t: t.to(device), recurse=False)
    model.lora_config = cfg  # read by the export (adapter_config.json) and the checkpoint
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """The base alone (the starting weights) inside the block: DPO's reference, GRPO's KL reference."""
    mods = lora_modules(model)
    before = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, e in zip(mods, before):
            m.enabled = e


def adapter_state_dict(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapters' tensors under their moxin names (``layers.0.attention.wq.lora_A``), as stored."""
    return {prefix + plain_name(n): p for n, p in model.named_parameters() if n.endswith((".lora_A", ".lora_B"))}


def plain_name(name: str) -> str:
    """A parameter name without activation checkpointing's or compile's wrapper prefixes."""
    for junk in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name


@torch.no_grad()
def merged_items(model: nn.Module, dtype: torch.dtype | None = torch.float32):
    """(moxin name, full tensor) of every base weight with the adapters merged in: W + (alpha / r) B A computed in
    fp32 from the stored base (an NF4 base dequantised), in `dtype` (None: the stored base's dtype). Under FSDP2
    every rank must consume it (each tensor is gathered: a collective). Adapter tensors themselves are not yielded."""
    owners = {}
    for mname, m in model.named_modules():
        if isinstance(m, LoRALinear):
            owners[plain_name(mname) + ".weight"] = m
    for name, t in model.state_dict().items():
        name = plain_name(name)
        if name.endswith((".lora_A", ".lora_B")):
            continue
        m = owners.get(name)
        if m is not None:
            w = m.weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w
            w = dequantize(w)
            d = m.delta()
            out = w.float() + d if d is not None else w
            yield name, out.to(dtype or w.dtype)
        else:
            full = t.full_tensor() if hasattr(t, "full_tensor") else t
            yield name, full.to(dtype) if dtype is not None and full.is_floating_point() else full


@torch.no_grad()
def merged_checksum(model: nn.Module) -> float:
    """`moxin.distributed.weights_checksum` of the merged model: the sum the ``hf/`` export's weights give when
    the next stage loads them (collective under FSDP2). Tied parameters count once, as there."""
    total = 0.0
    seen = set()
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    for name, t in merged_items(model):
        if tied and name == "output.weight":
            continue
        if name in seen:
            continue
        seen.add(name)
        total += float(t.double().sum())
    return total


# ---- PEFT's format --------------------------------------------------------------------------------------------
def _peft_key(moxin_name: str) -> str:
    """``layers.3.attention.wq.lora_A`` -> ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``."""
    from moxin.model.hf import moxin_to_hf_name

    base, _, which = moxin_name.rpartition(".")
    hf = moxin_to_hf_name(base + ".weight").removesuffix(".weight")
    return f"base_model.model.{hf}.{which}.weight"


def peft_config(cfg: LoRAConfig, base_model: str | None) -> dict:
    """adapter_config.json of PEFT's LoRA for these adapters (PEFT fills every key it needs from its defaults)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "bias": "none",
        "target_modules": sorted(TARGETS[t][2] for t in cfg.targets), "fan_in_fan_out": False,
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


@torch.no_grad()
def save_peft_adapter(model: nn.Module, path: str | os.PathLike, base_model: str | None = None, *,
                      is_global_zero: bool = True) -> Path | None:
    """Write the adapters as a PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``) that
    ``PeftModel.from_pretrained(MistralForCausalLM, path)`` and vLLM's LoRA serving load. `base_model`: the folder
    the adapters go on (recorded as ``base_model_name_or_path``). Collective under FSDP2 (gathers the adapters);
    rank zero writes, into a temporary folder renamed into place."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from moxin.model.hf import DIR_MODE, FILE_MODE

    cfg: LoRAConfig = model.lora_config
    tensors = {}
    for name, p in adapter_state_dict(model).items():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        tensors[_peft_key(plain_name(name))] = full.detach().float().cpu().contiguous()
    if not is_global_zero:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(cfg, base_model), indent=2) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, FILE_MODE)
        os.chmod(tmp, DIR_MODE)
        if path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_peft_adapter(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


@torch.no_grad()
def merge_peft_adapter(weights: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Merge the PEFT LoRA adapter in folder `path` into `weights` (moxin names, the base's tensors), in place and
    returned: W += (lora_alpha / r) B A for every adapted projection (in fp32, back to W's dtype). Refuses what
    it cannot merge exactly (DoRA, rsLoRA, per-module ranks, biases, modules_to_save) with the key named."""
    import re

    from safetensors.torch import load_file

    from moxin.model.hf import hf_to_moxin_name

    p = Path(path)
    cfg_file = p / ADAPTER_CONFIG
    conf = json.loads(cfg_file.read_text())
    if conf.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_file}: peft_type={conf.get('peft_type')!r}; moxin merges LoRA adapters only")
    for key, ok in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False)):
        if bool(conf.get(key, False)) != ok:
            raise ValueError(f"{cfg_file}: {key}={conf.get(key)!r} is not supported (plain LoRA only)")
    if conf.get("rank_pattern") or conf.get("alpha_pattern") or conf.get("modules_to_save"):
        raise ValueError(f"{cfg_file}: rank_pattern / alpha_pattern / modules_to_save are not supported")
    if conf.get("bias", "none") != "none":
        raise ValueError(f"{cfg_file}: bias={conf.get('bias')!r}; moxin's projections have no bias")
    scaling = float(conf["lora_alpha"]) / int(conf["r"])
    files = [p / ADAPTER_WEIGHTS]
    if not files[0].is_file():
        raise InitFromError(f"init_from={p}: {ADAPTER_WEIGHTS} not found next to {ADAPTER_CONFIG} (moxin reads "
                            "safetensors only)")
    tensors = load_file(str(files[0]))
    rx = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.default)?\.weight$")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = rx.match(k)
        ours = hf_to_moxin_name(m.group(1) + ".weight") if m else None
        if ours is None or ours not in weights:
            raise ValueError(f"{p / ADAPTER_WEIGHTS}: tensor {k!r} has no counterpart in the base model")
        pairs.setdefault(ours, {})[m.group(2)] = v
    return merge_adapters(weights, pairs, scaling, str(p / ADAPTER_WEIGHTS))


@torch.no_grad()
def merge_adapters(weights: dict[str, torch.Tensor], pairs: dict[str, dict[str, torch.Tensor]], scaling: float,
                   source: str) -> dict[str, torch.Tensor]:
    """W += scaling * B A for every ``{weight name: {"lora_A": A, "lora_B": B}}`` (fp32, back to W's dtype), in
    place and returned; `source` names the adapters in errors."""
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{source}: {name} has {sorted(ab)} but needs lora_A and lora_B")
        if name not in weights:
            raise ValueError(f"{source}: an adapter for {name}, which the base model does not have")
        w = weights[name]
        delta = ab["lora_B"].float() @ ab["lora_A"].float()
        if delta.shape != w.shape:
            raise ValueError(f"{source}: the adapter of {name} gives {tuple(delta.shape)}, the base weight is "
                             f"{tuple(w.shape)}: the adapter belongs to another model")
        weights[name] = (w.float() + scaling * delta).to(w.dtype)
    return weights


def adapters_by_weight(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """moxin-named adapter tensors (``layers.0.attention.wq.lora_A``) grouped by their base weight's name."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        base, _, which = plain_name(k).rpartition(".")
        if which in ("lora_A", "lora_B"):
            out.setdefault(base + ".weight", {})[which] = v
    return out
