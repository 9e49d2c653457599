"""Two gloo processes split the items and gather the results: the same per-item scores and metrics as one
process, and (lockstep, as FSDP2 needs) the same number of model forwards on both ranks although rank 0 holds
more items. This file is also the torchrun script the test launches."""

import json
import sys
from pathlib import Path

import pytest

from moxin.presets import load_preset
from tests.conftest import torchrun

TASKS = lambda: [  # noqa: E731 - built where the sample path resolves
    {"name": "mc", "path": str(__import__("moxin.data.sample", fromlist=["x"]).sample_path("eval_mc")),
     "text": "Question: {question}\nAnswer:", "limit": 5, "num_fewshot": 1},
    {"name": "math", "kind": "generation", "path": str(__import__("moxin.data.sample", fromlist=["x"]).sample_path("eval_math")),
     "verifier": "exact", "limit": 3, "max_new_tokens": 4, "samples": 2, "k": [1, 2], "temperature": 1.0},
]


def _model():
    import torch

    from moxin.model import Transformer

    torch.manual_seed(0)
    return Transformer(load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=512,
                                          sliding_window=None)).eval()


def worker(out_path: str) -> None:
    import torch.distributed as dist

    from moxin.eval import evaluate
    from moxin.tokenizer import load_tokenizer

    dist.init_process_group("gloo")
    model = _model()
    calls = [0]
    model.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    res = evaluate(model, load_tokenizer("mistral"), {"tasks": TASKS(), "verifier_workers": 0, "batch_tokens": 64},
                   lockstep=True)
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, calls[0])
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps({"results": res, "forwards": counts}))
    dist.destroy_process_group()


def test_two_ranks_give_the_one_process_results(tmp_path):
    from moxin.eval import evaluate
    from moxin.tokenizer import load_tokenizer

    out = tmp_path / "two.json"
    torchrun(__file__, out, env={"PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    two = json.loads(out.read_text())
    one = evaluate(_model(), load_tokenizer("mistral"), {"tasks": TASKS(), "verifier_workers": 0, "batch_tokens": 64})
    mc1, mc2 = one["tasks"]["mc"], two["results"]["tasks"]["mc"]
    assert [i["index"] for i in mc2["items"]] == list(range(5))
    assert [x for i in mc2["items"] for x in i["loglik"]] == pytest.approx(
        [x for i in mc1["items"] for x in i["loglik"]], abs=1e-4)
    assert mc2["metrics"] == pytest.approx(mc1["metrics"], nan_ok=True)
    g1, g2 = one["tasks"]["math"], two["results"]["tasks"]["math"]
    assert [i["greedy"] for i in g2["items"]] == [i["greedy"] for i in g1["items"]]  # greedy: world-size independent
    assert len(g2["items"]) == 3 and all(len(i["samples"]) == 2 for i in g2["items"])
    f0, f1 = two["forwards"]
    assert f0 == f1  # rank 0 scored 3 items and generated for 2 problems, rank 1 for 2 and 1: still in step


if __name__ == "__main__":
    worker(sys.argv[1])
