"""Progress in moxin's terms: optimizer steps out of the run's total, the phase by name, target tokens, loss,
tokens/s and ETA.

Lightning's bars count micro-batches of an epoch ("32/--" for our iterable loaders, no total, no ETA), call
every phase "Epoch i/n" and show "v_num". Two displays replace them:

* :class:`StepProgress` prints one plain line every ``every`` optimizer steps (and at the last step), for
  output that is not a terminal (nohup, SLURM logs, CI) where a redrawn bar shows nothing until the end; on a
  terminal with the rich bar it writes the same lines into the run's log file only;
* :class:`PhaseRichBar`, Lightning's rich bar with the phase name as description, the phase's micro-batch total
  (so it has an end and an ETA) and the step/tokens/tok/s/ETA fields instead of v_num.
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar


def _fmt_time(s: float | None) -> str:
    if s is None or s != s or s == float("inf"):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _fmt_num(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class StepClock:
    """Optimizer steps done, phase, and an ETA from the steps this launch has timed (a resumed run does not
    count the steps it skipped as fast ones)."""

    def __init__(self, phases: list[str], steps: list[int], stop_step: int):
        self.phases, self.steps, self.stop_step = phases, steps, stop_step
        self._t0: float | None = None
        self._s0 = 0

    def phase_of(self, step: int) -> tuple[int, str]:
        acc = 0
        for i, n in enumerate(self.steps):
            acc += n
            if step < acc:
                return i, self.phases[i]
        return len(self.steps) - 1, self.phases[-1]

    def tick(self, step: int) -> float | None:
        """ETA in seconds after `step` optimizer steps (None until two steps were timed)."""
        now = time.perf_counter()
        if self._t0 is None:
            self._t0, self._s0 = now, step
            return None
        done = step - self._s0
        if done <= 0:
            return None
        return (now - self._t0) / done * max(self.stop_step - step, 0)


def step_fields(trainer, pl_module, clock: StepClock, eta: float | None) -> dict[str, str]:
    m = trainer.callback_metrics
    out = {"step": f"{trainer.global_step}/{clock.stop_step}"}
    idx, name = clock.phase_of(max(trainer.global_step - 1, 0))
    out["phase"] = f"{name} ({idx + 1}/{len(clock.phases)})"
    tokens = getattr(pl_module, "tokens_seen", None)
    if tokens:
        out["tokens"] = _fmt_num(tokens)
    for key, label in (("loss", "loss"), ("train/loss", "loss"), ("reward", "reward"), ("val/loss", "val")):
        if key in m and label not in out and m[key].numel() == 1:
            out[label] = f"{float(m[key]):.4f}"
    tps = m.get("train/tokens_per_s")
    if tps is not None:
        out["tok/s"] = _fmt_num(float(tps))
    out["ETA"] = _fmt_time(eta)
    return out


class StepProgress(L.Callback):
    """One line every `every` optimizer steps on rank zero: to stdout (`to_console`) and/or the run log. Its
    loss is the mean over the steps since the previous line (torchmetrics' MeanMetric)."""

    def __init__(self, clock: StepClock, every: int = 10, to_console: bool = True):
        from torchmetrics.aggregation import MeanMetric

        self.clock, self.every, self.to_console = clock, max(1, int(every)), to_console
        self._last = -1
        self._started = 0.0
        # the loss printed is the mean over the steps since the previous line, not the last step's (noisy) one.
        # Local to rank zero (train/loss is already reduced over ranks): a syncing compute() here would be a
        # collective that only rank zero enters, and hang every multi-process run at its first line.
        self._loss = MeanMetric(sync_on_compute=False)

    def on_train_start(self, trainer, pl_module):
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == self._last or step == 0 or not trainer.is_global_zero:
            return  # still accumulating
        self._last = step
        from moxin.ui import note_step

        note_step(step)
        eta = self.clock.tick(step)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and loss.numel() == 1:
            self._loss.update(loss.detach().float().cpu())
        if step % self.every and step != self.clock.stop_step and step != 1:
            return
        f = step_fields(trainer, pl_module, self.clock, eta)
        if self._loss.update_count:
            f["loss"] = f"{float(self._loss.compute()):.4f}"
            self._loss.reset()
        line = " | ".join([f"step {f.pop('step')}"] + [f"{k} {v}" for k, v in f.items()]
                          + [f"elapsed {_fmt_time(time.perf_counter() - self._started)}"])
        if self.to_console:
            print(line, flush=True)
        else:
            from moxin.ui import run_log

            run_log().write_line(line)


class PhaseRichBar(RichProgressBar):
    """Lightning's rich bar, in moxin's terms (see the module docstring)."""

    def __init__(self, clock: StepClock, accumulate: int, **kw):
        super().__init__(**kw)
        self.clock, self.accumulate = clock, accumulate
        self._eta = None
        self._last = -1

    @property
    def total_train_batches(self):
        idx = min(self.trainer.current_epoch, len(self.clock.steps) - 1)
        return self.clock.steps[idx] * self.accumulate

    def _get_train_description(self, current_epoch: int) -> str:
        idx = min(current_epoch, len(self.clock.phases) - 1)
        return f"phase {self.clock.phases[idx]} ({idx + 1}/{len(self.clock.phases)})"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._last:
            self._last = trainer.global_step
            self._eta = self.clock.tick(trainer.global_step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        f = step_fields(trainer, pl_module, self.clock, self._eta)
        f.pop("phase")
        return f


class InterruptNotice(L.Callback):
    """On Ctrl-C, say where the run stood and print the command that continues it (what gets saved on an
    interrupt is the checkpoint logic's business, not this callback's)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            from moxin.ui import interrupted_message, note_interrupt

            note_interrupt()
            print(interrupted_message(self.cfg, trainer), file=sys.__stderr__, flush=True)


def progress_callbacks(cfg, plan: dict, accumulate: int) -> tuple[list[L.Callback], bool]:
    """The progress callbacks for `trainer.progress_bar` and whether Lightning's progress bar must stay
    enabled (it must exactly when a ProgressBar callback is given)."""
    mode = cfg.trainer.progress_bar
    every = int(cfg.trainer.get("progress_every_n_steps", 10))
    clock = StepClock(plan["phases"], plan["steps"], plan["stop_step"])
    rich = mode == "rich_always" or (mode == "rich" and sys.stdout.isatty())
    notice = InterruptNotice(cfg)
    if mode == "none":
        return [StepProgress(clock, every, to_console=False), notice], False
    if rich:
        return [PhaseRichBar(clock, accumulate, leave=True), StepProgress(clock, every, to_console=False),
                notice], True
    return [StepProgress(clock, every, to_console=True), notice], False
