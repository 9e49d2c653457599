"""Hugging Face `MistralForCausalLM` checkpoints <-> moxin `Transformer`.

    model = load_hf("path/to/Moxin-7B")           # config.json + model.safetensors[.index.json]
    save_hf(model, "out/dir", max_shard_bytes=5 * 1024**3)

Only safetensors are read or written (no pickles, no ``trust_remote_code``). Loading goes shard by shard
through `safe_open`, copying each tensor straight into the model's parameter, so at most one tensor is held
twice at any moment. Our RoPE uses HF's rotate-half layout, so q/k weights map one-to-one with no permutation.

Name map (HF -> moxin):

    model.embed_tokens.weight                        -> tok_embeddings.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight -> layers.{i}.attention.{wq,wk,wv,wo}.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight  -> layers.{i}.feed_forward.{w1,w3,w2}.weight
    model.layers.{i}.input_layernorm.weight          -> layers.{i}.attention_norm.weight
    model.layers.{i}.post_attention_layernorm.weight -> layers.{i}.ffn_norm.weight
    model.norm.weight                                -> norm.weight
    lm_head.weight                                   -> output.weight
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moxin.config import ModelConfig
from moxin.model.transformer import Transformer

SUPPORTED_ARCHITECTURES = ("MistralForCausalLM",)
SUPPORTED_MODEL_TYPES = ("mistral",)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_LAYER_MAP = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def hf_to_moxin_name(name: str) -> str | None:
    """HF parameter name -> moxin name, or None when it has no counterpart."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_MAP:
        return f"layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.weight"
    return None


def moxin_to_hf_name(name: str) -> str:
    for hf, ours in _TOP_MAP.items():
        if name == ours:
            return hf
    m = re.match(r"^layers\.(\d+)\.(.+)\.weight$", name)
    if m:
        for hf, ours in _LAYER_MAP.items():
            if ours == m.group(2):
                return f"model.layers.{m.group(1)}.{hf}.weight"
    raise KeyError(f"moxin parameter {name!r} has no Hugging Face Mistral counterpart")


