"""Shared fixtures for the model-core tests: small fp32 CPU models, deterministic seeds."""

import os
import subprocess
import sys

import pytest
import torch

from moxin.model import Transformer
from moxin.presets import load_preset
from moxin.tokenizer import load_tokenizer


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A `tiny` preset model (vocab 512, dim 64, 2 layers, 4/2 heads, window 16) in eval mode, fp32 CPU."""
    torch.manual_seed(seed)
    overrides.setdefault("attn_backend", "sdpa")
    return Transformer(load_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def tok():
    """The Mistral tokenizer, loaded once per test module (a module that needs another defines its own `tok`)."""
    return load_tokenizer("mistral")


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous (fixed ports collide between the tests of one
    run and with other runs on the machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a process prints when a C++ thread is still joinable as the process ends (gloo, torch 2.13, after the
# rank's work is done). Fresh-clone CI runs on this 2-core machine meet it in 2 or 3 of the ~10 launches.
TEARDOWN_ABORT = "terminate called without an active exception"
TEARDOWN_LAUNCHES = 3


def torchrun(*args, nproc: int = 2, timeout: int = 300, cwd=None, env: dict | None = None,
             before_retry=None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc --master_port <free> *args`` with one OpenMP thread
    a process; fails the test with the end of the output unless it exits 0. A launch that failed only by a rank's
    teardown abort (TEARDOWN_ABORT, and no Python exception in any rank) runs again, with a warning, up to
    TEARDOWN_LAUNCHES launches in all, so the test still checks the results of a complete run (two aborts in a row
    were seen in one fresh-clone CI run). `before_retry()` runs first: a launch that is not idempotent (a moxin.run
    refuses an out_dir that holds a run's checkpoints) clears what the previous one wrote."""
    import warnings

    e = dict(os.environ, OMP_NUM_THREADS="1") | (env or {})
    for attempt in range(1, TEARDOWN_LAUNCHES + 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
               str(free_port()), *map(str, args)]
        r = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
        if r.returncode == 0:
            return r
        out = r.stdout + r.stderr
        worker_raised = out.count("Traceback (most recent call last)") > 1  # one is torchrun's own ChildFailedError
        if attempt < TEARDOWN_LAUNCHES and TEARDOWN_ABORT in out and not worker_raised:
            warnings.warn(f"torchrun: a rank aborted at teardown ({TEARDOWN_ABORT!r}); launched again", stacklevel=2)
            if before_retry is not None:
                before_retry()
            continue
        break
    raise AssertionError(r.stdout[-3000:] + r.stderr[-3000:])


def run_hub_offline(code: str) -> str:
    """Run a Python snippet in a fresh process with the Hugging Face hub and datasets offline; its stdout. The real
    hub loading paths are exercised this way without any network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _environ_restored():
    """Each test sees the environment the session started with. Lightning's seed_everything (every in-process
    moxin.run) leaves PL_GLOBAL_SEED behind, and a later torchrun launch inherits it: there Lightning's
    distributed strategies reseed at setup, so 2 processes built other weights than 1 (seen as a val/loss gap in
    test_distributed when it ran after test_grpo)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tiny():
    return tiny_model()
