"""Mistakes a user can make, found before any training work and reported as one short message.

Hydra reports config-composition mistakes itself. Everything it cannot see (a data path that does not exist, a
missing `init_from`, `hardware=gpu` on a CPU-only torch, `trainer.max_steps=abc`, a key added with `+` that the
target class does not take, malformed jsonl) used to surface as the last line of a long traceback after
Lightning's banner, sometimes after a few training steps. Here:

Details: docs/modules.md, "errors.py".
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import importlib
import inspect
import os
import re
import sys
from itertools import islice
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from moxin.config import ConfigError, LoRAConfig, MoxinUserError, ParallelConfig, RunConfig, SourceConfig, plain
from moxin.data.reader import Bad, read_records
from moxin.paths import conf_dir


#: the exit status of a run stopped by Ctrl-C (128 + SIGINT, what shells report for an interrupted command)
INTERRUPTED = 130


def check_hardware(cfg: DictConfig) -> None:
    """A GPU profile on a machine where torch sees no GPU fails in Lightning with 'No supported gpu backend
    found!'; say which torch is installed and what to do instead."""
    hw = cfg.get("hardware") or {}
    if hw.get("accelerator") not in ("gpu", "cuda"):
        return
    if torch.cuda.is_available():
        return
    why = ("this torch is a CPU-only build" if torch.version.cuda is None
           else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")
    raise ConfigError(f"hardware.accelerator={hw.get('accelerator')!r} (hardware profile asks for a GPU) but {why}. "
                      f"Use hardware=cpu here, or install the torch build for your CUDA on a GPU machine")


def _local_jsonl_probe(key: str, path: str, field: str | None, limit: int, max_bad_fraction: float,
                       max_bad_records: int | None = None) -> None:
    """Read the first `limit` records of a local jsonl file; too many malformed ones (more than the source's
    max_bad_fraction or max_bad_records, or all of them) stop the run here, naming the first bad file:line."""
    if not path.lower().endswith((".jsonl", ".json")) or not os.path.isfile(path):
        return
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
    if n and (bad == n or bad > max_bad_fraction * n or (max_bad_records is not None and bad > max_bad_records)):
        limits = f"max_bad_fraction={max_bad_fraction}" + (f", max_bad_records={max_bad_records}"
                                                          if max_bad_records is not None else "")
        raise ConfigError(f"{key}: {bad} of the first {n} records are unusable; first: {first}. Fix or remove those "
                          f"lines (or raise the limits, {limits}, in the data config if they are expected)")


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
        if glob.has_magic(path):
            if not glob.glob(path, recursive=True):
                raise ConfigError(f"{key}.path={path!r}: no files match (cwd {os.getcwd()}); fix the glob")
            continue
        if not os.path.exists(path):
            raise ConfigError(f"{key}.path={path!r} does not exist (cwd {os.getcwd()}); fix the path (a local "
                              f"jsonl/parquet/txt file, a folder or a glob) or give a Hugging Face dataset 'org/name'")
        field = s.get("text_field", "text") if "sources" in key else s.get("messages_field", None)
        frac = float(s.get("max_bad_fraction", 0.01)) if "sources" in key else float(data.get("max_bad_fraction", 0.05))
        most = None if "sources" in key or data.get("max_bad_records") is None else int(data.max_bad_records)
        _local_jsonl_probe(key, path, field if "sources" in key else None, 1000, frac, most)


# ---- unknown keys ----------------------------------------------------------------------------------------------
#: top-level nodes whose keys are read one by one by moxin (not passed to a class): the keys a config file of
#: theirs declares are the valid ones (the root config.yaml, the experiments, the group's own files)
_READ_NODES = ("trainer", "samples", "warmup", "hardware", "schedule")
#: top-level keys some experiment or group adds (`+experiment=eval`, `+eval=NAME`)
_EXTRA_TOP = ("eval", "eval_only")


def _known_keys() -> dict[str, set[str]]:
    """'' -> the valid top-level keys; node -> its valid keys, for the nodes of _READ_NODES. Taken from moxin's
    own config files, so a key declared (and documented) there is valid and nothing else is."""
    root = conf_dir()
    base = OmegaConf.load(root / "config.yaml")
    groups = {next(iter(d)) if isinstance(d, dict) or OmegaConf.is_dict(d) else str(d)
              for d in base.get("defaults", [])}
    known: dict[str, set[str]] = {"": {k for k in base if k not in ("defaults", "hydra")} | set(_EXTRA_TOP)}
    known[""] |= {g for g in groups if "/" not in g and g != "_self_"}
    for node in _READ_NODES:
        known[node] = set(base.get(node) or {})
    for f in sorted((root / "experiment").glob("*.yaml")):
        exp = OmegaConf.load(f)
        known[""] |= {k for k in exp if k not in ("defaults", "hydra")}
        for node in _READ_NODES:
            if OmegaConf.is_dict(exp.get(node)):
                known[node] |= set(exp[node])
    for node in ("hardware", "schedule"):
        for f in sorted((root / node).glob("*.yaml")):
            known[node] |= {k for k in OmegaConf.load(f) if k != "defaults"}
    return known


def _params_of(target: str) -> set[str] | None:
    """The keyword arguments `target` takes (through **kwargs to its bases), or None when it takes any."""
    mod, _, name = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError, ValueError):
        return None  # instantiation names a target that does not exist
    out: set[str] = set()
    for cls in (obj.__mro__ if inspect.isclass(obj) else (obj,)):
        fn = cls.__init__ if inspect.isclass(obj) else cls
        if inspect.isclass(obj) and "__init__" not in vars(cls):
            continue
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        out |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return out
    return None


