"""`launcher_rank`, the one rank helper before a process group exists: which environment variable names the
global rank under torchrun, srun and Lightning's own launcher."""

from __future__ import annotations

import pytest

from moxin.checkpoint.lock import launcher_rank

KEYS = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK")


@pytest.mark.parametrize("env, rank", [
    ({}, 0),                                                       # a plain process
    ({"RANK": "3", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}, 3),    # torchrun (inside an allocation)
    ({"SLURM_PROCID": "5"}, 5),                                    # srun, one task a GPU
    ({"LOCAL_RANK": "2", "SLURM_PROCID": "0"}, 2),                 # Lightning's launcher in `srun --pty bash`
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, 1),                    # Lightning's launcher, first node
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, None),                 # ... a later node: not the first process
    ({"NODE_RANK": "2"}, None),                                    # its launching process on a later node
])
def test_launcher_rank_reads_the_global_rank(monkeypatch, env, rank):
    for k in KEYS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert launcher_rank() == rank
