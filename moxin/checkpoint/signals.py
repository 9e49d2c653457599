"""SIGUSR1 (SLURM's warning before the time limit): save at the next optimizer-step boundary, stop, requeue."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import lightning as L

from moxin.checkpoint.policy import CheckpointPolicy


class StopOnSignal(L.Callback):
    """On SIGUSR1 (what ``#SBATCH --signal=SIGUSR1@120`` sends every task before the time limit): finish the
    optimizer step in progress, save a checkpoint through the policy, stop, and at ``on_train_end`` (the step
    logged, the checkpoint published: last.ckpt switched, so resume=auto continues exactly there) requeue the job
    when running under SLURM. The handler only sets a flag; the ranks agree on it at the step boundary (one tiny
    all-reduce per step when distributed), so every rank saves the same step. Lightning's own requeue
    (SLURMEnvironment(auto_requeue=True)) saves inside the signal handler, mid-step, to hpc_ckpt_N.ckpt; run.py
    turns it off in favour of this."""

    def __init__(self, policy: CheckpointPolicy, signum: int | None = None):
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
            if self.policy.phase_done(trainer):  # the phase's last step: save with the loop state "phase done"
                self.policy.save_phase_end(trainer, pl_module, publish=False)
            else:
                self.policy.save(trainer, pl_module, publish=False)
        self.stopped_at = step
        trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
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
                res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
                self.requeued = res.returncode == 0
                msg += (f"; job {job} requeued (it continues with resume=auto)" if self.requeued else
                        f"; `scontrol requeue {job}` failed: {res.stderr.strip()}")
            print(msg, file=sys.stderr, flush=True)
