"""One checkpoint policy for every strategy (`CheckpointPolicy`, a Lightning callback that replaces ModelCheckpoint).

1. every save goes to a new temporary name in the checkpoint folder (``.tmp-step000012.ckpt``);
2. once it is complete on every rank it is renamed to ``step000012.ckpt`` (a rename is atomic: that name never
   denotes a partial checkpoint);
3. ``last.ckpt`` is then switched to it atomically: a relative symlink replaced with ``os.replace``;
4. only then does the retention policy delete what it no longer keeps (the newest ``keep_checkpoints`` step
   checkpoints stay, 1 by default; ``keep_all_checkpoints=true``: all of them).

With ``trainer.async_checkpoint=true`` (FSDP2, `async_save.AsyncCheckpointStrategy`) step 1 returns while the
shards are still being written; steps 2-4 wait for the write: rank 0 publishes at the first step boundary where
it has finished, and every rank waits for it before the next save, at a phase end, at the end of fit and after a
signal-driven stop. A failure while it is in flight leaves the ``.tmp-`` folder (cleared at the next start).

Details: docs/modules.md, "checkpoint/policy.py".
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from moxin.checkpoint.async_save import AsyncCheckpointStrategy
from moxin.checkpoint.files import (LAST, STEP_RE, TMP_PREFIX, CheckpointError, fsync_dir, remove_checkpoint,
                                    step_name)
from moxin.config import MoxinUserError
from moxin.model import lora


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
    fsync_dir(ckpt_dir)


def apply_retention(ckpt_dir: Path, keep_name: str, keep_all: bool, keep: int = 1) -> list[str]:
    """Delete step files (and pre-policy last-*.ckpt files) other than `keep_name` (what last.ckpt points to) and
    the newest `keep` step files, unless keep_all."""
    if keep_all:
        return []
    steps = sorted((p for p in ckpt_dir.iterdir() if STEP_RE.match(p.name)),
                   key=lambda p: int(STEP_RE.match(p.name).group(1)))
    kept = {keep_name} | {p.name for p in steps[len(steps) - max(1, int(keep)):]}
    removed = []
    for p in ckpt_dir.iterdir():
        if p.name in kept or p.name == LAST or p.name.startswith("."):
            continue
        if STEP_RE.match(p.name) or (p.name.startswith("last") and p.name.endswith(".ckpt")):
            remove_checkpoint(p)
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
        self._publish_asked = False  # ... and `save` was asked to publish it at once (async: once written)
        self._published_early = False  # async: rank 0 published it at a step boundary, the other ranks not told

    @staticmethod
    def phase_done(trainer) -> bool:
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
        if step == 0 or step == self.last_saved_step or self.phase_done(trainer):
            return  # a phase end is saved at on_train_epoch_end, after its validation
        stopping = 0 < trainer.max_steps <= step
        if stopping or (self.every and step % self.every == 0):
            self.save(trainer, pl_module, publish=False)  # published once the step is logged (module docstring)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # the previous step and its validation are logged by now
        if self._async(trainer) is not None:
            self._publish_if_written(trainer)  # no collective: training goes on while the shards are written
        else:
            self.publish(trainer)

    @staticmethod
    def _async(trainer) -> AsyncCheckpointStrategy | None:
        s = trainer.strategy
        return s if isinstance(s, AsyncCheckpointStrategy) else None

    def _publish_if_written(self, trainer) -> None:
        """Async saves: rank 0 publishes the pending checkpoint once its write has finished (rank 0 coordinates
        the save and writes ``.metadata`` after every rank's shards: its future done means the folder is complete).
        The other ranks learn of it at the next collective `publish`."""
        if self._pending is None or self._published_early or not trainer.is_global_zero:
            return
        saver = self._async(trainer)
        if not saver.checkpoint_written():
            return
        saver.wait_checkpoint()  # done: returns at once, or raises the write's error
        tmp, name = self._pending
        self._publish_files(trainer, tmp, name)
        self._published_early = True
        self.last_path = self.ckpt_dir / name

    def on_train_epoch_end(self, trainer, pl_module):
        self.publish(trainer)
        step = trainer.global_step
        if step and step != self.last_saved_step and self.phase_done(trainer):
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
        if pending is None or not trainer.is_global_zero or self._published_early:
            return
        tmp, name = pending
        saver = self._async(trainer)
        if saver is not None:
            if not saver.checkpoint_written():
                return  # still being written (and so not published): the folder stays a .tmp- one
            try:
                saver.wait_checkpoint()
            except Exception:  # noqa: BLE001 - a failed write is dropped like an unfinished one
                remove_checkpoint(tmp)
                return
        stepped = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_batches_that_stepped", None)
        done = self._publish_asked or (stepped is not None and stepped > self._stepped_at_save)
        if not self._pending_final and done:
            self._publish_files(trainer, tmp, name)
            self.last_path = self.ckpt_dir / name
        elif tmp.exists() or tmp.is_symlink():
            remove_checkpoint(tmp)

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
            rank_zero_warn(f"step {step}: the weights hold NaN/Inf; no checkpoint written (last.ckpt stays at the last "
                           "good one)")
            return None
        self._ensure_room(trainer, pl_module, step)
        name = step_name(step)
        tmp = self.ckpt_dir / f"{TMP_PREFIX}{name}"
        if trainer.is_global_zero:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                remove_checkpoint(tmp)
        trainer.strategy.barrier("moxin.checkpoint.pre")
        # all of it (optimizer, loops: not weights only, which Lightning otherwise logs it assumed); collective
        # under FSDP2, ends with a barrier
        trainer.save_checkpoint(str(tmp), weights_only=False)
        self._pending = (tmp, name)
        self._pending_final = self._finished
        self._stepped_at_save = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", 0)
        self._publish_asked = publish
        self._published_early = False
        if publish and self._async(trainer) is None:  # async: once written (module docstring)
            self.publish(trainer)
        return self.ckpt_dir / name

    def publish(self, trainer) -> Path | None:
        """Steps 2-4 of the module docstring for the checkpoint `save` wrote, after the loggers flush (every rank
        calls it: it ends with a barrier; an async save is waited for first). Nothing to do where no checkpoint
        waits."""
        if self._pending is None:
            return None
        (tmp, name), self._pending = self._pending, None
        saver = self._async(trainer)
        if saver is not None:
            saver.wait_checkpoint()  # every rank: its shards written (rank 0: the whole folder)
        if trainer.is_global_zero and not self._published_early:
            self._publish_files(trainer, tmp, name)
        self._published_early = False
        trainer.strategy.barrier("moxin.checkpoint.post")
        self.last_path = self.ckpt_dir / name
        return self.last_path

    def _publish_files(self, trainer, tmp: Path, name: str) -> None:
        """Rank zero's part of publishing: the loggers flush, then rename, switch last.ckpt, retire."""
        for logger in trainer.loggers:  # the step's rows on disk before its checkpoint becomes last
            logger.save()
        final = self.ckpt_dir / name
        if tmp.is_dir():
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (resumed at a checkpoint step): replace it
                remove_checkpoint(final)
            os.rename(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_dir(self.ckpt_dir)
        point_last(self.ckpt_dir, name)
        apply_retention(self.ckpt_dir, name, self.keep_all, self.keep)
