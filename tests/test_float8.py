"""Float8 training (torchao, ``hardware.parallel.float8``): the module filter, training with float8 emulated on the
CPU against fp32, FSDP2's float8 all-gather on 2 processes, plain checkpoints (they load into a bf16 run and export
to Hugging Face), and the settings refused before any work."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moxin import run as R
from moxin.checkpoint.weights import load_init_weights
from moxin.config import ConfigError, ParallelConfig
from moxin.distributed import apply_float8, float8_module_filter, parallelize
from moxin.errors import preflight
from moxin.model import Transformer
from moxin.model.hf import load_hf
from tests.conftest import tiny_model, torchrun
from tests.helpers.compose import compose_config
from tests.helpers.tiny_overrides import TINY_PRETRAIN

pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402 - only once torchao is known to be there

EMULATED = ParallelConfig(float8="rowwise", float8_emulate=True)


def _train(model: Transformer, steps: int, lr: float = 3e-3) -> list[float]:
    """`steps` AdamW steps on rows that count up from a random start (next token = token + 1: learnable)."""
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        x = ((torch.randint(0, 512, (4, 1), generator=g) + torch.arange(33)) % 512).to(model.output.weight.device)
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_only_the_blocks_linear_layers_with_float8_shapes_are_converted():
    model = tiny_model(hidden_dim=72)  # the MLP's 72 is no multiple of 16: its three projections stay
    names = apply_float8(model, EMULATED, fsdp=False)
    expected = [f"layers.{i}.attention.{w}" for i in range(2) for w in ("wq", "wk", "wv", "wo")]
    assert names == expected
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    assert converted == sorted(expected)
    assert type(model.output) is torch.nn.Linear and type(model.tok_embeddings) is torch.nn.Embedding
    assert not float8_module_filter(model.output, "output")
    assert apply_float8(tiny_model(), ParallelConfig(), fsdp=False) == []  # float8=none: nothing changes


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_float8_trains_as_fp32_does(recipe):
    """e4m3 keeps 3 mantissa bits (a cast's relative error up to 2^-4), but the errors of a product's 64-160 terms
    partly cancel and the loss averages 128 tokens: the curves differ by about 0.2 % here (measured). 2 % is ten
    times that, and far below what the training itself moves the loss (it must fall by a quarter)."""
    base = tiny_model()
    f8 = copy.deepcopy(base)
    parallelize(f8, ParallelConfig(float8=recipe, float8_emulate=True))
    ref, got = _train(base, 30), _train(f8, 30)
    assert got[-1] < 0.75 * got[0]  # it trains
    rel = max(abs(a - b) / a for a, b in zip(ref, got))
    assert rel < 0.02, (rel, ref, got)
    assert rel > 0  # the float8 path really ran (an fp32 product would give identical losses)


def test_fsdp2_float8_all_gather_matches_one_process(tmp_path):
    """Tensorwise under FSDP2: weights all-gathered in float8 with one all-reduce of their scales after each step
    (scales of the whole tensors: the same casts as one process makes, so the same losses)."""
    out = tmp_path / "f8.json"
    torchrun(Path(__file__).parent / "helpers" / "fsdp_float8.py", out, "tensorwise")
    r = json.loads(out.read_text())
    assert r["keys"] == r["plain_keys"]
    assert r["precomputed"] == 2 * 7  # every converted weight of rank 0's shards has its precomputed scale
    for a, b in zip(r["single"], r["sharded"]):
        assert b == pytest.approx(a, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_float8_matches_one_process(tmp_path, world):
    """TP=2, and TP=2 x DP=2 on 4 processes, with float8 (tests/helpers/tp_float8.py; gloo carries the float8
    all-gathers as bytes, as NCCL does): every block projection is a Float8Linear whose weight is a DTensor sharded
    over the tensor dimension (tensorwise: all-gathered by FSDP2 in float8); under
    tensorwise the projections are fed float8 tensors (torchao's float8 styles: the sequence all-gather in float8),
    under rowwise high-precision ones (the plain styles; the layer casts). Against one process with the same
    recipe, over 5 steps: with SGD the losses are equal (measured: bit for bit, both recipes); with AdamW within
    1e-3 relative (measured 4.9e-4 tensorwise, 8.6e-8 rowwise: Adam turns the last-bit differences of a gradient
    near zero, from the tensor ranks' other order of sums, into whole steps), below float8's own distance from
    fp32 (measured 2.9e-3 and 5.3e-3; TP=2 x DP=2 measured the same). State-dict keys stay the plain model's."""
    out = tmp_path / "tp_f8.json"
    torchrun(Path(__file__).parent / "helpers" / "tp_float8.py", out, "tensorwise", "rowwise", nproc=world)
    res = json.loads(out.read_text())
    for recipe, fed in (("tensorwise", "Float8TrainingTensor"), ("rowwise", "Tensor")):
        r = res[recipe]
        assert len(r["float8"]) == 2 * 7, recipe
        assert r["float8_all_gather"] == (2 * 7 if recipe == "tensorwise" else 0), recipe
        for name, placements in r["float8"].items():
            assert placements[-1] == ("S(1)" if name.endswith(("wo", "w2")) else "S(0)"), (recipe, name)
        assert set(r["inputs"].values()) == {fed}, (recipe, r["inputs"])
        assert r["keys"] == r["plain_keys"], recipe
        assert r["tp_sgd"] == pytest.approx(r["single_sgd"], rel=1e-6), recipe
        assert r["tp_adamw"] == pytest.approx(r["single_adamw"], rel=1e-3), recipe
        assert r["single_adamw"] != pytest.approx(r["fp32_adamw"], rel=1e-4), recipe  # float8 really ran
        assert r["tp_sgd"][-1] < r["tp_sgd"][0], recipe  # it trains


def test_tensor_parallel_plan_takes_the_float8_styles_for_tensorwise_float8_layers():
    """`_styles`: torchao's float8 styles for the Float8Linear projections of a tensorwise block, the plain ones
    for a projection float8 left out (the MLP's 72 is no multiple of 16) and for its sub-layer's input; the plain
    styles everywhere for rowwise."""
    from torch.distributed.tensor.parallel import ColwiseParallel, PrepareModuleInput, RowwiseParallel
    from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                       PrepareFloat8ModuleInput)

    from moxin.tensor_parallel import _styles

    model = tiny_model(hidden_dim=72)
    apply_float8(model, ParallelConfig(float8="tensorwise", float8_emulate=True), fsdp=False)
    block = model.layers[0]
    assert _styles(block, True) == {
        "attention": PrepareFloat8ModuleInput, "attention.wq": Float8ColwiseParallel,
        "attention.wk": Float8ColwiseParallel, "attention.wv": Float8ColwiseParallel,
        "attention.wo": Float8RowwiseParallel, "feed_forward": PrepareModuleInput,
        "feed_forward.w1": ColwiseParallel, "feed_forward.w3": ColwiseParallel, "feed_forward.w2": RowwiseParallel}
    assert set(_styles(block, False).values()) == {PrepareModuleInput, ColwiseParallel, RowwiseParallel}


def test_float8_run_checkpoint_loads_into_a_plain_model_and_exports(tmp_path):
    """A run trained with float8 (emulated) writes a checkpoint of plain names: a bf16 run's model loads it
    strictly, and the HF export holds the same weights."""
    over = TINY_PRETRAIN + ["+experiment=pretrain", "hardware.num_workers=0", "trainer.max_steps=3",
                            "hardware.parallel.float8=rowwise", "hardware.parallel.float8_emulate=true",
                            "export_hf=true", f"out_dir={tmp_path}", "run_name=f8"]
    R.train(compose_config(over))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    hf = load_hf(tmp_path / "hf")
    plain = Transformer(hf.cfg)
    load_init_weights(plain, str(tmp_path / "checkpoints" / "last.ckpt"))
    assert not any(isinstance(m, Float8Linear) for m in plain.modules())
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(t, ckpt["state_dict"][f"model.{name}"])
        torch.testing.assert_close(hf.state_dict()[name], t)


def test_bad_float8_settings_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="hardware.parallel.float8='fp8': choose one of none, tensorwise, rowwise"):
        ParallelConfig(float8="fp8")
    with pytest.raises(ConfigError, match="this run is on the CPU.*float8_emulate=true"):
        ParallelConfig(float8="rowwise").check_float8(gpu=False)
    with pytest.raises(ConfigError, match="stage.lora.*float8=none"):
        EMULATED.check_float8(gpu=False, lora=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"A100 \(compute capability 8.0\) has no float8 tensor cores"):
        ParallelConfig(float8="tensorwise").check_float8(gpu=True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ParallelConfig(float8="tensorwise").check_float8(gpu=True)  # an H100: fine
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install torchao"):
        EMULATED.check_float8(gpu=False)


def test_preflight_refuses_float8_on_the_cpu_before_any_work(tmp_path):
    over = TINY_PRETRAIN + ["+experiment=pretrain", f"out_dir={tmp_path}", "run_name=f8"]
    with pytest.raises(ConfigError, match="hardware.parallel.float8=tensorwise needs a GPU"):
        preflight(compose_config(over + ["hardware.parallel.float8=tensorwise"]))
    preflight(compose_config(over + ["hardware.parallel.float8=tensorwise", "hardware.parallel.float8_emulate=true"]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with float8 tensor cores")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_on_the_gpu_trains_as_bf16_does(recipe):
    """The real float8 products (torch._scaled_mm), compiled, against bf16 autocast: the same bound as emulated."""
    base = tiny_model().cuda()
    f8 = copy.deepcopy(base)
    parallelize(f8, ParallelConfig(float8=recipe, compile=True))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, got = _train(base, 30), _train(f8, 30)
    rel = max(abs(a - b) / a for a, b in zip(ref, got))
    assert 0 < rel < 0.02, (rel, ref, got)
    assert got[-1] < 0.9 * got[0]  # it trains (bf16 autocast falls more slowly here than the CPU's fp32)
