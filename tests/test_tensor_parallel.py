"""Tensor parallelism (moxin/tensor_parallel.py) beyond training's forward and backward: the rolling-cache decode
that sample generations, evaluation and GRPO's rollouts call, on 2 gloo processes against the unsharded model.
The training equivalences (TP=2, TP=2 x DP=2, TP=2 x HSDP) are in tests/test_distributed.py."""

import json
from pathlib import Path

import pytest

from tests.conftest import torchrun

HELPERS = Path(__file__).parent / "helpers"


def test_tensor_parallel_decode_gives_the_unsharded_tokens_past_the_window(tmp_path):
    """Under TP=2 `generate` gives the unsharded model's tokens, token for token, and its log-probs within 1e-5:
    greedy and sampled (the same seeded generator), left and right padding, chunked prefill, the eager and static
    paths, rows ending on stop tokens at different steps, every row running past the window so the rolling buffer
    wraps; the gathered copy GRPO's rollouts decode from (the DTensors' full_tensor()) gives them too."""
    out = tmp_path / "decode.json"
    torchrun(HELPERS / "tp_decode.py", out)
    r = json.loads(out.read_text())
    assert min(r["prompt_lens"]) + r["new"] > r["window"]  # every row wraps the ring buffer
    for case in ("greedy_left", "greedy_right_chunked", "sampled", "sampled_static", "greedy_stops"):
        plain = r[case]["plain"]
        for other in ("tp", "copy"):
            got = r[case][other]
            assert got["tokens"] == plain["tokens"], f"{case}: {other}"
            assert got["finished"] == plain["finished"], f"{case}: {other}"
            for a, b in zip(got["logprobs"], plain["logprobs"]):
                assert a == pytest.approx(b, abs=1e-5), f"{case}: {other}"
    lens = [len(t) for t in r["greedy_stops"]["plain"]["tokens"]]
    assert min(lens) < r["new"] and max(lens) == r["new"]  # the stops end some rows early, not all
    assert r["sampled"]["plain"]["tokens"] != r["greedy_left"]["plain"]["tokens"]  # the sampled cases sampled
