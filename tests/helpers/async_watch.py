"""A moxin run (FSDP2 on CPU processes) whose async checkpoint writes are held back until training has gone on for
two more step boundaries (or reached a phase end or its end, where the policy waits for them), with a callback that records, at every step boundary on rank 0, the save in flight and
where ``last.ckpt`` points (and whether that folder is complete). Writes the records to JSON. Used by
tests/test_async_checkpoint.py.

    torchrun --nproc_per_node 2 tests/helpers/async_watch.py OUT.json OVERRIDE...

With SIGNAL_AT=N in the environment, the run gets StopOnSignal's SIGUSR1 flag at the end of optimizer step N (as
the handler would set it), so it saves that step, stops and publishes it at the end of fit.
"""

import json
import os
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import lightning as L

import moxin.checkpoint.async_save as async_save_module
from moxin import run as R
from moxin.checkpoint.files import CheckpointError, read_info
from moxin.checkpoint.signals import StopOnSignal
from compose import compose_config

HOLD_BOUNDARIES = 2  # step boundaries a write is held back for


class Gate:
    """Each async_save's future completes only once the real write has and `release()` was called."""

    def __init__(self):
        self.released = threading.Event()
        self.real = async_save_module.async_save

    def async_save(self, *args, **kwargs) -> Future:
        self.released.clear()
        real, gated = self.real(*args, **kwargs), Future()

        def finish():
            try:
                result = real.result()
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                self.released.wait()
                gated.set_exception(e)
                return
            self.released.wait()
            gated.set_result(result)

        threading.Thread(target=finish, daemon=True).start()
        return gated


class Watch(L.Callback):
    def __init__(self, gate: Gate):
        self.gate = gate
        self.records: list[dict] = []
        self.seen_pending = 0

    def _record(self, trainer, pl_module, where: str) -> None:
        s = trainer.strategy
        pending = s.pending_path.name.removeprefix(".tmp-") if s.pending_path is not None else None
        ck = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        last = os.readlink(ck) if ck.is_symlink() else None
        try:
            complete = last is not None and read_info(ck).step >= 0
        except CheckpointError:
            complete = False
        written = s.checkpoint_written()
        self.records.append({"where": where, "step": trainer.global_step, "pending": pending, "written": written,
                             "last": last, "last_complete": complete,
                             "sharded": all(hasattr(p, "to_local") for p in pl_module.model.parameters())})
        if pending is not None and not written:
            self.seen_pending += 1
            if self.seen_pending >= HOLD_BOUNDARIES:
                self.seen_pending = 0
                self.gate.released.set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._record(trainer, pl_module, "end")
        if trainer.global_step == int(os.environ.get("SIGNAL_AT", -1)):
            next(c for c in trainer.callbacks if isinstance(c, StopOnSignal)).received = True

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, pl_module, "phase end")
        self.gate.released.set()  # the policy (after this callback) waits for the save in flight at a phase end

    def on_train_end(self, trainer, pl_module):
        self._record(trainer, pl_module, "train end")
        self.gate.released.set()  # and at the end of fit


def main(out_path, overrides):
    gate = Gate()
    async_save_module.async_save = gate.async_save
    watch = Watch(gate)
    original = L.Trainer.__init__

    def with_watch(self, *args, callbacks=None, **kwargs):  # first, so it sees each boundary before the policy
        original(self, *args, callbacks=[watch, *(callbacks or [])], **kwargs)

    L.Trainer.__init__ = with_watch
    R.train(compose_config(overrides), handoffs=False)
    if int(os.environ.get("RANK", 0)) == 0:
        Path(out_path).write_text(json.dumps(watch.records))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
