"""The run lock (one run per out_dir) and `launcher_rank`, the one rank helper for the time before a process
group exists (the lock, the resume notice and the run's log file are the first process's)."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_warn

from moxin.config import MoxinUserError


def launcher_rank() -> int | None:
    """This process's global rank as its launcher set it, before any process group exists; 0 is the first process.

    ``RANK`` first: torchrun (and any launcher that knows the global rank) sets it. ``LOCAL_RANK`` without ``RANK``
    means Lightning's own launcher started this process on node ``NODE_RANK`` (it sets no ``RANK``): a rank within
    the node, so the global rank only on the first node; a ``SLURM_PROCID`` seen then is the shell's that ran the
    launcher (``srun --pty bash``), shared by all its processes. ``SLURM_PROCID`` next: srun starts one task a
    process. None (not 0) where the rank cannot be known yet: a process of a later node under Lightning's
    launcher. A plain process is 0 (the one Lightning's launcher starts first)."""
    node = os.environ.get("NODE_RANK", "0")
    later_node = node.isdigit() and int(node) > 0
    if os.environ.get("RANK", "").isdigit():
        return int(os.environ["RANK"])
    if os.environ.get("LOCAL_RANK", "").isdigit():
        return None if later_node else int(os.environ["LOCAL_RANK"])
    if os.environ.get("SLURM_PROCID", "").isdigit():
        return int(os.environ["SLURM_PROCID"])
    return None if later_node else 0


class RunLockError(MoxinUserError, RuntimeError):
    """Another live run holds this out_dir; the message names it and what to do."""


class RunLock:
    """An exclusive `flock` on ``<out_dir>/.lock`` for the life of a run: a second run with the same
    run_name / out_dir stops at once, naming the holder, instead of writing into the same checkpoints. The
    kernel drops the lock when the process dies (a killed run never leaves a stale lock)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir) / ".lock"
        self.fd: int | None = None

    def __enter__(self):
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
                rank_zero_warn(f"{self.path}: this file system has no flock ({e.strerror}); running without the run "
                               "lock, so make sure no other run uses this out_dir")
                return self
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockError(
                    f"{self.path.parent} is in use by another run ({holder or 'unknown process'}). Wait for it to "
                    "finish, or choose another run_name=... / out_dir=...") from None
            raise
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
