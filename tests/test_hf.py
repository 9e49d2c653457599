"""Parity with Hugging Face `MistralForCausalLM`: loading, saving, sharding, and the sliding-window convention.

The HF model uses sliding_window=8 on sequences of 32 tokens, so the window really bites; matching logits pin
our convention (a query sees keys with 0 <= q - k < W) to HF's.
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM  # noqa: E402

from moxin.model import Transformer  # noqa: E402
from moxin.model.hf import hf_to_moxin_config, load_hf, moxin_to_hf_config, save_hf  # noqa: E402
from moxin.presets import load_preset  # noqa: E402

T = 32


def hf_model(attn: str = "eager", seed: int = 0, **kw) -> MistralForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, vocab_size=256, sliding_window=8, rope_theta=5000.0,
               rms_norm_eps=1e-5, max_position_embeddings=128, tie_word_embeddings=False)
    cfg.update(kw)
    m = MistralForCausalLM(MistralConfig(**cfg, attn_implementation=attn)).eval()
    with torch.no_grad():  # non-trivial norm weights so a norm mix-up shows
        for n, p in m.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return m


def tokens(B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (B, T), generator=g)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    hf_model().save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_load_hf_matches_hf_logits(tmp_path, attn):
    ref = hf_model(attn)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf(tmp_path).eval()
    assert ours.cfg.sliding_window == 8 and ours.cfg.rope_theta == 5000.0 and ours.cfg.head_dim == 16
    x = tokens()
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # the window matters here: with full attention the logits differ
    full = load_hf(tmp_path, sliding_window=None).eval()
    with torch.no_grad():
        assert (full(x) - want).abs().max() > 1e-3


def test_save_hf_loads_in_transformers(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(load_preset("tiny", vocab_size=256, sliding_window=8, attn_backend="sdpa")).eval()
    with torch.no_grad():
        ours.norm.weight.uniform_(0.5, 1.5)
    save_hf(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    x = tokens()
    for attn in ("eager", "sdpa"):
        ref = MistralForCausalLM.from_pretrained(tmp_path / "out", attn_implementation=attn).eval()
        assert ref.config.sliding_window == 8
        with torch.no_grad():
            torch.testing.assert_close(ref(x).logits, ours(x), atol=1e-4, rtol=1e-4)


def test_save_hf_of_a_fused_model(tmp_path):
    """A model with fused projections (its q/k/v and gate/up weights are views of shared tensors, which
    safetensors refuses) exports the same files as the unfused model."""
    torch.manual_seed(0)
    model = Transformer(load_preset("tiny")).requires_grad_(False)
    save_hf(model, tmp_path / "plain")
    save_hf(model.fuse_projections(), tmp_path / "fused")
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "fused" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_round_trip(tmp_path, hf_dir):
    m = load_hf(hf_dir).eval()
    out = save_hf(m, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert len(index["weight_map"]) == 2 * 9 + 3
    back = load_hf(out).eval()
    for (n1, p1), (n2, p2) in zip(m.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ref = MistralForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, m(x), atol=1e-4, rtol=1e-4)


def test_save_is_atomic_and_replaces(tmp_path, hf_dir):
    m = load_hf(hf_dir)
    tok = tmp_path / "tokenizer.json"
    tok.write_text("{}")
    out = tmp_path / "o"
    save_hf(m, out, tokenizer_files=[tok])
    save_hf(m, out, dtype=torch.bfloat16)  # replaces the previous directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o", "tokenizer.json"]  # no temp dirs left
    assert not (out / "tokenizer.json").exists()
    assert load_file(out / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    assert load_hf(out, dtype=torch.bfloat16).output.weight.dtype == torch.bfloat16


def test_config_round_trip():
    cfg = load_preset("moxin-7b")
    hf = moxin_to_hf_config(cfg)
    back = hf_to_moxin_config(hf)
    assert back == cfg
    # transformers-5 style: rope_theta only inside rope_parameters; head_dim null; window null
    hf5 = dict(hf, head_dim=None, sliding_window=None)
    del hf5["rope_theta"]
    hf5["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    c5 = hf_to_moxin_config(hf5)
    assert c5.rope_theta == 12345.0 and c5.head_dim == 128 and c5.sliding_window is None
    # transformers itself reads what we write
    mc = MistralConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    assert mc.num_hidden_layers == 36 and mc.sliding_window == 4096 and mc.head_dim == 128


def test_refuses_other_architectures(tmp_path, hf_dir):
    hf = moxin_to_hf_config(load_preset("tiny"))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        hf_to_moxin_config(dict(hf, architectures=["LlamaForCausalLM"], model_type="llama"))
    with pytest.raises(ValueError, match="mixtral"):
        hf_to_moxin_config(dict(hf, model_type="mixtral"))
    (tmp_path / "config.json").write_text(json.dumps(hf))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors only. Convert"):
        load_hf(tmp_path)


def _rewrite(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_wrong_shape_names_tensor_and_shapes(tmp_path, hf_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(hf_dir, tmp_path / "bad", lambda sd: sd.__setitem__(name, torch.zeros(16, 64)))
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path / "bad")
    msg = str(e.value)
    for part in (name, "layers.1.attention.wk.weight", "(16, 64)", "(32, 64)", "model.safetensors"):
        assert part in msg, (part, msg)


def test_missing_and_unexpected_keys_listed(tmp_path, hf_dir):
    def edit(sd):
        del sd["model.layers.0.mlp.up_proj.weight"]
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    _rewrite(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(ValueError) as e:
        load_hf(tmp_path / "bad")
    msg = str(e.value)
    assert "model.layers.0.mlp.up_proj.weight" in msg and "layers.0.feed_forward.w3.weight" in msg
    assert "model.layers.0.mlp.extra.weight" in msg
    m = load_hf(tmp_path / "bad", strict=False)  # non-strict: the rest loads
    ref = load_hf(hf_dir)
    assert torch.equal(m.layers[1].feed_forward.w3.weight, ref.layers[1].feed_forward.w3.weight)


def test_tied_embeddings_round_trip(tmp_path):
    ref = hf_model(tie_word_embeddings=True)
    ref.save_pretrained(tmp_path / "t", safe_serialization=True)
    ours = load_hf(tmp_path / "t").eval()
    assert ours.output.weight is ours.tok_embeddings.weight
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, atol=1e-4, rtol=1e-4)
    save_hf(ours, tmp_path / "o")
    assert "lm_head.weight" not in load_file(tmp_path / "o" / "model.safetensors")
    back = MistralForCausalLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x).logits, ours(x), atol=1e-4, rtol=1e-4)


def test_convert_script_check(hf_dir, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("convert_hf", Path(__file__).parents[1] / "scripts" / "convert_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["check", str(hf_dir)]) == 0
    out = capsys.readouterr().out
    assert "sliding_window   8" in out and "parameters" in out
