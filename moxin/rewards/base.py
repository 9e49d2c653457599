"""The verifier interface and the process-isolated batch scorer.

A verifier is any picklable callable ``(completion, reference) -> RewardResult``. Verifiers are pure and may be
slow or even hang (SymPy simplification of an adversarial expression), so the trainer never calls them on its own
thread: :func:`score_batch` runs them in worker processes with a per-item deadline. A worker that overruns is
killed and replaced; its item becomes ``RewardResult(score=0, reason="timeout", error="timeout")`` and is
counted in the stats, so a batch of silent zeros can never pass unnoticed.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Protocol, Sequence, runtime_checkable

__all__ = [
    "RewardResult",
    "Verifier",
    "CORRECT",
    "WRONG",
    "NO_ANSWER",
    "TIMEOUT",
    "score_batch",
    "shutdown_pools",
]

# Reasons every verifier uses for its primary outcome (stats count by these).
CORRECT, WRONG, NO_ANSWER, TIMEOUT = "correct", "wrong", "no_answer", "timeout"


@dataclass
class RewardResult:
    """One scored completion.

    score: the reward (binary verifiers: 1.0 correct, 0.0 otherwise).
    reason: ``correct`` | ``wrong`` | ``no_answer`` | ``timeout`` | ``error``, optionally followed by ``; details``.
    extracted: the answer string the verifier pulled out of the completion, if any (log a few for debugging).
    error: set when the check itself failed (exception, timeout, crashed worker); score is then 0.
    """

    score: float
    reason: str
    extracted: str | None = None
    error: str | None = None

    @property
    def outcome(self) -> str:
        """The primary reason, without details."""
        return self.reason.split(";", 1)[0].strip()


@runtime_checkable
class Verifier(Protocol):
    """``verifier(completion, reference) -> RewardResult``; must be picklable (module-level class)."""

    def __call__(self, completion: str, reference: str) -> RewardResult: ...


def _safe_call(verifier: Verifier, completion: str, reference: str) -> RewardResult:
    try:
        result = verifier(completion, reference)
        if not isinstance(result, RewardResult):
            raise TypeError(f"{type(verifier).__name__} returned {type(result).__name__}, expected RewardResult")
        return result
    except Exception as exc:  # a verifier bug must not kill the batch; it is counted as an error
        tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
        return RewardResult(score=0.0, reason="error", error=tb)


# --------------------------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------------------------


def _worker_main(conn: Connection) -> None:
    """Worker loop: receive (index, verifier, completion, reference), send back (index, RewardResult)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        index, verifier, completion, reference = msg
        # unpickling the verifier may import its module (SymPy for math: seconds in a fresh worker); the item's
        # deadline starts only now, so a respawned worker's imports never turn a correct answer into a timeout
        conn.send(("start", index))
        conn.send((index, _safe_call(verifier, completion, reference)))