def _override_of(key: str) -> str:
    """The command-line override that added `key`, if one did (in a Hydra job)."""
    try:
        task = list(HydraConfig.get().overrides.task)
    except ValueError:
        return ""
    for o in task:
        if o.lstrip("+~").split("=", 1)[0] == key:
            return o
    return ""


def _unknown(key: str, valid: set[str], where: str) -> ConfigError:
    prefix, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, sorted(valid), n=1, cutoff=0.6)
    name = lambda k: f"{prefix}.{k}" if prefix else k  # noqa: E731
    hint = f" (did you mean {name(close[0])}?)" if close else ""
    src = _override_of(key)
    fix = f"Fix or remove the override {src}" if src else f"Fix or remove {key} in the config file"
    return ConfigError(f"unknown key {key}{hint}: nothing reads it ({where}), so it would be silently ignored. {fix}. "
                       f"Valid keys{f' of {prefix}' if prefix else ''}: {', '.join(sorted(valid))}")


def check_keys(cfg: DictConfig) -> None:
    """Every key of the composed config is one moxin reads: a top-level key the root config or an experiment
    declares, a key of trainer/samples/warmup/hardware/schedule that one of moxin's config files declares, or a
    parameter of the class a `_target_` node instantiates. A key added with `+` passes Hydra's own checks (it is
    an explicit "add"), so a misspelling (`+trainer.max_stepz=5`) would otherwise be ignored without a word."""
    known = _known_keys()
    if "experiment" in cfg:  # an experiment file without its package line lands under `experiment:`, unread
        raise ConfigError("the settings of +experiment=... ended up under a key 'experiment' that nothing reads: an "
                          "experiment file must start with the line '# @package _global_' (see conf/experiment/*.yaml)")
    for k in cfg:
        if k not in known[""]:
            raise _unknown(str(k), known[""], "not a key of moxin's config")
    for node in _READ_NODES:
        sub = cfg.get(node)
        if OmegaConf.is_dict(sub):
            for k in sub:
                if k not in known[node]:
                    raise _unknown(f"{node}.{k}", known[node], f"not one of moxin's {node}.* settings")

    def walk(node, path: str) -> None:
        if not OmegaConf.is_dict(node):
            return
        target = node.get("_target_") if "_target_" in node else None
        params = _params_of(str(target)) if target else None
        for k in node:
            if params is not None and k != "_target_" and k not in params:
                raise _unknown(f"{path}.{k}", params, f"{target} has no such parameter")
            walk(node._get_node(k), f"{path}.{k}")

    for top in ("model", "data", "stage", "hardware", "eval"):
        if OmegaConf.is_dict(cfg.get(top)):
            walk(cfg[top], top)


