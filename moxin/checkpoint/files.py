"""What a checkpoint is on disk, shared by the writer (`policy`) and the readers (`resume`, `weights`).

A checkpoint is ``checkpoints/step000012.ckpt``: a torch zip file for one process / DDP, or a distributed-checkpoint
folder of shards + ``.metadata`` + ``meta.pt`` under FSDP2. Saves go to a ``.tmp-`` name first; ``last.ckpt`` is a
relative symlink to the newest published one. `read_info` reads a checkpoint's step, epoch and moxin entry and
refuses one that is incomplete.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch.distributed.checkpoint import FileSystemReader

from moxin.model.hf import FILE_MODE

LAST = "last.ckpt"
TMP_PREFIX = ".tmp-"
STEP_RE = re.compile(r"^step(\d+)\.ckpt$")
DCP_META = "meta.pt"  # Lightning's ModelParallelStrategy writes the non-tensor part here


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


def step_name(step: int) -> str:
    return f"step{step:06d}.ckpt"


def fsync_dir(d: Path) -> None:
    """Make a rename inside `d` durable (best effort: some file systems refuse to open a folder)."""
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_checkpoint(p: Path) -> None:
    """Delete a checkpoint file or folder; a folder is renamed first so that a kill half-way through leaves a
    ``.trash-`` (cleaned at start), never a partial checkpoint under a valid name."""
    if p.is_dir() and not p.is_symlink():
        trash = p.with_name(f".trash-{p.name}-{os.getpid()}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Single-file checkpoints written atomically: to a temporary file in the same folder, fsynced, then renamed
    over the final name, so a crash mid-write leaves the previous checkpoint intact and never a truncated one.
    Loading uses `torch.load(weights_only=True)`. Files get the mode an ordinary `open` would give (0644 under the
    usual umask), not mkstemp's private 0600, so the people sharing a run folder can read its checkpoints."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


@dataclass
class CkptInfo:
    path: Path
    step: int
    epoch: int
    moxin: dict
    """The stage's own entry (world_size, model_config, total_steps, finished ...); {} for foreign checkpoints."""

    @property
    def world_size(self) -> int | None:
        return self.moxin.get("world_size")


def _meta_of(ckpt: dict, path: Path) -> CkptInfo:
    return CkptInfo(path, int(ckpt.get("global_step", 0)), int(ckpt.get("epoch", 0)), dict(ckpt.get("moxin") or {}))


def check_distributed(path: Path) -> None:
    """Raise CheckpointError unless `path` is a complete distributed checkpoint: ``.metadata`` readable,
    ``meta.pt`` present, and every shard file it refers to holds the byte ranges it lists."""
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path}: no .metadata (distributed checkpoint incomplete)")
    if not (path / DCP_META).is_file():
        raise CheckpointError(f"{path}: no {DCP_META} (loop and data state missing; the save was interrupted)")
    md = FileSystemReader(str(path)).read_metadata()
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in need.items():
        f = path / rel
        if not f.is_file() or f.stat().st_size < size:
            raise CheckpointError(f"{path}: shard {rel} is missing or truncated ({size} bytes expected)")


def read_info(path: str | os.PathLike) -> CkptInfo:
    """Step, epoch and moxin entry of a checkpoint, checking that it is complete and readable (cheap: a
    file is memory-mapped, not read; a distributed checkpoint's shards are checked for size, not loaded)."""
    p = Path(path)
    try:
        if p.is_dir():
            check_distributed(p)
            ckpt = torch.load(p / DCP_META, map_location="cpu", weights_only=True)
        elif p.is_file():
            with zipfile.ZipFile(p) as z:  # reads the central directory at the end: fails on a truncated file
                z.namelist()
            ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        else:
            raise CheckpointError(f"{p}: does not exist")
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure means: not usable
        raise CheckpointError(f"{p}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt and not p.is_dir():
        raise CheckpointError(f"{p}: not a Lightning checkpoint (no state_dict)")
    return _meta_of(ckpt, p)
