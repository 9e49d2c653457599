"""Progress in moxin's terms: steps out of the run's total (optimizer steps; GRPO: rollout steps), the phase by
name, target tokens, loss, tokens/s and one ETA for the whole run, in place of Lightning's per-epoch bars.

:class:`StepProgress` prints one plain line every ``every`` steps (for logs that are not a terminal);
:class:`PhaseRichBar` is Lightning's rich bar counting the run's steps, on one line within 80 columns.
"""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from rich.progress import BarColumn, TextColumn
from torchmetrics.aggregation import MeanMetric

from moxin.ui import current_plan, interrupted_message, note_interrupt, note_step, note_train_loss, run_log


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
    """Steps done, phase, and an ETA from the steps this launch has timed (a resumed run does not count the steps
    it skipped as fast ones). A step is an optimizer step (Lightning's ``global_step``), or for GRPO
    (``rollouts``) a rollout step: the stage's ``batches_seen``, since a rollout takes up to
    ppo_epochs x num_minibatches optimizer steps (none when every group had the same reward)."""

    def __init__(self, phases: list[str], steps: list[int], stop_step: int, rollouts: bool = False):
        self.phases, self.steps, self.stop_step, self.rollouts = phases, steps, stop_step, rollouts
        self._t0: float | None = None
        self._s0 = 0

    def step_of(self, trainer, pl_module) -> int:
        return int(pl_module.batches_seen) if self.rollouts else int(trainer.global_step)

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
    step = clock.step_of(trainer, pl_module)
    out = {"step": f"{step}/{clock.stop_step}"}
    if clock.rollouts:
        out["optimizer steps"] = str(trainer.global_step)
    idx, name = clock.phase_of(max(step - 1, 0))
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
        self.clock, self.every, self.to_console = clock, max(1, int(every)), to_console
        self._last = -1
        self._started = 0.0
        # the loss printed is the mean over the steps since the previous line, not the last step's (noisy) one.
        # Local to rank zero (train/loss is already reduced over ranks): a syncing compute() here would be a
        # collective that only rank zero enters, and hang every multi-process run at its first line.
        self._loss = MeanMetric(sync_on_compute=False)

    def on_train_start(self, trainer, pl_module):
        self._started = time.perf_counter()
        self._printed = -1
        self._first = None  # the first step of the loss window not printed yet
        self._eta = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = self.clock.step_of(trainer, pl_module)
        if step == self._last or step == 0 or not trainer.is_global_zero:
            return  # still accumulating
        self._last = step
        note_step(step)
        self._eta = self.clock.tick(step)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None and loss.numel() == 1:
            self._loss.update(loss.detach().float().cpu())
            self._first = step if self._first is None else self._first
        if step >= self.clock.stop_step:
            return  # the last line waits for the final validation (on_train_end), as the final table does
        if step % self.every and step != 1:
            return
        self._emit(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        step = self.clock.step_of(trainer, pl_module)
        if trainer.is_global_zero and step > 0 and step != self._printed:
            self._emit(trainer, pl_module, step)

    def _emit(self, trainer, pl_module, step: int) -> None:
        f = step_fields(trainer, pl_module, self.clock, self._eta if step < self.clock.stop_step else 0.0)
        if self._loss.update_count:
            f["loss"] = f"{float(self._loss.compute()):.4f}"
            # the final table shows the same number (the mean over these steps), not the last step's alone
            note_train_loss(float(self._loss.compute()), self._first or step, step)
            self._loss.reset()
            self._first = None
        self._printed = step
        line = " | ".join([f"step {f.pop('step')}"] + [f"{k} {v}" for k, v in f.items()]
                          + [f"elapsed {_fmt_time(time.perf_counter() - self._started)}"])
        if self.to_console:
            print(line, flush=True)
        else:
            run_log().write_line(line)


class PhaseRichBar(RichProgressBar):
    """Lightning's rich bar, in moxin's terms (see the module docstring): it counts the run's steps (each phase's
    bar starts where the previous one ended), the description is the phase, and the only time shown is the run's
    ETA (no per-phase elapsed / remaining, no it/s), so that one bar line fits 80 columns."""

    BAR_WIDTH = 12
    NAME_WIDTH = 12

    def __init__(self, clock: StepClock, accumulate: int, **kw):
        super().__init__(**kw)
        self.clock, self.accumulate = clock, accumulate
        self._eta = None
        self._last = -1

    @property
    def total_train_batches(self):
        return self.clock.stop_step

    def _get_train_description(self, current_epoch: int) -> str:
        idx = min(current_epoch, len(self.clock.phases) - 1)
        name = self.clock.phases[idx]
        name = name if len(name) <= self.NAME_WIDTH else name[:self.NAME_WIDTH - 1] + "~"
        return f"{name} {idx + 1}/{len(self.clock.phases)}" if len(self.clock.phases) > 1 else name

    def configure_columns(self, trainer) -> list:
        return [TextColumn("[progress.description]{task.description}"),
                BarColumn(bar_width=self.BAR_WIDTH, complete_style=self.theme.progress_bar,
                          finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
                TextColumn("{task.completed}/{task.total}", style=self.theme.batch_progress)]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pass  # no validation bar: our loaders have no length ("1/inf"); val shows in the fields once done

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        pass

    def on_train_epoch_start(self, trainer, pl_module):
        super().on_train_epoch_start(trainer, pl_module)
        self._update(self.train_progress_bar_id, self.clock.step_of(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # a resumed run, mid-phase
        step = self.clock.step_of(trainer, pl_module)
        if step != self._last:
            self._last = step
            self._eta = self.clock.tick(step)
        self._update(self.train_progress_bar_id, step)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def on_train_end(self, trainer, pl_module):
        self._eta = 0.0
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def get_metrics(self, trainer, pl_module):
        f = step_fields(trainer, pl_module, self.clock, self._eta)
        line = current_plan().get("train_loss_line")  # after the last step: the final table's number
        if line and line[2] == self.clock.step_of(trainer, pl_module) and "loss" in f:
            f["loss"] = f"{line[0]:.4f}"
        for key in ("phase", "step", "tokens"):  # the description and the count show them; tokens: the log lines
            f.pop(key, None)
        if "optimizer steps" in f:
            f["opt"] = f.pop("optimizer steps")
        return {k: f[k] for k in ("opt", "loss", "val", "reward", "tok/s", "ETA") if k in f}


class InterruptNotice(L.Callback):
    """On Ctrl-C, say where the run stood and print the command that continues it (what gets saved on an
    interrupt is the checkpoint logic's business, not this callback's)."""

    def __init__(self, cfg):
        self.cfg = cfg

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero:
            note_interrupt()
            print(interrupted_message(self.cfg, trainer), file=sys.__stderr__, flush=True)


def progress_callbacks(cfg, plan: dict, accumulate: int) -> tuple[list[L.Callback], bool]:
    """The progress callbacks for `trainer.progress_bar` and whether Lightning's progress bar must stay
    enabled (it must exactly when a ProgressBar callback is given)."""
    mode = cfg.trainer.progress_bar
    every = int(cfg.trainer.get("progress_every_n_steps", 10))
    clock = StepClock(plan["phases"], plan["steps"], plan["stop_step"], plan.get("unit") == "rollout step")
    rich = mode == "rich_always" or (mode == "rich" and sys.stdout.isatty())
    notice = InterruptNotice(cfg)
    if mode == "none":
        return [StepProgress(clock, every, to_console=False), notice], False
    if rich:
        # StepProgress first: its last line (after the final validation) is what the bar's final frame shows
        return [StepProgress(clock, every, to_console=False), PhaseRichBar(clock, accumulate, leave=True),
                notice], True
    return [StepProgress(clock, every, to_console=True), notice], False
