"""Which checkpoint a run folder resumes from, and whether a checkpoint's model is the one configured.

`find_resume` lists every candidate (step files, a legacy real ``last.ckpt``, Lightning's SLURM
``hpc_ckpt_N.ckpt``), checks each with `read_info` (a torch zip whose central directory reads; a distributed
checkpoint whose ``.metadata``, ``meta.pt`` and every shard byte range it names are present) and returns the newest
complete one, with the reasons every newer one was skipped. `clean_temporaries` removes what killed saves left.
`rng_state` / `restore_rng`: the generator states a checkpoint carries, so a resumed run draws what the
uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from moxin.checkpoint.files import STEP_RE, TMP_PREFIX, CheckpointError, CkptInfo, read_info

log = logging.getLogger(__name__)

# fields that change what the weights compute; max_seq_len, init_std and attn_backend do not
ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps",
               "rope_theta", "sliding_window", "tie_embeddings")


def candidates(out_dir: Path) -> list[Path]:
    """Every checkpoint a run folder may hold: step files (the policy), a real (pre-policy) last.ckpt or
    last-vN.ckpt, and Lightning's SLURM requeue checkpoints hpc_ckpt_N.ckpt."""
    ckpt_dir = out_dir / "checkpoints"
    found: list[Path] = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith("."):
                continue
            if STEP_RE.match(p.name) or (p.name.startswith("last") and p.name.endswith(".ckpt") and not p.is_symlink()):
                found.append(p)
    if out_dir.is_dir():
        found += [p for p in out_dir.glob("hpc_ckpt_*.ckpt")]
    return found


def find_resume(out_dir: str | os.PathLike) -> tuple[CkptInfo | None, list[str]]:
    """The newest complete checkpoint of a run folder (by step, then modification time) and the reasons the
    newer ones were skipped."""
    infos, skipped = [], []
    for p in candidates(Path(out_dir)):
        try:
            infos.append(read_info(p))
        except CheckpointError as e:
            skipped.append((p.stat().st_mtime if p.exists() else 0.0, str(e)))
    if not infos:
        return None, [s for _, s in skipped]
    best = max(infos, key=lambda i: (i.step, i.path.stat().st_mtime))
    newer = [s for m, s in skipped if m >= best.path.stat().st_mtime]
    return best, newer


def clean_temporaries(out_dir: str | os.PathLike) -> list[str]:
    """Remove what killed saves left behind (temporary checkpoint files and folders, half-written HF
    exports). Only call while holding the run lock: a live save of another process would be deleted."""
    out = Path(out_dir)
    removed = []
    for d, pats in ((out / "checkpoints", (TMP_PREFIX + "*", ".*.tmp", ".trash-*")), (out, (".hf.tmp-*", ".hf.old-*"))):
        if not d.is_dir():
            continue
        for pat in pats:
            for p in d.glob(pat):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
                removed.append(str(p))
    if removed:
        log.warning("removed %d leftover temporary file(s) of interrupted saves: %s", len(removed), removed[:5])
    return removed


def config_mismatches(ours, theirs) -> list[str]:
    """The architecture fields (`ARCH_FIELDS`) in which two ModelConfigs differ, one line each."""
    out = []
    for f in ARCH_FIELDS:
        a, b = getattr(ours, f), getattr(theirs, f)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            out.append(f"{f}: model.{f}={a!r} here, {b!r} in the source")
    return out


def rng_state() -> dict:
    """torch (CPU, CUDA), Python and NumPy generator states, as plain tensors and numbers (they load with
    ``weights_only=True``)."""
    np_state = np.random.get_state()
    return {
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "rng_python": list(random.getstate()[1]),
        "rng_python_version": random.getstate()[0],
        "rng_python_gauss": random.getstate()[2],
        "rng_numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
    }


def restore_rng(st: dict) -> None:
    """The generators as `rng_state` recorded them."""
    torch.set_rng_state(st["rng_torch"])
    if torch.cuda.is_available() and st["rng_cuda"]:
        torch.cuda.set_rng_state_all(st["rng_cuda"])
    py = st["rng_python"]
    random.setstate((st["rng_python_version"], tuple(int(x) for x in py), st["rng_python_gauss"]))
    n = st["rng_numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))


def rescale_loop_batches(checkpoint: dict, saved_accumulate: int, accumulate: int) -> None:
    """A checkpoint resumed with another gradient accumulation (another process count, same tokens a step): the
    fit loop's micro-batch counters rescaled to the new accumulation, in place, so that its step boundaries and
    validation interval fall where the optimizer steps do. Checkpoints are written at step boundaries, so every
    counter is a whole number of steps."""
    if saved_accumulate == accumulate:
        return
    progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
    if not progress:
        return
    for part in ("total", "current"):
        counts = progress.get(part, {})
        ready = counts.get("ready", 0)
        if ready % saved_accumulate:
            raise CheckpointError(f"the checkpoint's fit loop stands at micro-batch {ready}, inside an optimizer step "
                                  f"of {saved_accumulate}: it cannot be resumed with another process count")
        # the later counters trail `ready` by the hooks still to run (a checkpoint saved in on_train_batch_end
        # has not counted that batch completed): kept as they were
        for k, v in counts.items():
            counts[k] = ready // saved_accumulate * accumulate - (ready - v)


def finish_phase_end(checkpoint: dict) -> None:
    """A checkpoint saved at a phase's end (Lightning's ``on_train_epoch_end``: the epoch processed, not yet counted
    completed), resumed by a trainer with ``max_steps``: Lightning then always restarts its loops and would take the
    epoch for unfinished, end it at once and stop (``max_epochs`` reached) without training the next phase. In place:
    the epoch counted completed and the next one started from its first batch with a fresh loader, which is what
    Lightning itself does for such a checkpoint without ``max_steps``."""
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or "epoch_progress" not in fit:
        return
    epochs, batches = fit["epoch_progress"], fit.get("epoch_loop.batch_progress") or {}
    ended = all(epochs[p]["ready"] == epochs[p]["started"] == epochs[p]["processed"] == epochs[p]["completed"] + 1
                for p in ("total", "current"))
    if not (ended and batches.get("is_last_batch")):
        return
    for p in ("total", "current"):
        epochs[p]["completed"] += 1
    batches["current"] = {k: 0 for k in batches["current"]}
    batches["is_last_batch"] = False
    fit.get("state_dict", {}).pop("combined_loader", None)
    # the per-epoch counters a new epoch starts from zero (Lightning's reset at an epoch's start)
    optim = fit.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {})
    for part in [fit.get("epoch_loop.scheduler_progress"), optim.get("step"), optim.get("zero_grad")]:
        if part:
            part["current"] = {k: 0 for k in part["current"]}
    val = fit.get("epoch_loop.val_loop.batch_progress")
    if val:
        val["total"] = {k: 0 for k in val["total"]}
