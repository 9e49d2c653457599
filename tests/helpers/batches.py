"""Comparing loader output: batches copied out of a loader, compared tensor by tensor, and a state dict passed
through torch.save / torch.load as a checkpoint would carry it."""

import io

import torch


def ckpt_roundtrip(state):
    """`state` after torch.save and torch.load(weights_only=True), as a resumed run reads it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def as_list(batches):
    """Every batch of an iterable, its tensors cloned (a loader may reuse its buffers)."""
    return [{k: v.clone() for k, v in b.items()} for b in batches]


def assert_same_batches(a, b):
    """Two lists of batches with the same keys and bitwise equal tensors, in the same order."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
