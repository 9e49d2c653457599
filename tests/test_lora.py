"""LoRA / QLoRA (moxin/model/lora.py): the adapted forward is the dense forward of the merged weights, only the
adapters train and only they are checkpointed, resume is exact, the adapter-off model is the starting weights (DPO's
and GRPO's reference), and the exported PEFT adapter loaded by PEFT on the base gives moxin's merged export."""

from __future__ import annotations

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
from tests.test_run import _compose, _losses

TINY_MODEL = ["model.dim=64", "model.n_layers=2", "model.hidden_dim=128", "model.n_heads=4", "model.n_kv_heads=2",
              "model.head_dim=16", "model.sliding_window=32"]
RUN = TINY_MODEL + ["trainer.val_every_n_steps=null", "samples.prompts=[]", "trainer.progress_bar=none",
                    "hardware.num_workers=0", "trainer.checkpoint_every_n_steps=100", "stage.lora.rank=4",
                    "stage.lora.alpha=8"]
COMMON = RUN + ["data.batch_size=8", "data.micro_batch_size=4"]
SFT = ["+experiment=sft", "data.max_length=128", "stage.optim.lr=1e-2"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    """A random tiny base model as a Hugging Face folder (what LoRA runs start from)."""
    cfg = instantiate(_compose(TINY_MODEL).model)
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
    info = R.train(_compose(SFT + COMMON + [f"init_from={base_dir}", f"out_dir={tmp_path / 'a'}", "run_name=a",
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
    from moxin.checkpointing import load_model_weights

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
    R.train(_compose(SFT + COMMON + [f"init_from={base_dir}", f"out_dir={tmp_path / 'a'}", "run_name=a",
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
    R.train(_compose(base + [f"out_dir={tmp_path / 'full'}", "run_name=full", "trainer.max_steps=4"]))
    R.train(_compose(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=2"]))
    R.train(_compose(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=4", "resume=auto"]))
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "part")
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
        R.train(_compose(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=5",
                                 "resume=auto", "stage.lora.rank=8"]))


def test_dpo_adapter_off_reference_equals_a_frozen_copy_of_the_base(tmp_path, base_dir):
    from moxin.config import ModelConfig
    from moxin.stages.common import sequence_logps
    from moxin.stages.dpo import DPOStage

    cfg = instantiate(_compose(TINY_MODEL).model)
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
    info = R.train(_compose(["+experiment=dpo", *COMMON, f"init_from={base_dir}", f"out_dir={tmp_path / 'd'}",
                             "run_name=d", f"data.train.path={small['preferences']}",
                             f"data.val.path={small['preferences_heldout']}", "trainer.max_steps=1",
                             "export_hf=false", f"stage.ref_cache_dir={tmp_path / 'cache'}"]))
    m = info["metrics"]
    assert m["val/dpo_margin_before"] == 0.0 and abs(m["val/dpo_loss_before"] - 0.6931) < 1e-3  # policy = reference
    assert not (tmp_path / "cache").exists()  # the adapter-off base is the reference: no cache
    # GRPO: an SFT warm-up with the same adapters (its LoRA checkpoint is GRPO's init_from: merged into its base),
    # then rollouts from the merged copy and a KL to the adapter-off base
    grpo = R.train(_compose(["+experiment=grpo", *RUN, f"init_from={base_dir}", f"out_dir={tmp_path / 'g'}",
                             "run_name=g", "data.steps=1", "data.prompts_per_step=2", "data.task.pool=2",
                             "stage.grpo.group_size=2", "stage.grpo.max_new_tokens=4", "warmup.steps=2",
                             "warmup.batch_size=4", "warmup.micro_batch_size=4", "stage.grpo.verifier_workers=0",
                             "stage.grpo.kl_coef=0.01", "stage.grpo.filter_zero_std=false",
                             "stage.grpo.rollout_copy=true", "export_hf=true"]))
    assert grpo["optimizer_steps"] >= 1 and (tmp_path / "g" / "hf_adapter" / "adapter_config.json").exists()
    warm = json.loads((tmp_path / "g" / "warmup" / "summary.json").read_text())
    assert grpo["init_checksum"] == pytest.approx(warm["weights_checksum"], rel=1e-9)  # the hand-off merged


def test_lora_bench_runs_tiny_on_the_cpu(tmp_path, monkeypatch, capsys):
    """scripts/bench/lora.py --tiny: the benchmark's code paths (moxin and HF + PEFT, SFT and DPO steps) run (in this
    process: the imports are already paid for)."""
    import runpy
    import sys

    pytest.importorskip("peft", reason="peft is not installed (pip install 'moxin[dev]')")
    bench = Path(__file__).resolve().parents[1] / "scripts" / "bench"
    out = tmp_path / "lora.json"
    monkeypatch.syspath_prepend(str(bench))
    monkeypatch.setattr(sys, "argv", ["lora.py", "--tiny", "--bases", "lora", "--out", str(out)])
    runpy.run_path(str(bench / "lora.py"), run_name="__main__")
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(row.get("tokens_per_s", 0) > 0 for row in rows), rows
    assert "x HF+PEFT" in capsys.readouterr().out


@pytest.mark.slow  # two torchrun launches: about 45 s of CPU
def test_fsdp2_lora_resumes_exactly_and_matches_one_process(tmp_path, base_dir):
    """2 gloo processes under FSDP2 (adapters sharded with their blocks): the checkpoint (a distributed one) holds
    the adapters only, a run stopped at step 2 and resumed takes the one-process run's steps."""
    import shutil

    from tests.conftest import torchrun

    over = SFT + COMMON + [f"init_from={base_dir}", "export_hf=false", "trainer.max_steps=4"]
    R.train(_compose(over + [f"out_dir={tmp_path / 'one'}", "run_name=one"]))
    part = tmp_path / "part"
    args = ["-m", "moxin.run", "hardware=fsdp_cpu", *over, f"out_dir={part}", "run_name=part"]
    root = Path(__file__).resolve().parents[1]
    torchrun(*args, "trainer.max_steps=2", cwd=root, before_retry=lambda: shutil.rmtree(part, ignore_errors=True))
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(part / "checkpoints" / "step000002.ckpt")).read_metadata()
    keys = [k for k in md.state_dict_metadata if k.startswith("state_dict.")]
    assert len(keys) == 28 and all(k.endswith((".lora_A", ".lora_B")) for k in keys)
    torchrun(*args, "resume=auto", cwd=root)
    a, b = _losses(tmp_path / "one"), _losses(part)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])


def test_bad_combinations_are_refused_before_any_work(base_dir):
    from moxin.config import ConfigError
    from moxin.errors import check_lora, preflight

    fsdp = ["hardware=fsdp", f"init_from={base_dir}", "stage.lora.rank=4"]
    with pytest.raises(ConfigError, match="stage.lora.quantize=null"):
        check_lora(_compose(["+experiment=sft", *fsdp, "stage.lora.quantize=nf4"]))
    with pytest.raises(ConfigError, match="fsdp_param_dtype=bfloat16"):
        check_lora(_compose(["+experiment=sft", *fsdp, "hardware.parallel.fsdp_param_dtype=null"]))
    check_lora(_compose(["+experiment=sft", *fsdp]))  # the fsdp profile gathers in bf16: fine
    # preflight runs it (hardware=fsdp_cpu: no GPU needed here)
    with pytest.raises(ConfigError, match="stage.lora.quantize=null"):
        preflight(_compose(["+experiment=sft", "hardware=fsdp_cpu", f"init_from={base_dir}", "stage.lora.rank=4",
                            "stage.lora.quantize=nf4"]))
