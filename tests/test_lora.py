"""LoRA / QLoRA (moxin/model/lora.py): the adapted forward is the dense forward of the merged weights, only the
adapters train and only they are checkpointed, resume is exact, the adapter-off model is the starting weights (DPO's
and GRPO's reference), and the exported PEFT adapter loaded by PEFT on the base gives moxin's merged export."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from moxin import run as R
from moxin.config import LoRAConfig
from moxin.model import Transformer
from moxin.model import lora
from moxin.model.hf import load_hf, save_hf
from moxin.model.lora import adapters_disabled, apply_lora, lora_modules, merged_items
from moxin.presets import load_preset
from tests.helpers.compose import compose_config, logged_train_losses
from tests.helpers.tiny_overrides import LORA_COMMON, LORA_RUN, LORA_SFT, TINY_MODEL

RUN, COMMON, SFT = LORA_RUN, LORA_COMMON, LORA_SFT


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny base model as a Hugging Face folder (what LoRA runs start from)."""
    cfg = instantiate(compose_config(TINY_MODEL).model)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "hf"
    save_hf(Transformer(cfg), path)
    return path


def _randomise_adapters(model, std=0.05):
    torch.manual_seed(1)
    for m in lora_modules(model):
        if m.lora_B is not None:
            torch.nn.init.normal_(m.lora_B, std=std)


@pytest.mark.parametrize("targets,quantize", [(None, None), (["q", "v", "down"], None), (None, "nf4")])
def test_lora_forward_equals_dense_forward_with_merged_weights(tiny, targets, quantize):
    if quantize and not lora.nf4_available():
        pytest.skip("torchao is not installed (pip install 'moxin[lora]'): no NF4")
    cfg = LoRAConfig(rank=4, alpha=8, quantize=quantize, **({"targets": targets} if targets else {}))
    model = apply_lora(tiny, cfg)
    _randomise_adapters(model)
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == \
        {lora.TARGETS[t][1] for t in cfg.targets}
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    dense = Transformer(model.cfg).eval()
    dense.load_state_dict(dict(merged_items(model)))
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-5)
    # adapters off: the base alone (for NF4, the dequantised base)
    base = Transformer(model.cfg).eval()
    base.load_state_dict({n: lora.dequantize(t) if n.endswith(".weight") and lora._is_nf4(t) else t
                          for n, t in _base_state(model).items()})
    with adapters_disabled(model):
        torch.testing.assert_close(model(x), base(x), rtol=1e-5, atol=1e-5)