# ---- configs -------------------------------------------------------------------------------------------------
def hf_to_moxin_config(hf: dict, *, source: str = "config.json") -> ModelConfig:
    """A HF Mistral config dict -> ModelConfig. Refuses other architectures / model types."""
    archs = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or (archs and any(a not in SUPPORTED_ARCHITECTURES for a in archs)):
        raise ValueError(f"{source}: unsupported model (model_type={model_type!r}, architectures={archs}); "
                         f"moxin reads only {list(SUPPORTED_ARCHITECTURES)} with model_type 'mistral'")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (moxin's MLP is SwiGLU with silu)")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = hf.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default" or hf.get("rope_scaling"):
            raise ValueError(f"{source}: RoPE scaling ({rope or hf.get('rope_scaling')}) is not supported")
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or dim // n_heads),
            hidden_dim=int(hf["intermediate_size"]),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            sliding_window=hf.get("sliding_window"),
            max_seq_len=int(hf.get("max_position_embeddings", 32768)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing required field {e.args[0]!r}") from None


def moxin_to_hf_config(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """ModelConfig -> a HF MistralForCausalLM config dict (readable by transformers 4.x and 5.x)."""
    out = {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }
    if dtype is not None:
        out["torch_dtype"] = str(dtype).removeprefix("torch.")
    return out


# ---- loading -------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> list[str]:
    if (path / INDEX_FILE).exists():
        index = json.loads((path / INDEX_FILE).read_text())
        try:
            return sorted(set(index["weight_map"].values()))
        except KeyError:
            raise ValueError(f"{path / INDEX_FILE}: no 'weight_map'") from None
    if (path / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if bins:
        raise ValueError(f"{path}: only pickle weights ({', '.join(bins[:3])}) found; moxin reads safetensors only. "
                         "Convert first, e.g. `MistralForCausalLM.from_pretrained(dir).save_pretrained(out, "
                         "safe_serialization=True)` in a trusted environment")
    raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} found")


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            strict: bool = True, **config_overrides) -> Transformer:
    """Read a HF MistralForCausalLM directory into a moxin `Transformer` (eval mode not set; caller decides).

    dtype: parameter dtype (None: float32, whatever the stored dtype; tensors are cast on copy).
    device: where the parameters live. strict: fail on missing or unexpected tensors (non-strict leaves missing
    ones at their fresh initial values). config_overrides: ModelConfig fields to change (e.g. attn_backend)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: is {path} a Hugging Face model directory?")
    cfg = hf_to_moxin_config(json.loads(cfg_file.read_text()), source=str(cfg_file))
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    files = _weight_files(path)

    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device)
    if dtype is not None:
        model = model.to(dtype)
    if cfg.tie_embeddings:  # re-tie: moving off the meta device may have split the shared parameter
        model.output.weight = model.tok_embeddings.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for fname in files:
            fpath = path / fname
            if not fpath.exists():
                raise FileNotFoundError(f"{fpath} listed in {INDEX_FILE} does not exist")
            with safe_open(str(fpath), framework="pt", device="cpu") as f:
                for hf_name in f.keys():
                    ours = hf_to_moxin_name(hf_name)
                    if ours is None or ours not in params:
                        if hf_name.endswith("rotary_emb.inv_freq"):
                            continue  # a buffer, recomputed from rope_theta
                        unexpected.append(f"{hf_name} (in {fname})")
                        continue
                    if cfg.tie_embeddings and ours == "output.weight":
                        continue  # tied to tok_embeddings; HF may still store it
                    p = params[ours]
                    shape = tuple(f.get_slice(hf_name).get_shape())
                    if shape != tuple(p.shape):
                        raise ValueError(f"{fpath}: tensor {hf_name!r} (moxin {ours!r}) has shape {shape}, "
                                         f"expected {tuple(p.shape)} from config.json")
                    p.copy_(f.get_tensor(hf_name))
                    loaded.add(ours)
    expected = {n for n in params if not (cfg.tie_embeddings and n == "output.weight")}
    missing = sorted(expected - loaded, key=_natural)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append("missing tensors: " + ", ".join(f"{moxin_to_hf_name(m)} (moxin {m})" for m in missing))
        if unexpected:
            parts.append("unexpected tensors: " + ", ".join(unexpected))
        raise ValueError(f"{path}: checkpoint does not match config.json; " + "; ".join(parts))
    if missing:  # non-strict: leave them at their initial values, not uninitialised memory
        fresh = Transformer(cfg)
        with torch.no_grad():
            for m in missing:
                params[m].copy_(dict(fresh.named_parameters())[m])
    return model


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---- saving --------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: modes of written files and folders: what open()/mkdir() would give under the process umask (temporary files
#: from mkstemp/mkdtemp and safetensors are private otherwise)
FILE_MODE = 0o666 & ~_umask()
DIR_MODE = 0o777 & ~_umask()


def save_hf(model: Transformer, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3,
            dtype: torch.dtype | None = None, tokenizer_files: list[str | os.PathLike] | None = None) -> Path:
    """Write `model` as a HF MistralForCausalLM directory: config.json + safetensors (sharded with
    model.safetensors.index.json when the weights exceed max_shard_bytes). Written to a temporary directory
    next to `path`, then renamed into place; an existing `path` is replaced. tokenizer_files are copied in."""
    tensors = sorted(model.state_dict().items(), key=lambda kv: _natural(moxin_to_hf_name(kv[0])))
    return write_hf(tensors, model.cfg, path, max_shard_bytes=max_shard_bytes, dtype=dtype,
                    tokenizer_files=tokenizer_files)


def write_hf(tensors, cfg: ModelConfig, path: str | os.PathLike, *, is_global_zero: bool = True,
             max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None,
             tokenizer_files: list[str | os.PathLike] | None = None) -> Path | None:
    """Write (moxin name, tensor) pairs as a HF MistralForCausalLM directory, shard file by shard file: at most
    one shard of tensors is held, so an iterator that gathers FSDP shards one parameter at a time exports a
    model larger than host memory. Everything goes into a temporary directory next to `path` that is renamed
    into place at the end (an existing `path` is replaced; a failure leaves `path` as it was).

    The iterator is consumed on every rank (it may run collectives: ``DTensor.full_tensor()``); only the rank
    with ``is_global_zero`` writes, the others get None."""
    path = Path(path)
    tmp = None
    if is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        files: list[tuple[str, list[str]]] = []
        shard: dict[str, torch.Tensor] = {}
        size = total = 0
        out_dtype = dtype

        def flush():
            nonlocal shard, size
            if shard:
                fname = f"part-{len(files):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                files.append((fname, list(shard)))
            shard, size = {}, 0

        for name, t in tensors:  # consumed on every rank
            if tmp is None or t is None or (cfg.tie_embeddings and name == "output.weight"):
                continue
            t = t.detach().to("cpu")
            t = (t.to(dtype) if dtype is not None else t).contiguous()
            if t.untyped_storage().nbytes() != t.nbytes:  # a view (fused projections): safetensors wants its own
                t = t.clone()
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_bytes:
                flush()
            shard[moxin_to_hf_name(name)] = t
            size += n
            total += n
            out_dtype = out_dtype or t.dtype
        if tmp is None:
            return None
        flush()
        if len(files) == 1:
            os.rename(tmp / files[0][0], tmp / SINGLE_FILE)
        else:
            weight_map = {}
            for i, (fname, keys) in enumerate(files):
                final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                os.rename(tmp / fname, tmp / final)
                weight_map.update({key: final for key in keys})
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(moxin_to_hf_config(cfg, out_dtype), indent=2) + "\n")
        for tf in tokenizer_files or []:
            shutil.copy2(tf, tmp / Path(tf).name)
        for f in tmp.iterdir():
            os.chmod(f, FILE_MODE)  # safetensors writes 0600 files
        os.chmod(tmp, DIR_MODE)  # mkdtemp makes it private
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