def check_mixtures(cfg: DictConfig) -> None:
    """Every phase's mixture names sources of data.sources. The default phases (conf/schedule) mix the sample
    corpus's prose/code/cjk, so replacing data.sources alone leaves them naming sources that are gone: say to
    rewrite the phases too (README: "Pretraining on your own files")."""
    data = cfg.get("data")
    if not data or "sources" not in data or "phases" not in data:
        return
    names = [str(s.get("name")) for s in (data.sources or [])]
    for i, ph in enumerate(data.phases or []):
        for src in (ph.get("mixture") or {}):
            if src not in names:
                example = f"{{name: main, seq_len: {ph.get('seq_len', 256)}, tokens: {ph.get('tokens', 65536)}, " \
                          f"mixture: {{{names[0] if names else 'mine'}: 1}}}}"
                raise ConfigError(
                    f"schedule.phases[{i}] ({ph.get('name')}).mixture names source {src!r}, which data.sources does not "
                    f"have (its sources: {', '.join(names) or 'none'}). The phases say how much of each source to mix, "
                    f"so with your own data.sources give them mixtures of your sources too, e.g. "
                    f"'schedule.phases=[{example}]' (README: Pretraining on your own files)")


def check_lora(cfg: DictConfig) -> None:
    """LoRA settings that cannot run with the hardware profile (``LoRAConfig.check_parallel``)."""
    lo = (cfg.get("stage") or {}).get("lora") or {}
    hw = cfg.get("hardware") or {}
    if not lo.get("rank") or hw.get("strategy") != "fsdp2":
        return
    try:
        lora = LoRAConfig(**{k: v for k, v in plain(lo).items() if k != "_target_"})
    except ValueError:  # a value LoRAConfig refuses: instantiating stage.lora names it, with its key
        return
    lora.check_parallel(hw.get("strategy"), hw.get("accelerator") in ("gpu", "cuda"),
                        (hw.get("parallel") or {}).get("fsdp_param_dtype"))


def check_float8(cfg: DictConfig) -> None:
    """A float8 setting the run cannot train with (``ParallelConfig.check_float8``: torchao, the GPU, LoRA)."""
    hw = cfg.get("hardware") or {}
    par = hw.get("parallel") or {}
    if par.get("float8") in (None, "none"):
        return
    try:
        pcfg = ParallelConfig(**{k: v for k, v in plain(par).items() if k != "_target_"})
    except ValueError:  # a value ParallelConfig refuses: instantiating hardware.parallel names it, with its key
        return
    lora_rank = ((cfg.get("stage") or {}).get("lora") or {}).get("rank")
    pcfg.check_float8(gpu=hw.get("accelerator") in ("gpu", "cuda"), lora=bool(lora_rank))


def preflight(cfg: DictConfig) -> None:
    """Everything about the config that can be checked without building data, model or trainer."""
    check_keys(cfg)
    RunConfig.from_cfg(cfg)  # trainer.* types and ranges, resume, init_from
    check_hardware(cfg)
    check_lora(cfg)
    check_float8(cfg)
    check_data(cfg)
    check_mixtures(cfg)  # after the paths: a missing file is the first thing to fix


_KW_RE = re.compile(r"got an unexpected keyword argument '([^']+)'")


def user_message(exc: BaseException) -> str | None:
    """The one-paragraph message for an error the user caused, or None for anything else."""
    if isinstance(exc, MoxinUserError):
        return str(exc)
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
    if any(isinstance(e, MoxinUserError) for e in _chain(exc)):  # e.g. raised while another error was handled
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
        mod, _, name = target.rpartition(".")
        obj = getattr(importlib.import_module(mod), name)
        if dataclasses.is_dataclass(obj):
            return [f.name for f in dataclasses.fields(obj)]
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
    MoxinUserError raised, so Hydra records the job as failed and the other jobs still run."""
    try:
        return fn()
    except KeyboardInterrupt:  # Ctrl-C before Lightning's fit (which handles its own): one line, no traceback
        print("moxin: interrupted (Ctrl-C) before the first optimizer step; nothing was trained", file=sys.__stderr__,
              flush=True)
        raise SystemExit(INTERRUPTED) from None
    except BaseException as exc:
        if steps_done() == 0:
            cleanup()
        msg = user_message(exc) if isinstance(exc, Exception) else None
        if msg is None or debug_requested():
            raise
        print(f"moxin: error: {msg}", file=sys.__stderr__, flush=True)
        if not exit_on_user_error:
            raise MoxinUserError(msg) from None
        print("(full traceback: rerun with HYDRA_FULL_ERROR=1)", file=sys.__stderr__, flush=True)
        raise SystemExit(2) from None