def _held_bytes(t: torch.Tensor) -> int:
    """Bytes a weight holds: an NF4 weight's parts (codes, scales, their factors, mean, table), else its storage."""
    return sum(p.untyped_storage().nbytes() for p in (lora._nf4_parts(t) if lora._is_nf4(t) else (t,)))


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])  # compile: ~2 min of CPU
def test_qlora_base_holds_nf4_only_and_the_backward_keeps_no_dequantised_weight(compiled):
    """The NF4 base holds about a quarter of the bf16 base's bytes (the rest of the model as with bf16), and a
    forward keeps no dequantised projection for the backward, with or without recompute (torch.compile's
    partitioner kept them all before the NF4 product became an opaque operator), so a QLoRA step's peak is the NF4
    base plus activations. Rows of a batch stay independent (micro-batches of several rows)."""
    if not lora.nf4_available():
        pytest.skip("torchao is not installed (pip install 'moxin[lora]'): no NF4")
    from moxin.config import ParallelConfig
    from moxin.distributed import parallelize
    from tests.conftest import tiny_model

    def build(quantize, recompute="none"):
        m = apply_lora(tiny_model(dim=128, hidden_dim=384, head_dim=32).to(torch.bfloat16),
                       LoRAConfig(rank=4, quantize=quantize, base_dtype="bfloat16")).train()
        _randomise_adapters(m)
        return parallelize(m, ParallelConfig(activation_checkpointing=recompute, compile=compiled))

    dense, nf4 = build(None), build("nf4")
    frozen = {n: sum(_held_bytes(m.weight) for m in lora_modules(model)) for n, model in (("bf16", dense),
                                                                                          ("nf4", nf4))}
    assert frozen["nf4"] <= 0.3 * frozen["bf16"], frozen
    rest = {n: sum(_held_bytes(p) for name, p in model.named_parameters() if "layers." not in name)
            for n, model in (("bf16", dense), ("nf4", nf4))}
    assert rest["nf4"] == rest["bf16"]  # embeddings, final norm, output layer: 16-bit in both
    shapes = {tuple(m.weight.shape) for m in lora_modules(nf4)}
    shapes |= {s[::-1] for s in shapes}
    x = torch.randint(0, nf4.cfg.vocab_size, (3, 24))
    for recompute in ("none", "full"):
        model = build("nf4", recompute)
        owned = {t.untyped_storage().data_ptr() for p in model.parameters()
                 for t in (lora._nf4_parts(p) if lora._is_nf4(p) else (p,))}
        saved = []

        def pack(t):
            if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in owned:
                saved.append(tuple(t.shape))  # a weight-sized tensor that no parameter owns: a dequantised copy
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
        assert not saved, (recompute, saved)
        out.float().square().mean().backward()
        assert all(m.lora_B.grad is not None for m in lora_modules(model) if m.lora_B is not None)
        with torch.no_grad():  # three rows at once give what each row gives alone
            rows = torch.cat([model(x[i:i + 1]) for i in range(3)])
            torch.testing.assert_close(model(x), rows, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_qlora_on_the_gpu_never_holds_the_16_bit_base_and_a_compiled_step_keeps_no_dequantised_weight():
    """On a GPU: a model built on the host reaches the GPU through `apply_lora(..., device=)` without the GPU ever
    holding its 16-bit base (the peak stays under half of it), and a compiled QLoRA step without recompute saves
    no dequantised projection (Inductor's partitioner kept them all before; docs/performance.md, LoRA section)."""
    if not lora.nf4_available():
        pytest.skip("torchao is not installed (pip install 'moxin[lora]'): no NF4")
    from moxin.config import ParallelConfig
    from moxin.distributed import parallelize

    cfg = load_preset("tiny", vocab_size=4096, dim=1024, hidden_dim=3584, n_layers=16, n_heads=8,
                      n_kv_heads=2, head_dim=128, attn_backend="sdpa", max_seq_len=512)
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)  # on the host
    bf16 = sum(p.numel() * 2 for p in model.parameters())
    largest = max(p.numel() * 2 for p in model.parameters())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    apply_lora(model, LoRAConfig(rank=16, quantize="nf4"), device="cuda")
    assert all(p.device.type == "cuda" for p in model.parameters())
    held = torch.cuda.memory_allocated() - start
    assert held < 0.4 * bf16, (held, bf16)  # NF4 projections, bf16 embedding and head, fp32 adapters
    # the way there: what is held, one projection in bf16 and torchao's quantisation buffers (chunks of 2^20
    # weights against the 16 levels), far under the 16-bit base
    bound = held + 4 * largest + 128 * 2**20
    assert bound < bf16
    assert torch.cuda.max_memory_allocated() - start < bound, (torch.cuda.max_memory_allocated() - start, bound)
    parallelize(model.train(), ParallelConfig(compile=True))
    shapes = {tuple(m.weight.shape) for m in lora_modules(model)}
    shapes |= {s[::-1] for s in shapes}
    owned = {t.untyped_storage().data_ptr() for p in model.parameters()
             for t in (lora._nf4_parts(p) if lora._is_nf4(p) else (p,))}
    saved = []

    def pack(t):
        if tuple(t.shape) in shapes and t.untyped_storage().data_ptr() not in owned:
            saved.append(tuple(t.shape))
        return t

    x = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda")
    for _ in range(2):  # the second call runs the compiled code
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cuda", torch.bfloat16):
            out = model(x)
        assert not saved, saved
        out.float().square().mean().backward()
        del out
    del x
    # after compiled steps: the model, the adapters' gradients and nothing else (no weight copy in a compile cache)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert torch.cuda.memory_allocated() - start < held + grads + 64 * 2**20


