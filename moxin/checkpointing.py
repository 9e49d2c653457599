"""One checkpoint policy for every strategy, and the readers that resume and initialise from it.

Writing (`CheckpointPolicy`, a Lightning callback that replaces ModelCheckpoint):

1. every save goes to a new temporary name in the checkpoint folder (``.tmp-step000012.ckpt``: a file for one
   process / DDP, a distributed-checkpoint folder of shards + ``meta.pt`` under FSDP2);
2. once it is complete on every rank it is renamed to ``step000012.ckpt`` (a rename is atomic: that name never
   denotes a partial checkpoint);
3. ``last.ckpt`` is then switched to it atomically: a relative symlink replaced with ``os.replace`` (never a
   second copy of the bytes);
4. only then does the retention policy delete what it no longer keeps (the newest ``keep_checkpoints`` step
   checkpoints stay, 1 by default; ``keep_all_checkpoints=true``: all of them).

Steps 2-4 (publishing) wait until the step is on record. Lightning logs a step's metrics only after its
``on_train_batch_end`` hooks, and validates after that: publishing there would let a kill leave a ``last``
checkpoint whose step and validation never reach metrics.csv (the resumed run starts after it; the curve keeps
a hole). So a checkpoint written at the end of an optimizer step is published at the start of the next one (or
at the phase's or the run's end), after the loggers have flushed. `moxin.run` makes the policy the last
callback, so a phase-end checkpoint is published after that phase's samples and evaluation, and the run's final
one at ``on_train_end``, after an evaluation of the stage. An exception in between publishes it only where
Lightning had finished its step (`CheckpointPolicy.on_exception`).

A kill at any point leaves the previous complete checkpoint, at worst a temporary that the next start removes.
Weights with a NaN/Inf are never saved (the previous good checkpoint stays ``last``).

With ``trainer.save_checkpoints=false`` nothing is written (benchmarks, sweeps that keep only their metrics;
such a run cannot resume). Otherwise saves happen every ``checkpoint_every_n_steps`` optimizer steps, where
``trainer.max_steps`` stops a run, and at the end of every phase (Lightning epoch), which includes the final state
of a finished run. A phase's last
step is saved at ``on_train_epoch_end``, after that step's validation, so the loop state says "phase done" and
a resumed run goes on with the next phase exactly as an uninterrupted run does; other steps are saved at the
end of their optimizer step (the loop state says "mid-phase").

Reading: `find_resume` lists every candidate (step files, a legacy real ``last.ckpt``, Lightning's SLURM
``hpc_ckpt_N.ckpt``), checks each (a torch zip whose central directory reads; a distributed checkpoint whose
``.metadata``, ``meta.pt`` and every shard byte range it names are present) and returns the newest complete one,
with a warning for every newer one it skipped. `load_model_weights` reads the model's weights (moxin names)
from a ``.ckpt`` file, a distributed-checkpoint folder (without a process group), a Hugging Face folder or a
safetensors file, with the model config that produced them when the source records it.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from moxin.config import InitFromError, ModelConfig, MoxinUserError, check_init_from
from moxin.model import lora

log = logging.getLogger(__name__)

LAST = "last.ckpt"
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step(\d+)\.ckpt$")
_DCP_META = "meta.pt"  # Lightning's ModelParallelStrategy writes the non-tensor part here


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


class DiskSpaceError(CheckpointError, MoxinUserError):
    """The checkpoint folder's disk cannot hold the next checkpoint."""


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About how many bytes one checkpoint of `module` takes, over all ranks: every parameter and buffer (a
    sharded parameter counts whole: a DTensor's numel is the global one) plus AdamW's two moments per trainable
    parameter, in the parameters' own dtype."""
    if lora.has_lora(module):  # a LoRA checkpoint: the adapters and their moments only
        return sum(3 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    weights = sum(t.numel() * t.element_size() for t in module.parameters())
    weights += sum(b.numel() * b.element_size() for b in module.buffers())
    moments = sum(2 * p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return weights + moments


def check_disk_space(ckpt_dir: Path, need: int, step: int) -> str | None:
    """None when `ckpt_dir`'s file system has room for a checkpoint of `need` bytes (and 2 % to spare), else the
    message. The previous checkpoint is deleted only after the new one is complete, so the new one must fit beside
    it."""
    d = ckpt_dir
    while not d.exists() and d != d.parent:
        d = d.parent
    free = shutil.disk_usage(d).free
    if free >= need * 1.02 + 16 * 2**20:
        return None
    gb = 2**30
    return (f"no room for the checkpoint of step {step} in {ckpt_dir}: it needs about {need / gb:.1f} GiB (weights "
            f"and optimizer moments) and {free / gb:.1f} GiB are free there. Free space on that disk, or give the "
            "run an out_dir on a larger one (resume=auto continues from the last complete checkpoint); with "
            "trainer.keep_all_checkpoints=true or trainer.keep_checkpoints > 1 older step checkpoints stay, so "
            "some can go")


def step_name(step: int) -> str:
    return f"step{step:06d}.ckpt"


def _warn(msg: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(msg)


# ---- inspecting a checkpoint --------------------------------------------------------------------------------
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
    if not (path / _DCP_META).is_file():
        raise CheckpointError(f"{path}: no {_DCP_META} (loop and data state missing; the save was interrupted)")
    from torch.distributed.checkpoint import FileSystemReader

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
            ckpt = torch.load(p / _DCP_META, map_location="cpu", weights_only=True)
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


def candidates(out_dir: Path) -> list[Path]:
    """Every checkpoint a run folder may hold: step files (the policy), a real (pre-policy) last.ckpt or
    last-vN.ckpt, and Lightning's SLURM requeue checkpoints hpc_ckpt_N.ckpt."""
    ckpt_dir = out_dir / "checkpoints"
    found: list[Path] = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith("."):
                continue
            if _STEP_RE.match(p.name) or (p.name.startswith("last") and p.name.endswith(".ckpt") and not p.is_symlink()):
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


# ---- the run lock --------------------------------------------------------------------------------------------
class RunLockError(MoxinUserError, RuntimeError):
    """Another launch holds the run folder; the message names it and what to do."""


class RunLock:
    """An exclusive `flock` on ``<out_dir>/.lock`` for the life of a run: a second run with the same
    run_name / out_dir stops at once, naming the holder, instead of writing into the same checkpoints. The
    kernel drops the lock when the process dies (a killed run never leaves a stale lock)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # a file system without flock
                _warn(f"{self.path}: this file system has no flock ({e.strerror}); running without the run lock, "
                      "so make sure no other run uses this out_dir")
                return self
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockError(
                    f"{self.path.parent} is in use by another run ({holder or 'unknown process'}). Wait for it to "
                    "finish, or choose another run_name=... / out_dir=...") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def launcher_rank() -> int:
    """Global rank from the launcher's environment (torchrun, SLURM, Lightning's subprocess launcher) before
    any process group exists; 0 for a plain process (which is the one Lightning's launcher starts first)."""
    for k in ("RANK", "SLURM_PROCID"):
        if os.environ.get(k, "").isdigit():
            return int(os.environ[k])
    if os.environ.get("LOCAL_RANK", "").isdigit() and os.environ.get("NODE_RANK", "0") == "0":
        return int(os.environ["LOCAL_RANK"])
    return 0


# ---- writing -------------------------------------------------------------------------------------------------
def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def point_last(ckpt_dir: Path, name: str) -> None:
    """Atomically make ``last.ckpt`` a relative symlink to `name` (a pre-policy real last.ckpt is renamed to
    last-legacy.ckpt first, so it stays a candidate until retention removes it)."""
    last = ckpt_dir / LAST
    if last.exists() and not last.is_symlink():
        legacy = ckpt_dir / "last-legacy.ckpt"
        if legacy.exists():
            shutil.rmtree(legacy) if legacy.is_dir() else legacy.unlink()
        os.rename(last, legacy)
    tmp = ckpt_dir / f"{TMP_PREFIX}last-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, last)
    _fsync_dir(ckpt_dir)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        # rename first so that a kill half-way through leaves a '.trash-' (cleaned at start), never a partial
        # checkpoint under a valid name
        trash = p.with_name(f".trash-{p.name}-{os.getpid()}")
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def apply_retention(ckpt_dir: Path, keep_name: str, keep_all: bool, keep: int = 1) -> list[str]:
    """Delete step files (and pre-policy last-*.ckpt files) other than `keep_name` (what last.ckpt points to) and
    the newest `keep` step files, unless keep_all."""
    if keep_all:
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if _STEP_RE.match(p.name)),
                   key=lambda p: int(_STEP_RE.match(p.name).group(1)))
    kept = {keep_name} | {p.name for p in steps[len(steps) - max(1, int(keep)):]}
    removed = []
    for p in ckpt_dir.iterdir():
        if p.name in kept or p.name == LAST or p.name.startswith("."):
            continue
        if _STEP_RE.match(p.name) or (p.name.startswith("last") and p.name.endswith(".ckpt")):
            _remove(p)
            removed.append(p.name)
    return removed


def weights_finite(stage) -> bool:
    """Every parameter finite, on every rank (FSDP2 shards are checked locally, then all-reduced)."""
    ok = True
    with torch.no_grad():
        for p in stage.parameters():
            if not p.requires_grad:  # frozen weights (a LoRA base, DPO's reference) never change
                continue
            t = p.to_local() if hasattr(p, "to_local") else p
            if t.numel() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    trainer = getattr(stage, "_trainer", None)
    if trainer is not None and trainer.world_size > 1:
        ok = bool(trainer.strategy.reduce_boolean_decision(ok, all=True))
    return ok


class CheckpointPolicy(L.Callback):
    """Writes checkpoints as described in the module docstring."""

    def __init__(self, ckpt_dir: str | os.PathLike, every_n_steps: int | None, keep_all: bool, enabled: bool = True,
                 keep: int = 1):
        self.enabled = bool(enabled)  # False (trainer.save_checkpoints=false): nothing is written, nor checked
        self.ckpt_dir = Path(ckpt_dir)
        self.every = int(every_n_steps or 0)
        self.keep_all = bool(keep_all)
        self.keep = max(1, int(keep))  # trainer.keep_checkpoints: the newest step checkpoints kept
        self.last_saved_step: int | None = None
        self.last_path: Path | None = None
        self.refused: list[int] = []  # steps not saved because the weights were not finite
        self._finished = False
        self._pending: tuple[Path, str] | None = None  # written, not yet published: (temporary, final name)
        self._pending_final = False  # ... and it is the run's final checkpoint
        self._stepped_at_save = 0  # Lightning's count of stepped batches when it was written

    @staticmethod
    def _phase_done(trainer) -> bool:
        """The phase's loader is exhausted (Lightning's fetcher looks one batch ahead, so this is known on the
        last batch already); False when trainer.max_steps stopped the run mid-phase."""
        return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    @staticmethod
    def _last_phase(trainer) -> bool:
        return trainer.current_epoch + 1 >= (trainer.max_epochs or 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.automatic_optimization and (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid accumulation window: no optimizer step yet
        step = trainer.global_step
        if step == 0 or step == self.last_saved_step or self._phase_done(trainer):
            return  # a phase end is saved at on_train_epoch_end, after its validation
        stopping = 0 < trainer.max_steps <= step
        if stopping or (self.every and step % self.every == 0):
            self.save(trainer, pl_module, publish=False)  # published once the step is logged (module docstring)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.publish(trainer)  # the previous step and its validation are logged by now

    def on_train_epoch_end(self, trainer, pl_module):
        self.publish(trainer)
        step = trainer.global_step
        if step and step != self.last_saved_step and self._phase_done(trainer):
            # its step, validation and (the policy being the last callback) samples and evaluation are logged;
            # the run's final checkpoint waits for on_train_end, where an evaluation of the stage may follow
            self.save_phase_end(trainer, pl_module, publish=not self._last_phase(trainer))

    def on_train_end(self, trainer, pl_module):
        self.publish(trainer)  # after the other callbacks' on_train_end (moxin.run puts this callback last)

    def on_exception(self, trainer, pl_module, exception):
        """A failure between the write and the publish (no collective here: the other ranks may not be in this
        hook). Where Lightning had finished the checkpoint's optimizer step (logged, validated: its counter of
        stepped batches moved on, as when SIGTERM or Ctrl-C stops it at the step's end or in the next fetch), the
        checkpoint is published; otherwise it is dropped and the previous one stays last. A run's final
        checkpoint is always dropped: published, it would say "finished" to a run whose stage evaluation failed
        and whose HF export never ran."""
        pending, self._pending = self._pending, None
        if pending is None or not trainer.is_global_zero:
            return
        tmp, name = pending
        stepped = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
        if not self._pending_final and stepped is not None and stepped > self._stepped_at_save:
            self._publish_files(trainer, tmp, name)
            self.last_path = self.ckpt_dir / name
        elif tmp.exists() or tmp.is_symlink():
            _remove(tmp)

    def save_phase_end(self, trainer, pl_module, publish: bool) -> Path | None:
        """Save the phase's last step; the run's final checkpoint records that the run is finished."""
        self._finished = self._last_phase(trainer)
        try:
            return self.save(trainer, pl_module, publish=publish)
        finally:
            self._finished = False

    def _ensure_room(self, trainer, pl_module, step: int) -> None:
        """Refuse, with the sizes, where the disk cannot hold the next checkpoint (torch's own error for a full
        disk is ``inline_container.cc: unexpected pos``). Every rank takes the same decision (a shared folder
        looks the same from every rank; node-local disks are reduced), so no rank waits in a collective."""
        problem = check_disk_space(self.ckpt_dir, checkpoint_bytes(pl_module), step)
        if trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            return
        raise DiskSpaceError(problem or f"no room for the checkpoint of step {step} on another rank's disk "
                             f"({self.ckpt_dir})")

    def on_train_start(self, trainer, pl_module):
        # before the first step: a run whose first checkpoint cannot be written stops now, not hours later
        if self.enabled:
            self._ensure_room(trainer, pl_module, trainer.global_step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        # a finished run's last checkpoint says so: resume=auto then has nothing left to do
        checkpoint.setdefault("moxin", {})["finished"] = self._finished

    def save(self, trainer, pl_module, publish: bool = True) -> Path | None:
        """Write the checkpoint of this optimizer step under a temporary name (every rank) and, with `publish`,
        publish it now; otherwise `publish` does it at the next hook where the step is logged. Returns the name
        it has (or will have) once published, None where nothing is written."""
        self.publish(trainer)  # one written earlier goes first
        step = trainer.global_step
        self.last_saved_step = step
        if not self.enabled:
            return None
        if not weights_finite(pl_module):
            self.refused.append(step)
            _warn(f"step {step}: the weights hold NaN/Inf; no checkpoint written (last.ckpt stays at the last good "
                  "one)")
            return None
        self._ensure_room(trainer, pl_module, step)
        name = step_name(step)
        tmp = self.ckpt_dir / f"{TMP_PREFIX}{name}"
        if trainer.is_global_zero:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                _remove(tmp)
        trainer.strategy.barrier("moxin.checkpoint.pre")
        # all of it (optimizer, loops: not weights only, which Lightning otherwise logs it assumed); collective
        # under FSDP2, ends with a barrier
        trainer.save_checkpoint(str(tmp), weights_only=False)
        self._pending = (tmp, name)
        self._pending_final = self._finished
        self._stepped_at_save = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", 0)
        if publish:
            self.publish(trainer)
        return self.ckpt_dir / name

    def publish(self, trainer) -> Path | None:
        """Steps 2-4 of the module docstring for the checkpoint `save` wrote, after the loggers flush (every rank
        calls it: it ends with a barrier). Nothing to do where no checkpoint waits."""
        if self._pending is None:
            return None
        (tmp, name), self._pending = self._pending, None
        if trainer.is_global_zero:
            self._publish_files(trainer, tmp, name)
        trainer.strategy.barrier("moxin.checkpoint.post")
        self.last_path = self.ckpt_dir / name
        return self.last_path

    def _publish_files(self, trainer, tmp: Path, name: str) -> None:
        """Rank zero's part of publishing: the loggers flush, then rename, switch last.ckpt, retire."""
        for logger in trainer.loggers:  # the step's rows on disk before its checkpoint becomes last
            logger.save()
        final = self.ckpt_dir / name
        if tmp.is_dir():
            _fsync_dir(tmp)
            if final.exists():  # the same step saved again (resumed at a checkpoint step): replace it
                _remove(final)
            os.rename(tmp, final)
        else:
            os.replace(tmp, final)
        _fsync_dir(self.ckpt_dir)
        point_last(self.ckpt_dir, name)
        apply_retention(self.ckpt_dir, name, self.keep_all, self.keep)


class StopOnSignal(L.Callback):
    """On SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@120`` sends every task before the time limit): finish the
    optimizer step in progress, save a checkpoint through the policy, stop, and at ``on_train_end`` (the step
    logged, the checkpoint published: last.ckpt switched, so resume=auto continues exactly there) requeue the job
    when running under SLURM. The handler only
    sets a flag; the ranks agree on it at the step boundary (one tiny all-reduce per step when distributed), so
    every rank saves the same step. Lightning's own requeue (SLURMEnvironment(auto_requeue=True)) saves inside
    the signal handler, mid-step, to hpc_ckpt_N.ckpt; run.py turns it off in favour of this."""

    def __init__(self, policy: CheckpointPolicy, signum: int | None = None):
        import signal

        self.policy = policy
        self.signum = signum if signum is not None else signal.SIGUSR1
        self.received = False
        self.stopped_at: int | None = None
        self.requeued = False
        self._previous = None
        self._install()  # from construction on: a signal during start-up is honoured at the first step

    def _handler(self, signum, frame):
        self.received = True

    def _install(self):
        import signal
        import threading

        if self._previous is None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def on_train_start(self, trainer, pl_module):
        self._install()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.automatic_optimization and (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        flag = self.received
        if trainer.world_size > 1:
            flag = bool(trainer.strategy.reduce_boolean_decision(flag, all=False))
        if not flag or self.stopped_at is not None:
            return
        step = trainer.global_step
        if self.policy.last_saved_step != step:
            if self.policy._phase_done(trainer):  # the phase's last step: save with the loop state "phase done"
                self.policy.save_phase_end(trainer, pl_module, publish=False)
            else:
                self.policy.save(trainer, pl_module, publish=False)
        self.stopped_at = step
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        import signal

        if self.stopped_at is not None:
            # the step is logged now: publish its checkpoint, then requeue (scontrol requeue ends this job)
            self.policy.publish(trainer)
            self._report_and_requeue(trainer)
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _report_and_requeue(self, trainer) -> None:
        step = self.stopped_at
        if trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID")
            if os.environ.get("SLURM_ARRAY_JOB_ID"):
                job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
            msg = f"signal {self.signum}: saved optimizer step {step} ({self.policy.last_path}); stopping"
            if job:
                import subprocess

                res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                self.requeued = res.returncode == 0
                msg += (f"; job {job} requeued (it continues with resume=auto)" if self.requeued else
                        f"; `scontrol requeue {job}` failed: {res.stderr.strip()}")
            print(msg, file=sys.stderr, flush=True)


# ---- reading weights for init_from / conversion ------------------------------------------------------------
def _strip_model_prefix(sd: dict) -> dict:
    out = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    return out or sd


def load_distributed_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a distributed checkpoint folder, full (unsharded) on the CPU, read without a
    process group: DCP reshards any saved layout into one. Optimizer shards are not read."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    check_distributed(path)
    reader = FileSystemReader(str(path))
    md = reader.read_metadata()
    sd: dict[str, Any] = {}
    for key, meta in md.state_dict_metadata.items():
        if key.startswith("state_dict.") and isinstance(meta, TensorStorageMetadata):
            sd[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not sd:
        raise CheckpointError(f"{path}: no model tensors (state_dict.*) in this distributed checkpoint")
    load(sd, storage_reader=reader, no_dist=True)
    return _strip_model_prefix({k[len("state_dict."):]: v for k, v in sd.items()})


def load_model_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any, str]:
    """(moxin-named tensors, the ModelConfig that produced them or None when the source does not record one,
    a description of the source) from a moxin .ckpt, a distributed-checkpoint folder, a run's checkpoints
    folder or run folder, a Hugging Face folder or a safetensors file."""
    check_init_from(path)
    p = Path(path)
    if lora.is_peft_adapter(p):  # a PEFT LoRA adapter: its base (adapter_config.json) with the adapter merged in
        base = json.loads((p / lora.ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not base or not Path(base).exists():
            raise InitFromError(f"init_from={str(path)!r} is a LoRA adapter whose base_model_name_or_path "
                                f"({base!r}, in {p / lora.ADAPTER_CONFIG}) is not a local folder: set it to the "
                                "base model's Hugging Face folder (or a moxin checkpoint) and retry")
        sd, cfg, what = load_model_weights(base)
        return lora.merge_peft_adapter(sd, p), cfg, f"LoRA adapter {p} merged into {what}"
    if p.is_dir() and not (p / ".metadata").exists():
        if (p / "config.json").exists():
            from moxin.model.hf import hf_to_moxin_config, load_hf

            cfg = hf_to_moxin_config(json.loads((p / "config.json").read_text()), source=str(p / "config.json"))
            return load_hf(p).state_dict(), cfg, f"Hugging Face folder {p}"
        for sub in (p / LAST, p / "checkpoints" / LAST):
            if sub.exists():
                return load_model_weights(sub)
        raise InitFromError(f"init_from={str(path)!r}: no config.json (Hugging Face), .metadata (distributed "
                            "checkpoint) or last.ckpt inside")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p)), None, f"safetensors file {p}"
    info = read_info(p)
    mc = info.moxin.get("model_config")
    cfg = ModelConfig(**{k: v for k, v in mc.items() if k in {f.name for f in dataclasses.fields(ModelConfig)}}) \
        if mc else None
    if p.is_dir():
        sd, what = load_distributed_weights(p), f"distributed checkpoint {p} (step {info.step})"
    else:
        ckpt = torch.load(str(p), map_location="cpu", weights_only=True)
        sd, what = _strip_model_prefix(ckpt.get("state_dict", ckpt)), f"checkpoint {p} (step {info.step})"
    saved_lora = info.moxin.get("lora")
    if saved_lora:  # a LoRA run's checkpoint holds its adapters: merged into the base that run started from
        base, _, base_what = load_model_weights(saved_lora["base"])
        lora.merge_adapters(base, lora.adapters_by_weight(sd), saved_lora["alpha"] / saved_lora["rank"], str(p))
        return base, cfg, f"{what}: LoRA adapters merged into {base_what}"
    return sd, cfg, what


# fields that change what the weights compute; max_seq_len, init_std and attn_backend do not
ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "norm_eps",
               "rope_theta", "sliding_window", "tie_embeddings")


def config_mismatches(ours, theirs) -> list[str]:
    out = []
    for f in ARCH_FIELDS:
        a, b = getattr(ours, f), getattr(theirs, f)
        same = math.isclose(a, b, rel_tol=1e-9) if isinstance(a, float) and isinstance(b, float) else a == b
        if not same:
            out.append(f"{f}: model.{f}={a!r} here, {b!r} in the source")
    return out


# ---- HF export from any strategy ---------------------------------------------------------------------------
def export_hf(stage, hf_dir: str | os.PathLike, *, is_global_zero: bool, max_shard_bytes: int = 5 * 1024**3,
              tokenizer_files: list[str] | None = None) -> Path | None:
    """Write the stage's model as a Hugging Face folder. Under FSDP2 every rank must call this (each parameter
    is gathered with ``DTensor.full_tensor()``, a collective); rank 0 keeps at most one safetensors shard of
    gathered tensors in host memory, writes it and drops it. Returns the folder on rank 0, None elsewhere."""
    model = stage.model

    def gathered():
        if lora.has_lora(model):  # the merged model (W + alpha / r B A, fp32), gathered tensor by tensor
            for name, full in lora.merged_items(model):
                yield name, full if is_global_zero else None
            return
        for name, t in model.state_dict().items():
            full = t.full_tensor() if hasattr(t, "full_tensor") else t  # collective under FSDP2: all ranks
            yield name, full if is_global_zero else None

    from moxin.model.hf import write_hf

    out = write_hf(gathered(), model.cfg, hf_dir, is_global_zero=is_global_zero, max_shard_bytes=max_shard_bytes,
                   tokenizer_files=tokenizer_files)
    if lora.has_lora(model):  # and the adapters alone, in PEFT's format, for the base the run started from
        base = getattr(stage, "init_from", None)
        base = str(Path(base).resolve()) if base and Path(base).exists() else base
        lora.save_peft_adapter(model, Path(hf_dir).with_name(Path(hf_dir).name + "_adapter"), base,
                               is_global_zero=is_global_zero)
    return out
