"""Shared fixtures for the model-core tests: small fp32 CPU models, deterministic seeds."""

import os
import subprocess
import sys

import pytest
import torch

from moxin.model import ModelConfig, Transformer


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A `tiny` preset model (vocab 512, dim 64, 2 layers, 4/2 heads, window 16) in eval mode, fp32 CPU."""
    torch.manual_seed(seed)
    overrides.setdefault("attn_backend", "sdpa")
    return Transformer(ModelConfig.preset("tiny", **overrides)).eval()


def free_port() -> int:
    """A TCP port nobody listens on now, for a torchrun rendezvous (fixed ports collide between the tests of one
    run and with other runs on the machine)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_hub_offline(code: str) -> str:
    """Run a Python snippet in a fresh process with the Hugging Face hub and datasets offline; its stdout. The real
    hub loading paths are exercised this way without any network."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def tiny():
    return tiny_model()