def test_qlora_nf4_product_is_torchaos_dequantisation_bit_for_bit():
    if not lora.nf4_available():
        pytest.skip("torchao is not installed (pip install 'moxin[lora]'): no NF4")
    torch.manual_seed(0)
    w = lora.to_nf4(torch.randn(96, 256) * 0.02)
    ref = w.get_original_weight()
    assert torch.equal(lora._nf4_weight(*lora._nf4_parts(w), 96, torch.bfloat16), ref)
    x = torch.randn(5, 256, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    lora.linear_nf4(x, w).square().sum().backward()
    torch.nn.functional.linear(x2, ref.float()).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recompute", ["full", "mlp"])
def test_activation_checkpointing_keeps_names_and_gradients(recompute):
    """Recomputed blocks give the adapters the same gradients, and checkpoints, exports and the PEFT keys see the
    plain parameter names (no wrapper prefixes)."""
    from moxin.config import ParallelConfig
    from moxin.distributed import parallelize
    from tests.conftest import tiny_model

    def build():
        m = apply_lora(tiny_model(), LoRAConfig(rank=4, dropout=0.0)).train()
        _randomise_adapters(m)
        return m

    ref, ac = build(), parallelize(build(), ParallelConfig(activation_checkpointing=recompute))
    x = torch.randint(0, 512, (2, 24))
    for m in (ref, ac):
        m(x).float().pow(2).mean().backward()
    grads = {lora.plain_name(n): p.grad for n, p in ac.named_parameters() if p.requires_grad}
    for n, p in ref.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    assert [n for n, _ in merged_items(ac)] == [n for n, _ in merged_items(ref)]
    assert set(lora.adapter_state_dict(ac)) == set(lora.adapter_state_dict(ref))


def _base_state(model) -> dict:
    return {n: t for n, t in model.state_dict().items() if not n.endswith((".lora_A", ".lora_B"))}


def test_bad_lora_configs_are_refused_with_the_key():
    with pytest.raises(ValueError, match="stage.lora.targets"):
        LoRAConfig(rank=4, targets=["q", "qkv"])
    with pytest.raises(ValueError, match="stage.lora.rank"):
        LoRAConfig(rank=-1)
    with pytest.raises(ValueError, match="set stage.lora.rank"):
        LoRAConfig(quantize="nf4")
    with pytest.raises(ValueError, match="choose null or nf4"):
        LoRAConfig(rank=4, quantize="int4")
    from moxin.stages.sft import SFTStage

    with pytest.raises(ValueError, match="set init_from"):
        SFTStage(model=load_preset("tiny"), lora=LoRAConfig(rank=4))


def test_sft_lora_trains_only_adapters_checkpoints_them_alone_and_exports_merged_and_peft(tmp_path, base_dir):
    info = R.train(compose_config(SFT + COMMON + [f"init_from={base_dir}", f"out_dir={tmp_path / 'a'}", "run_name=a",
                                            "trainer.max_steps=2", "export_hf=true"]))
    assert info["optimizer_steps"] == 2
    ckpt = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)
    keys = set(ckpt["state_dict"])
    assert keys and all(k.endswith((".lora_A", ".lora_B")) for k in keys)  # the adapters only
    assert len(keys) == 2 * 7 * 2  # A and B, 7 projections, 2 blocks
    n_opt = sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"])
    assert n_opt == len(keys)
    # the base did not move: the merged export minus the adapters' product is the base, to the last bit where
    # no adapter sits (embeddings, norms, output layer)
    base, merged = load_hf(base_dir).state_dict(), load_hf(tmp_path / "a" / "hf").state_dict()
    sd = ckpt["state_dict"]
    for name, w in base.items():
        prefix = "model." + name.removesuffix(".weight")
        if prefix + ".lora_A" in sd:
            delta = (sd[prefix + ".lora_B"] @ sd[prefix + ".lora_A"]) * (8 / 4)
            assert delta.abs().max() > 0, name  # the adapters trained
            torch.testing.assert_close(merged[name], w + delta, rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], w), name
    # the run's checksum is the merged export's: the next stage's hand-off check compares with it
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["weights_checksum"] == pytest.approx(sum(float(t.double().sum()) for t in merged.values()),
                                                        rel=1e-9)
    adapter = tmp_path / "a" / "hf_adapter"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and Path(conf["base_model_name_or_path"]) == base_dir.resolve()
    # init_from accepts the adapter folder: its base with the adapter merged, the same weights as hf/
    from moxin.checkpoint.weights import load_model_weights

    via_adapter, _, what = load_model_weights(adapter)
    assert "LoRA adapter" in what
    # and the run folder (its last.ckpt: adapters only, merged into the base it records), as the notebook reads it
    via_run, _, what_run = load_model_weights(tmp_path / "a")
    assert "LoRA adapters merged" in what_run
    for name, w in merged.items():
        torch.testing.assert_close(via_adapter[name], w, rtol=0, atol=1e-6)
        torch.testing.assert_close(via_run[name], w, rtol=0, atol=1e-6)


