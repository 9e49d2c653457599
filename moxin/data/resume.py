"""The resume helper: a ``StatefulDataLoader`` whose state is that of the batches the model has consumed.

Lightning's fit loop saves the train loader's ``state_dict()`` in the checkpoint
(``loops.fit_loop.state_dict.combined_loader``) and loads it into the rebuilt loader on restart. Its fetcher runs
one batch ahead of the training step (to know which batch is the last), so the plain loader state at checkpoint
time already counts a batch that was never trained on, and a resumed run would skip it.
"""

from __future__ import annotations

from torchdata.stateful_dataloader import StatefulDataLoader

from moxin.config import DataError

__all__ = ["ConsumedStateLoader", "rescale_sampler_position"]


class ConsumedStateLoader(StatefulDataLoader):
    """A StatefulDataLoader whose `state_dict()` describes the batches the MODEL has consumed.

    We record the loader state after every yielded batch and answer with the one matching `consumed`, which the
    data module advances as each batch reaches the training step (`on_before_batch_transfer`)."""

    def __init__(self, *args, ignore_restored_state: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.ignore_restored_state = ignore_restored_state
        self._states: dict[int, dict] = {}
        self._yielded = 0
        self.consumed = 0

    def __iter__(self):
        it = super().__iter__()
        self._yielded = self.consumed = 0
        self._states = {0: super().state_dict()}
        return self._track(it)

    def _track(self, it):
        for batch in it:
            self._yielded += 1
            self._states[self._yielded] = super().state_dict()
            self._states.pop(self._yielded - 4, None)  # the fetcher is never more than a batch or two ahead
            yield batch

    def load_state_dict(self, state_dict):
        """Lightning's restore of the loader's state, skipped for a loader whose dataset takes its position from
        the data module (a redistributed layout: the saved loader is another one's, moxin/data/reshard.py)."""
        if not self.ignore_restored_state:
            super().load_state_dict(state_dict)

    def state_dict(self):
        if self._yielded and self.consumed in self._states:
            return self._states[self.consumed]
        return super().state_dict()


def rescale_sampler_position(state: dict, saved_accumulate: int, accumulate: int) -> None:
    """A map-style ``StatefulDataLoader`` state (a step sampler's position counted in this rank's micro-batches)
    moved, in place, to another accumulation: ``k`` whole optimizer steps of ``saved_accumulate`` micro-batches
    become ``k`` steps of ``accumulate``. The step sampler gives every global step the same items on any process
    count (moxin/data/step_batches.py), so the resumed loader starts at the straight run's next step.

    Both of torchdata's forms: one process (``_num_yielded``) and with workers (``_snapshot``, where the next
    worker to yield follows from the count)."""
    def moved(n: int) -> int:
        if n % saved_accumulate:
            raise DataError(f"the data loader stands at micro-batch {n}, inside an optimizer step of "
                             f"{saved_accumulate}: it cannot be resumed with another process count")
        return n // saved_accumulate * accumulate

    snap = state.get("_snapshot")
    if snap is None:
        state["_sampler_iter_yielded"] = moved(state["_sampler_iter_yielded"])
        state["_num_yielded"] = moved(state["_num_yielded"])
        return
    if snap.get("_main_snapshot") is None or state.get("_steps_since_snapshot", 0):
        raise DataError("the data loader's saved state is not at a snapshot; it cannot be resumed with another "
                         "process count")
    main = snap["_main_snapshot"]
    main["_sampler_iter_yielded"] = moved(main["_sampler_iter_yielded"])
    snap["_snapshot_step"] = n = moved(snap["_snapshot_step"])
    workers = int(main["_num_workers"])
    snap["_last_yielded_worker_id"] = (n - 1) % workers
