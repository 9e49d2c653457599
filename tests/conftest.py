"""Shared fixtures for the model-core tests: small fp32 CPU models, deterministic seeds."""

import pytest
import torch

from moxin.model import ModelConfig, Transformer


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A `tiny` preset model (vocab 512, dim 64, 2 layers, 4/2 heads, window 16) in eval mode, fp32 CPU."""
    torch.manual_seed(seed)
    overrides.setdefault("attn_backend", "sdpa")
    return Transformer(ModelConfig.preset("tiny", **overrides)).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def tiny():
    return tiny_model()