def test_peft_loads_the_exported_adapter_on_the_base_and_matches_the_merged_export(tmp_path, base_dir):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'moxin[dev]')")
    transformers = pytest.importorskip("transformers")
    R.train(compose_config(SFT + COMMON + [f"init_from={base_dir}", f"out_dir={tmp_path / 'a'}", "run_name=a",
                                     "trainer.max_steps=1", "export_hf=true", "stage.optim.lr=5e-2"]))
    M = transformers.MistralForCausalLM
    base = M.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / "a" / "hf_adapter")).eval()
    merged = M.from_pretrained(str(tmp_path / "a" / "hf"), torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 32000, (2, 20))
    with torch.no_grad():
        a, b = with_adapter(input_ids=ids).logits, merged(input_ids=ids).logits
        with with_adapter.disable_adapter():
            off = with_adapter(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (a - off).abs().max() > 1e-3  # the adapter changed the logits: the comparison is not vacuous


def test_sft_lora_resume_is_exact(tmp_path, base_dir):
    """Stop at step 2 (adapters + optimizer in the checkpoint, the base rebuilt from init_from), resume to 4: the
    same losses as an uninterrupted run, and the same final adapters."""
    base = SFT + COMMON + [f"init_from={base_dir}", "export_hf=false", "stage.lora.dropout=0.1"]
    R.train(compose_config(base + [f"out_dir={tmp_path / 'full'}", "run_name=full", "trainer.max_steps=4"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=2"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=4", "resume=auto"]))
    a, b = logged_train_losses(tmp_path / "full"), logged_train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
    fa = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    fb = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    for k, v in fa["state_dict"].items():
        torch.testing.assert_close(fb["state_dict"][k], v, rtol=0, atol=1e-7)
    for sa, sb in zip(fa["optimizer_states"][0]["state"].values(), fb["optimizer_states"][0]["state"].values()):
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=0, atol=1e-9)
    # resuming with other adapters is refused, naming the settings
    with pytest.raises(ValueError, match="LoRA adapters"):
        R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=5",
                                 "resume=auto", "stage.lora.rank=8"]))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_lora_sft_with_several_rows_a_micro_batch_matches_one_row_a_micro_batch(tmp_path, base_dir, quantize):
    """Micro-batches of 3-4 packed rows (4 conversations cut at 64 tokens) and of one row, over the same 8
    conversations a step: the same losses and adapters (the loss is normalised by the step's target tokens)."""
    if quantize and not lora.nf4_available():
        pytest.skip("torchao is not installed (pip install 'moxin[lora]'): no NF4")
    runs = {}
    for mb in (4, 1):
        R.train(compose_config(SFT + COMMON + [f"init_from={base_dir}", f"out_dir={tmp_path / str(mb)}", f"run_name=m{mb}",
                                               "trainer.max_steps=2", "export_hf=false", f"data.micro_batch_size={mb}",
                                               "data.max_length=64", f"stage.lora.quantize={quantize or 'null'}"]))
        runs[mb] = (logged_train_losses(tmp_path / str(mb)),
                    torch.load(tmp_path / str(mb) / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"])
    (la, sa), (lb, sb) = runs[4], runs[1]
    assert sorted(la) == sorted(lb) == [0, 1]
    for step in la:
        assert lb[step] == pytest.approx(la[step], abs=1e-5), (step, la[step], lb[step])
    for k, v in sa.items():
        torch.testing.assert_close(sb[k], v, rtol=1e-4, atol=1e-5)


def test_dpo_adapter_off_reference_equals_a_frozen_copy_of_the_base(tmp_path, base_dir):
    from moxin.config import ModelConfig
    from moxin.stages.common import sequence_logps
    from moxin.stages.dpo import DPOStage

    cfg = instantiate(compose_config(TINY_MODEL).model)
    assert isinstance(cfg, ModelConfig)
    stage = DPOStage(model=cfg, init_from=str(base_dir), lora=LoRAConfig(rank=4), reference="frozen")
    stage.configure_model()
    assert stage.ref_model is None  # no second model
    _randomise_adapters(stage.model)
    g = torch.Generator().manual_seed(0)
    P, T = 3, 16
    batch = {"chosen_input_ids": torch.randint(0, 32000, (P, T), generator=g),
             "rejected_input_ids": torch.randint(0, 32000, (P, T), generator=g),
             "chosen_positions": torch.arange(T).expand(P, T), "rejected_positions": torch.arange(T).expand(P, T),
             "pair_index": torch.arange(P)}
    for side in ("chosen", "rejected"):
        lab = batch[f"{side}_input_ids"].roll(-1, 1).clone()
        lab[:, :T // 2] = -100
        batch[f"{side}_labels"] = lab
    rc, rr = stage._reference_logps(batch, "train")
    frozen = load_hf(base_dir).eval().requires_grad_(False)
    ids, labels, pos = DPOStage._cat(batch)
    want, _ = sequence_logps(frozen, ids, labels, pos)
    torch.testing.assert_close(torch.cat([rc, rr]), want, rtol=1e-5, atol=1e-5)
    policy, _ = sequence_logps(stage.model, ids, labels, pos)
    assert (policy - want).abs().max() > 1e-3  # the adapters are on outside the reference


def test_dpo_and_grpo_with_lora_run_end_to_end(tmp_path, base_dir):
    from moxin.data.sample import sample_path

    small = {}
    for name, n in (("preferences", 8), ("preferences_heldout", 4)):
        small[name] = tmp_path / f"{name}.jsonl"
        small[name].write_text("".join(open(sample_path(name)).readlines()[:n]))
    info = R.train(compose_config(["+experiment=dpo", *COMMON, f"init_from={base_dir}", f"out_dir={tmp_path / 'd'}",
                             "run_name=d", f"data.train.path={small['preferences']}",
                             f"data.val.path={small['preferences_heldout']}", "trainer.max_steps=1",
                             "export_hf=false", f"stage.ref_cache_dir={tmp_path / 'cache'}"]))
    m = info["metrics"]
    assert m["val/dpo_margin_before"] == 0.0 and abs(m["val/dpo_loss_before"] - 0.6931) < 1e-3  # policy = reference
    assert not (tmp_path / "cache").exists()  # the adapter-off base is the reference: no cache
    # GRPO: an SFT warm-up with the same adapters (its LoRA checkpoint is GRPO's init_from: merged into its base),
    # then rollouts from the merged copy and a KL to the adapter-off base
    grpo = R.train(compose_config(["+experiment=grpo", *RUN, f"init_from={base_dir}", f"out_dir={tmp_path / 'g'}",
                             "run_name=g", "data.steps=1", "data.prompts_per_step=2", "data.task.pool=2",
                             "stage.grpo.group_size=2", "stage.grpo.max_new_tokens=4", "warmup.steps=2",
                             "warmup.batch_size=4", "warmup.micro_batch_size=4", "stage.grpo.verifier_workers=0",
                             "stage.grpo.kl_coef=0.01", "stage.grpo.filter_zero_std=false",
                             "stage.grpo.rollout_copy=true", "export_hf=true"]))
    assert grpo["optimizer_steps"] >= 1 and (tmp_path / "g" / "hf_adapter" / "adapter_config.json").exists()
    warm = json.loads((tmp_path / "g" / "warmup" / "summary.json").read_text())
    assert grpo["init_checksum"] == pytest.approx(warm["weights_checksum"], rel=1e-9)  # the hand-off merged


def test_lora_bench_runs_tiny_on_the_cpu(tmp_path, monkeypatch, capsys):
    """scripts/bench/lora.py --tiny: the benchmark's code paths (moxin and HF + PEFT, LoRA and QLoRA, SFT, DPO and
    GRPO steps, two rows a step) run (in this process: the imports are already paid for); the HF + PEFT QLoRA
    baseline is skipped with a line saying why where bitsandbytes is not installed."""
    import runpy
    import sys

    pytest.importorskip("peft", reason="peft is not installed (pip install 'moxin[dev]')")
    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench"
    out = tmp_path / "lora.json"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", ["lora.py", "--tiny", "--rows", "2", "--out", str(out)])
    runpy.run_path(str(bench / "lora.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert {(r["step"], r["base"], r["impl"]) for r in rows} == {
        (step, base, impl) for step in ("sft", "dpo", "grpo") for base in ("lora", "qlora")
        for impl in ("moxin", "hf+peft")}
    no_bnb = importlib.util.find_spec("bitsandbytes") is None
    for r in rows:
        if r["impl"] == "hf+peft" and r["base"] == "qlora" and no_bnb:
            assert "bitsandbytes is not installed" in r["error"], r  # skipped, and says why
        else:
            assert r.get("tokens_per_s", 0) > 0, r
    printed = capsys.readouterr().out
    assert "x HF+PEFT" in printed
    assert not no_bnb or "skipped: bitsandbytes is not installed" in printed


@pytest.mark.slow  # two torchrun launches: about 45 s of CPU
def test_fsdp2_lora_resumes_exactly_and_matches_one_process(tmp_path, base_dir):
    """2 gloo processes under FSDP2 (adapters sharded with their blocks): the checkpoint (a distributed one) holds
    the adapters only, a run stopped at step 2 and resumed takes the one-process run's steps."""
    import shutil

    from tests.conftest import torchrun

    over = SFT + COMMON + [f"init_from={base_dir}", "export_hf=false", "trainer.max_steps=4"]
    R.train(compose_config(over + [f"out_dir={tmp_path / 'one'}", "run_name=one"]))
    part = tmp_path / "part"
    args = ["-m", "moxin.run", "hardware=fsdp_cpu", *over, f"out_dir={part}", "run_name=part"]
    root = Path(__file__).resolve().parents[1]
    torchrun(*args, "trainer.max_steps=2", cwd=root, before_retry=lambda: shutil.rmtree(part, ignore_errors=True))
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(part / "checkpoints" / "step000002.ckpt")).read_metadata()
    keys = [k for k in md.state_dict_metadata if k.startswith("state_dict.")]
    assert len(keys) == 28 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    torchrun(*args, "resume=auto", cwd=root)
    a, b = logged_train_losses(tmp_path / "one"), logged_train_losses(part)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])


def test_bad_combinations_are_refused_before_any_work(base_dir):
    from moxin.config import ConfigError
    from moxin.errors import check_lora, preflight

    fsdp = ["hardware=fsdp", f"init_from={base_dir}", "stage.lora.rank=4"]
    with pytest.raises(ConfigError, match="stage.lora.quantize=null"):
        check_lora(compose_config(["+experiment=sft", *fsdp, "stage.lora.quantize=nf4"]))
    with pytest.raises(ConfigError, match="fsdp_param_dtype=bfloat16"):
        check_lora(compose_config(["+experiment=sft", *fsdp, "hardware.parallel.fsdp_param_dtype=null"]))
    check_lora(compose_config(["+experiment=sft", *fsdp]))  # the fsdp profile gathers in bf16: fine
    # preflight runs it (hardware=fsdp_cpu: no GPU needed here)
    with pytest.raises(ConfigError, match="stage.lora.quantize=null"):
        preflight(compose_config(["+experiment=sft", "hardware=fsdp_cpu", f"init_from={base_dir}", "stage.lora.rank=4",
                            "stage.lora.quantize=nf4"]))