class _Worker:
    def __init__(self, ctx) -> None:
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="moxin-verifier")
        self.proc.start()
        child.close()
        self.ready = False
        self.started = time.monotonic()
        self.index: int | None = None  # item in flight
        self.deadline = 0.0

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class VerifierPool:
    """A small pool of verifier processes that can be killed one by one (ProcessPoolExecutor cannot).

    Uses the ``forkserver`` start method on Linux (a clean, thread-free parent to fork from; ``fork`` from a
    trainer with CUDA and threads is unsafe) and ``spawn`` elsewhere. Workers live across batches.
    """

    def __init__(self, max_workers: int, startup_timeout_s: float = 120.0) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {max_workers}")
        method = "forkserver" if sys.platform.startswith("linux") else "spawn"
        self.ctx = mp.get_context(method)
        if method == "forkserver":
            self.ctx.set_forkserver_preload(["moxin.rewards", "moxin.rewards.math"])
        self.max_workers = max_workers
        self.startup_timeout_s = startup_timeout_s
        self.workers: list[_Worker] = []

    def close(self) -> None:
        for w in self.workers:
            try:
                w.conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for w in self.workers:
            w.proc.join(timeout=1)
            w.kill()
        self.workers = []

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers[self.workers.index(w)] = _Worker(self.ctx)

    def run(
        self, verifier: Verifier, completions: Sequence[str], references: Sequence[str], timeout_s: float
    ) -> list[RewardResult]:
        n = len(completions)
        if n == 0:
            return []
        results: list[RewardResult | None] = [None] * n
        while len(self.workers) < min(self.max_workers, max(n, 1)):
            self.workers.append(_Worker(self.ctx))
        pending = list(range(n - 1, -1, -1))  # pop() from the end -> items in order
        done = 0
        while done < n:
            now = time.monotonic()
            for w in list(self.workers):
                if w.ready and w.index is None and pending:
                    i = pending.pop()
                    try:
                        w.conn.send((i, verifier, completions[i], references[i]))
                    except OSError:  # the worker died between items: retry the item on a fresh one
                        pending.append(i)
                        self._replace(w)
                        continue
                    except Exception as exc:  # pickling failed before anything was written; same for every item
                        raise TypeError(
                            f"verifier {type(verifier).__name__} could not be sent to a worker process ({exc}); "
                            "define it at module level so it can be pickled"
                        ) from exc
                    # until the worker says "start" (verifier unpickled), allow the startup grace on top
                    w.index, w.deadline = i, now + timeout_s + self.startup_timeout_s
            busy = {w.conn: w for w in self.workers}
            soonest = min(
                [w.deadline for w in self.workers if w.index is not None]
                + [w.started + self.startup_timeout_s for w in self.workers if not w.ready]
                + [now + 1.0]
            )
            for conn in wait(list(busy), timeout=max(0.0, soonest - time.monotonic())):
                w = busy[conn]
                try:
                    tag, payload = conn.recv()
                except (EOFError, OSError):  # the worker died (segfault, OOM kill, os._exit in a verifier)
                    if w.index is not None:
                        code = w.proc.exitcode
                        results[w.index] = RewardResult(0.0, "error", error=f"verifier process crashed (exit code {code})")
                        done += 1
                        w.index = None
                    self._replace(w)
                    continue
                if tag == "ready":
                    w.ready = True
                elif tag == "start":
                    w.deadline = time.monotonic() + timeout_s
                else:
                    results[tag] = payload
                    done += 1
                    w.index = None
            now = time.monotonic()
            for w in list(self.workers):
                if w.index is not None and now > w.deadline:
                    results[w.index] = RewardResult(
                        0.0, TIMEOUT, error=f"timeout: check took longer than {timeout_s:g} s"
                    )
                    done += 1
                    w.index = None
                    self._replace(w)
                elif not w.ready and now > w.started + self.startup_timeout_s:
                    raise RuntimeError(
                        f"a verifier worker process did not start within {self.startup_timeout_s:g} s; "
                        "check that moxin.rewards imports cleanly in a fresh interpreter"
                    )
        return results  # type: ignore[return-value]


_POOLS: dict[int, VerifierPool] = {}


def shutdown_pools() -> None:
    """Stop all verifier worker processes (also runs at interpreter exit)."""
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(shutdown_pools)


def _stats(results: Sequence[RewardResult]) -> dict[str, float]:
    outcomes = [r.outcome for r in results]
    timeouts = sum(1 for r in results if r.error is not None and r.outcome == TIMEOUT)
    errors = sum(1 for r in results if r.error is not None) - timeouts
    n = len(results)
    return {
        "n": n,
        "correct": sum(1 for o, r in zip(outcomes, results) if o == CORRECT and r.error is None),
        "wrong": sum(1 for o, r in zip(outcomes, results) if o == WRONG and r.error is None),
        "no_answer": sum(1 for o, r in zip(outcomes, results) if o == NO_ANSWER and r.error is None),
        "errors": errors,
        "timeouts": timeouts,
        "mean_score": (sum(r.score for r in results) / n) if n else 0.0,
    }


def score_batch(
    verifier: Verifier,
    completions: Sequence[str],
    references: Sequence[str],
    timeout_s: float = 10.0,
    max_workers: int | None = None,
) -> tuple[list[RewardResult], dict[str, float]]:
    """Score completions against references in worker processes, each item with its own deadline.

    Args:
        verifier: a picklable verifier (module-level class instance).
        completions, references: equal-length sequences of strings.
        timeout_s: per-item wall-clock limit, counted from when a started worker receives the item. Too small
            turns slow-but-correct checks into zeros (watch ``timeouts`` in the stats); too large lets one
            pathological answer stall the step. Math checks take milliseconds; 10 s is generous.
        max_workers: worker processes (default ``min(4, cpu_count)``). 0 runs in this process with NO timeout
            (debugging only).

    Returns:
        ``(results, stats)``: one :class:`RewardResult` per input, in order; stats counts ``correct``, ``wrong``,
        ``no_answer``, ``errors``, ``timeouts`` and ``n``, plus ``mean_score``. Log them every step.
    """
    if len(completions) != len(references):
        raise ValueError(
            f"completions and references must have the same length, got {len(completions)} and {len(references)}"
        )
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if max_workers is None:
        max_workers = min(4, os.cpu_count() or 1)
    if max_workers == 0:
        results = [_safe_call(verifier, c, r) for c, r in zip(completions, references)]
    else:
        pool = _POOLS.get(max_workers)
        if pool is None:
            pool = _POOLS[max_workers] = VerifierPool(max_workers)
        results = pool.run(verifier, list(completions), list(references), timeout_s)
    return results, _stats(results)
