"""Mistakes a user can make, found before any training work and reported as one short message.

Hydra reports config-composition mistakes itself. Everything it cannot see (a data path that does not exist, a
missing `init_from`, `hardware=gpu` on a CPU-only torch, `trainer.max_steps=abc`, a key added with `+` that the
target class does not take, malformed jsonl) used to surface as the last line of a long traceback after
Lightning's banner, sometimes after a few training steps. Here:

* :func:`preflight` checks those things from the composed config, before the data module, the model or the
  Lightning trainer exist, and raises :class:`UserError` naming the key / file:line / path and the fix;
* :func:`user_message` turns the errors other layers raise for user mistakes (moxin's ``ConfigError`` and
  ``DataError``, Hydra's instantiation errors, OmegaConf validation errors) into that same one-paragraph form,
  and returns None for anything else (a real bug keeps its traceback);
* :func:`guarded` runs the job: a user error prints ``moxin: error: ...`` and exits with status 2; with
  ``HYDRA_FULL_ERROR=1`` or ``MOXIN_DEBUG=1`` the full traceback is raised instead. A run that failed before its
  first optimizer step leaves no folder behind when this launch created it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig


class UserError(ValueError):
    """Something the user can fix; the message says what and how. Printed without a traceback."""


#: `trainer.*` keys and the types they accept (None: the key may be null). Values from the command line arrive
#: as strings when they do not parse as numbers, so `trainer.max_steps=abc` is caught here, not deep in Lightning.
TRAINER_TYPES: dict[str, tuple] = {
    "checkpoint_every_n_steps": (int,),
    "keep_all_checkpoints": (bool,),
    "save_checkpoints": (bool,),
    "val_every_n_steps": (int, type(None)),
    "max_steps": (int,),
    "limit_val_batches": (int, float),
    "progress_bar": (str,),
    "progress_every_n_steps": (int,),
    "deterministic": (bool,),
}
PROGRESS_BARS = ("rich", "rich_always", "plain", "none")


def _type_names(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def check_types(cfg: DictConfig) -> None:
    tr = cfg.get("trainer") or {}
    for key, types in TRAINER_TYPES.items():
        if key not in tr:
            continue
        v = tr[key]
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            raise UserError(f"trainer.{key}={v!r}: expected {_type_names(types)}, got {type(v).__name__}. "
                            f"Fix the override, e.g. trainer.{key}={_example(key)}")
    if tr.get("progress_bar") not in PROGRESS_BARS:
        raise UserError(f"trainer.progress_bar={tr.get('progress_bar')!r}: use one of {', '.join(PROGRESS_BARS)}")
    if int(tr.get("progress_every_n_steps", 1)) < 1:
        raise UserError(f"trainer.progress_every_n_steps={tr.progress_every_n_steps}: must be at least 1")
    if cfg.get("resume") not in (None, "", False, "auto") and not isinstance(cfg.resume, str):
        raise UserError(f"resume={cfg.resume!r}: use null, auto or a path to a .ckpt")


def _example(key: str) -> str:
    return {"max_steps": "100", "val_every_n_steps": "25 (or null)", "checkpoint_every_n_steps": "25",
            "limit_val_batches": "1.0", "progress_bar": "plain", "progress_every_n_steps": "10",
            "keep_all_checkpoints": "true", "save_checkpoints": "false", "deterministic": "true"}.get(key, "...")


def check_hardware(cfg: DictConfig) -> None:
    """A GPU profile on a machine where torch sees no GPU fails in Lightning with 'No supported gpu backend
    found!'; say which torch is installed and what to do instead."""
    hw = cfg.get("hardware") or {}
    if hw.get("accelerator") not in ("gpu", "cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    why = ("this torch is a CPU-only build" if torch.version.cuda is None
           else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")
    raise UserError(f"hardware.accelerator={hw.get('accelerator')!r} (hardware profile asks for a GPU) but {why}. "
                    f"Use hardware=cpu here, or install the torch build for your CUDA on a GPU machine")


def check_init_from(cfg: DictConfig) -> None:
    init = cfg.get("init_from")
    if not init:
        return
    p = Path(str(init))
    if not p.exists():
        hint = ""
        if p.name == "last.ckpt" and p.parent.parent.exists():
            hint = f" ({p.parent.parent} exists but has no checkpoints/last.ckpt: did that run finish a step?)"
        raise UserError(f"init_from={init!r}: no such file or folder (cwd {os.getcwd()}){hint}. Give a moxin "
                        f"run's checkpoints/last.ckpt, a Hugging Face MistralForCausalLM folder (its hf/ export) or "
                        f"a .safetensors file")
    # what moxin.checkpointing.load_model_weights reads: a HF folder, a distributed checkpoint (an FSDP run's
    # last.ckpt is such a folder), a checkpoints folder or a run folder
    accepted = ("config.json", ".metadata", "last.ckpt", "checkpoints/last.ckpt", "adapter_config.json")
    if p.is_dir() and not any((p / name).exists() for name in accepted):
        raise UserError(f"init_from={init!r} is a folder without config.json (Hugging Face), .metadata (an FSDP "
                        f"run's distributed checkpoint) or last.ckpt; point it at runs/<name>/checkpoints/last.ckpt "
                        f"or runs/<name>/hf")


def _local_jsonl_probe(key: str, path: str, field: str | None, limit: int, max_bad_fraction: float) -> None:
    """Read the first `limit` records of a local jsonl file; too many malformed ones (more than the source's
    max_bad_fraction, or all of them) stop the run here, naming the first bad file:line."""
    if not path.lower().endswith((".jsonl", ".json")) or not os.path.isfile(path):
        return
    from itertools import islice

    from moxin.data.reader import Bad, SourceConfig, read_records

    n = bad = 0
    first = None
    for loc, rec in islice(read_records(SourceConfig(name=key, path=path, format="jsonl")), limit):
        n += 1
        problem = rec.reason if isinstance(rec, Bad) else None
        if problem is None and field and field not in rec:
            problem = f"no field {field!r} (fields: {sorted(rec)[:10]})"
        if problem:
            bad += 1
            first = first or f"{loc}: {problem}"
    if n and (bad == n or bad > max_bad_fraction * n):
        raise UserError(f"{key}: {bad} of the first {n} records are unusable; first: {first}. Fix or remove those "
                        f"lines (or raise max_bad_fraction in the source config if they are expected)")


def _is_local(path: str) -> bool:
    """Paths a user meant as local files: absolute, ./ ../ ~, or with a data file extension (a hub name is
    'org/name' without one)."""
    return (path.startswith(("/", "./", "../", "~")) or Path(path).suffix.lower() in
            (".jsonl", ".json", ".parquet", ".txt", ".gz") or os.path.exists(path))


def check_data(cfg: DictConfig) -> None:
    """Local data paths exist and their first records parse. Hub names are left to the data module (no
    network here)."""
    data = cfg.get("data")
    if not data:
        return
    entries: list[tuple[str, Any]] = []
    for i, s in enumerate(data.get("sources") or []):
        entries.append((f"data.sources[{i}] ({s.get('name')})", s))
    for k in ("train", "val"):
        if isinstance(data.get(k), (dict, DictConfig)):
            entries.append((f"data.{k}", data[k]))
    for key, s in entries:
        path = s.get("path")
        if not isinstance(path, str) or not path:
            continue
        path = os.path.expanduser(path)
        if not _is_local(path):
            continue
        import glob

        if glob.has_magic(path):
            if not glob.glob(path, recursive=True):
                raise UserError(f"{key}.path={path!r}: no files match (cwd {os.getcwd()}); fix the glob")
            continue
        if not os.path.exists(path):
            raise UserError(f"{key}.path={path!r} does not exist (cwd {os.getcwd()}); fix the path (a local "
                            f"jsonl/parquet/txt file, a folder or a glob) or give a Hugging Face dataset 'org/name'")
        field = s.get("text_field", "text") if "sources" in key else s.get("messages_field", None)
        frac = float(s.get("max_bad_fraction", 0.01)) if "sources" in key else float(data.get("max_bad_fraction", 0.05))
        _local_jsonl_probe(key, path, field if "sources" in key else None, 1000, frac)


def check_lora(cfg: DictConfig) -> None:
    """LoRA settings that cannot run with the hardware profile (moxin/model/lora.py), named with the fix: QLoRA
    under FSDP2, and a 16-bit base with fp32 adapters under FSDP2 without its mixed precision (FSDP2 gathers a
    block's parameters in one dtype)."""
    lo = (cfg.get("stage") or {}).get("lora") or {}
    hw = cfg.get("hardware") or {}
    if not lo.get("rank") or hw.get("strategy") != "fsdp2":
        return
    if lo.get("quantize"):
        raise UserError(f"stage.lora.quantize={lo.get('quantize')} (QLoRA) runs on one GPU; under FSDP2 "
                        "(hardware.strategy=fsdp2) use a 16-bit base: stage.lora.quantize=null")
    gpu = hw.get("accelerator") in ("gpu", "cuda")
    base16 = lo.get("base_dtype", "auto") == "bfloat16" or (lo.get("base_dtype", "auto") == "auto" and gpu)
    if base16 and not (hw.get("parallel") or {}).get("fsdp_param_dtype"):
        raise UserError("stage.lora with a bfloat16 base under FSDP2 needs FSDP2's mixed precision to gather the "
                        "fp32 adapters with it: set hardware.parallel.fsdp_param_dtype=bfloat16 (or "
                        "stage.lora.base_dtype=float32)")


def preflight(cfg: DictConfig) -> None:
    """Everything about the config that can be checked without building data, model or trainer."""
    check_types(cfg)
    check_hardware(cfg)
    check_init_from(cfg)
    check_lora(cfg)
    check_data(cfg)


_KW_RE = re.compile(r"got an unexpected keyword argument '([^']+)'")


def user_message(exc: BaseException) -> str | None:
    """The one-paragraph message for an error the user caused, or None for anything else."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, UserError):
        return str(exc)
    names = {type(e).__name__ for e in _chain(exc)}
    if isinstance(exc, InstantiationException):
        text = str(exc)
        full_key = re.search(r"full_key: (\S+)", text)
        target = re.search(r"call to target '([^']+)'", text)
        kw = _KW_RE.search(text)
        where = full_key.group(1) if full_key else "?"
        if kw:
            known = _fields_of(target.group(1)) if target else []
            return (f"{where}.{kw.group(1)}: {target.group(1) if target else 'the target'} has no parameter "
                    f"{kw.group(1)!r}" + (f" (it takes: {', '.join(known)})" if known else "") +
                    f". Remove the +{where}.{kw.group(1)}=... override or fix its spelling")
        inner = text.split("\n")[1] if "\n" in text else text
        return f"{where}: {inner.strip()}"
    if isinstance(exc, OmegaConfBaseException):
        return str(exc).strip()
    if names & {"ConfigError", "DataError", "ChatValidationError", "TokenizerError", "DiskSpaceError"}:
        return str(exc)
    if isinstance(exc, FileNotFoundError) and "init_from=" in str(exc):
        return str(exc)
    return None


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _fields_of(target: str) -> list[str]:
    try:
        import dataclasses
        import importlib

        mod, _, name = target.rpartition(".")
        obj = getattr(importlib.import_module(mod), name)
        if dataclasses.is_dataclass(obj):
            return [f.name for f in dataclasses.fields(obj)]
        import inspect

        return [p for p in inspect.signature(obj).parameters if p not in ("self", "args", "kwargs")]
    except Exception:  # only used to enrich a message
        return []


def debug_requested() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("MOXIN_DEBUG") == "1"


def guarded(fn: Callable[[], Any], cleanup: Callable[[], None], steps_done: Callable[[], int],
            exit_on_user_error: bool = True):
    """Run `fn`; turn user errors into one message and exit status 2. A run that failed before its first
    optimizer step calls `cleanup` (which removes what this launch created: nothing half-made is left to
    confuse a later resume=auto). In a sweep (`exit_on_user_error=False`) the message is printed and a
    UserError raised, so Hydra records the job as failed and the other jobs still run."""
    try:
        return fn()
    except BaseException as exc:
        if steps_done() == 0 and not isinstance(exc, KeyboardInterrupt):
            cleanup()
        msg = user_message(exc) if isinstance(exc, Exception) else None
        if msg is None or debug_requested():
            raise
        print(f"moxin: error: {msg}", file=sys.__stderr__, flush=True)
        if not exit_on_user_error:
            raise UserError(msg) from None
        print("(full traceback: rerun with HYDRA_FULL_ERROR=1)", file=sys.__stderr__, flush=True)
        raise SystemExit(2) from None

