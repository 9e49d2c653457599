"""The generated-code sandbox: each outcome a HumanEval program can have, with tight limits so every test is fast."""

import os

import pytest

from moxin.eval.sandbox import (CRASHED, FAILED, MEMORY, PASSED, TIMEOUT, SandboxLimits, humaneval_program,
                                run_program, run_programs)

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox uses POSIX resource limits")

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=256, max_output_bytes=4096)

PROMPT = 'def add(a, b):\n    """Sum of a and b."""\n'
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"


def test_passing_program():
    res = run_program(humaneval_program(PROMPT, "    return a + b\n", TEST, "add"), LIMITS)
    assert res.status == PASSED and res.passed, res


def test_failing_assert():
    res = run_program(humaneval_program(PROMPT, "    return a - b\n", TEST, "add"), LIMITS)
    assert res.status == FAILED
    assert "AssertionError" in res.reason


def test_syntax_error_is_a_failure():
    res = run_program(humaneval_program(PROMPT, "    return a +\n", TEST, "add"), LIMITS)
    assert res.status == FAILED and "SyntaxError" in res.reason, res


def test_infinite_loop_times_out():
    res = run_program(humaneval_program(PROMPT, "    while True:\n        pass\n", TEST, "add"),
                      SandboxLimits(timeout_s=1.0, memory_mb=256))
    assert res.status == TIMEOUT


def test_sleeping_program_times_out_on_wall_clock():
    res = run_program("import time\ntime.sleep(60)\n", SandboxLimits(timeout_s=0.5, memory_mb=256))
    assert res.status == TIMEOUT and "wall-clock" in res.reason


def test_memory_bomb_hits_the_limit():
    res = run_program("x = bytearray(2 * 1024 ** 3)\n", LIMITS)
    assert res.status == MEMORY, res


@pytest.mark.parametrize("code", ["import os\nos._exit(0)\n",
                                  "import ctypes\nctypes.string_at(0)\n",
                                  "import sys\nsys.exit(0)\n"])
def test_early_exit_or_segfault_is_not_a_pass(code):
    # The program quits (even with status 0) or segfaults before check() ran: it must never count as passed.
    res = run_program(code + humaneval_program(PROMPT, "    return a + b\n", TEST, "add"), LIMITS)
    assert res.status in (CRASHED, FAILED) and not res.passed, res
    if "ctypes" in code:
        assert res.status == CRASHED and "SIGSEGV" in res.reason


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("MOXIN_SANDBOX_SECRET", "hunter2")
    res = run_program("import os\nassert 'MOXIN_SANDBOX_SECRET' not in os.environ, 'leaked'\n"
                      "print(sorted(os.environ))\n", LIMITS)
    assert res.status == PASSED, res
    assert "hunter2" not in res.output


def test_output_flood_is_capped():
    res = run_program("while True:\n    print('x' * 1000)\n", LIMITS)
    assert res.status == CRASHED and "output" in res.reason, res
    assert len(res.output) <= LIMITS.max_output_bytes


def test_workdir_is_removed_and_stdin_closed():
    res = run_program("import os, sys\nprint(os.getcwd())\nassert sys.stdin.read() == ''\n", LIMITS)
    assert res.status == PASSED, res
    assert not os.path.exists(res.output.strip())


def test_run_programs_keeps_order():
    progs = ["assert 1 == 1\n", "assert 1 == 2\n", "print('ok')\n"]
    assert [r.status for r in run_programs(progs, LIMITS, max_workers=2)] == [PASSED, FAILED, PASSED]


def test_bad_limits_are_rejected():
    with pytest.raises(ValueError, match="positive"):
        SandboxLimits(timeout_s=0)
