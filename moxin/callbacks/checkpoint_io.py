"""Checkpoints written atomically: to a temporary file in the same folder, fsynced, then renamed over the
final name, so a crash mid-write leaves the previous checkpoint intact and never a truncated one. Loading
uses `torch.load(weights_only=True)`. Files get the mode an ordinary `open` would give (0644 under the usual umask),
not mkstemp's private 0600, so the people sharing a run folder can read its checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from moxin.model.hf import FILE_MODE


class AtomicCheckpointIO(TorchCheckpointIO):
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
