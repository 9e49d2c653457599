"""The DPO reference log-prob cache: computed once, stored on disk, keyed by everything that affects it.

DPO compares the policy's log-probs with a frozen reference model's (the starting checkpoint). The reference
never changes, so its summed answer log-probs (and answer lengths) for every pair are computed once before
training and reused by every step, epoch, resume and later run with the same inputs; no second model sits in
memory during training (open-instruct does the same).

Details: docs/modules.md, "stages/refcache.py".
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from moxin.distributed import all_reduce_values, rank_and_world
from moxin.losses import LabelRows
from moxin.model.attention import DocBounds
from moxin.stages.common import sequence_logps

__all__ = ["checkpoint_identity", "cache_key", "cache_path", "compute_reference_logps", "load_or_build"]

CACHE_VERSION = 1
_FILE = "ref_logps.safetensors"


def checkpoint_identity(path: str | None, seed: int | None = None) -> dict:
    """Identity of the reference weights: every weight file's resolved path, size and mtime (ns).

    ``path=None`` (a random init) is identified by ``seed``. Editing or replacing a checkpoint in place changes
    its mtime/size and therefore the key.
    """
    if not path:
        return {"random_init_seed": seed}
    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise FileNotFoundError(f"reference checkpoint {path!r} does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    weights = [f for f in files if f.suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".json")] or files
    return {"path": str(p), "files": [{"name": str(f.relative_to(p)) if p.is_dir() else f.name,
                                       "size": f.stat().st_size, "mtime_ns": f.stat().st_mtime_ns} for f in weights]}


def cache_key(parts: dict) -> str:
    """sha256 of the canonical JSON of ``parts`` (+ the cache format version)."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / key[:32] / _FILE


@torch.no_grad()
def compute_reference_logps(model, loader, n_pairs: int, device, chunk_size: int = 4096,
                            forward_context: Callable[[], Any] | None = None) -> dict[str, torch.Tensor]:
    """Run ``model`` over ``loader`` (DPO batches with ``pair_index``) and return the four per-pair tensors.

    Every rank runs its own loader share; results are all-reduced so every rank returns the full tables.
    """
    import contextlib

    ctx = forward_context or contextlib.nullcontext
    out = {k: torch.zeros(n_pairs, dtype=torch.float64, device=device)
           for k in ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "covered")}
    for batch in loader:
        idx = batch["pair_index"].to(device)
        if idx.numel() == 0:
            continue
        ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]]).to(device)
        labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
        pos = torch.cat([batch["chosen_positions"], batch["rejected_positions"]])
        # on the host: no device sync
        bounds = DocBounds.from_positions(pos) if pos.device.type == "cpu" else None
        targets = LabelRows.from_labels(labels).to(device) if labels.device.type == "cpu" else None
        labels, pos = labels.to(device), pos.to(device)
        with ctx():
            logps, lengths = sequence_logps(model, ids, labels, pos, chunk_size, bounds, targets)
        P = idx.numel()
        out["chosen_logps"][idx] += logps[:P].double()
        out["rejected_logps"][idx] += logps[P:].double()
        out["chosen_lengths"][idx] += lengths[:P].double()
        out["rejected_lengths"][idx] += lengths[P:].double()
        out["covered"][idx] += 1
    if dist.is_available() and dist.is_initialized():
        for v in out.values():
            dist.all_reduce(v)
    covered = out.pop("covered")
    if not bool((covered == 1).all()):
        bad = (covered != 1).nonzero().squeeze(1)[:5].tolist()
        raise RuntimeError(f"reference cache: pairs {bad} were computed {covered[bad].tolist()} times (expected once); "
                           "the reference loader must visit every pair exactly once over all ranks")
    out["chosen_lengths"] = out["chosen_lengths"].long()
    out["rejected_lengths"] = out["rejected_lengths"].long()
    return {k: v.cpu() for k, v in out.items()}


def _is_rank_zero() -> bool:
    return rank_and_world()[0] == 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_or_build(cache_dir: str | os.PathLike, parts: dict, n_pairs: int,
                  build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool, Path]:
    """Load the cache for ``parts`` if it exists and fits, else ``build()`` (on every rank) and save it.

    Returns ``(tables, reused, path)``. A file whose ``meta.json`` does not match ``parts`` or whose tables do not
    have ``n_pairs`` entries is never used (it is rebuilt and replaced).
    """
    from safetensors.torch import load_file, save_file

    key = cache_key(parts)
    path = cache_path(cache_dir, key)
    meta_path = path.with_name("meta.json")
    expected_meta = json.loads(json.dumps({"key": key, "n_pairs": n_pairs, "parts": parts}, sort_keys=True,
                                          default=str))
    ok = path.is_file() and meta_path.is_file()
    if ok:
        try:
            ok = json.loads(meta_path.read_text()) == expected_meta
            tables = load_file(str(path)) if ok else None
            ok = ok and all(t.shape == (n_pairs,) for t in tables.values()) and len(tables) == 4
        except Exception:  # unreadable / partial file: rebuild
            ok = False
    # all ranks must agree on reuse vs rebuild (rebuild runs a collective forward)
    if rank_and_world()[1] > 1:
        ok = all_reduce_values([ok], "cuda" if dist.get_backend() == "nccl" else "cpu", "min")[0] > 0
    if ok:
        return tables, True, path
    tables = build()
    if _is_rank_zero():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp))
        os.replace(tmp, path)
        tmp_meta = meta_path.with_name(f"meta.json.tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(expected_meta, indent=1, sort_keys=True))
        os.replace(tmp_meta, meta_path)
    _barrier()
    return tables, False, path
