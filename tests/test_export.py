"""An HF export's tokenizer files: `AutoTokenizer` adds <s> as moxin does, and `apply_chat_template` on a
post-trained model's export gives the ids of moxin's own chat renderer (moxin/tokenizer/chat.py)."""

from __future__ import annotations

import json

import pytest

from moxin.presets import load_preset
from moxin.tokenizer import load_tokenizer, render_chat
from moxin.tokenizer.hf_export import write_hf_tokenizer_files
from tests.helpers.compose import compose_config

transformers = pytest.importorskip("transformers")

CONVS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  there"},
     {"role": "assistant", "content": " Hello!\nx"}, {"role": "user", "content": "再见, def f(x):\n    return x"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "d"}],
]


def _export(tmp_path, experiment):
    cfg = compose_config([f"+experiment={experiment}", f"out_dir={tmp_path}", "run_name=x"])
    d = tmp_path / "hf"
    d.mkdir()
    write_hf_tokenizer_files(d, cfg)
    return d, transformers.AutoTokenizer.from_pretrained(d)


def test_sft_export_chat_template_gives_moxin_ids(tmp_path):
    d, hf = _export(tmp_path, "sft")
    tok = load_tokenizer("mistral")
    for conv in CONVS:
        for gen in (False, True):
            ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert list(ids) == render_chat(conv, tok, add_generation_prompt=gen).input_ids, (conv, gen)
    for text in ["Hello world", "def f(x):\n    return x", "人工智能", "a\n\nb  c", ""]:
        assert hf(text)["input_ids"] == tok.encode(text, bos=True), text
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["bos_token_id"] == tok.bos_id and gen["eos_token_id"] == tok.eos_id


def test_pretrain_export_has_no_chat_template(tmp_path):
    d, hf = _export(tmp_path, "pretrain")
    assert "chat_template" not in json.loads((d / "tokenizer_config.json").read_text())
    assert hf("Hello world")["input_ids"][0] == 1  # <s> added, as moxin's encode(bos=True)


def test_convert_checkpoint_writes_the_tokenizer_like_a_run_export(tmp_path):
    """scripts/convert_checkpoint.py on a run's weights writes the tokenizer files a run's hf/ has (found from the
    run's saved config: an SFT run's export gets the chat template), so AutoTokenizer loads the folder."""
    import subprocess
    import sys
    from pathlib import Path

    import torch
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from moxin.model import Transformer

    root = Path(__file__).resolve().parent.parent
    run = tmp_path / "runs" / "s"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose_config(["+experiment=sft", f"out_dir={run}", "run_name=s"]), run / ".hydra" / "config.yaml")
    torch.manual_seed(0)
    save_file(Transformer(load_preset("tiny")).state_dict(), str(run / "weights.safetensors"))
    out = tmp_path / "hf"
    res = subprocess.run([sys.executable, str(root / "scripts" / "convert_checkpoint.py"), str(run / "weights.safetensors"),
                          str(out), "--model", "tiny"], cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    hf = transformers.AutoTokenizer.from_pretrained(out)
    tok = load_tokenizer("mistral")
    ids = hf.apply_chat_template(CONVS[0], tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert list(ids) == render_chat(CONVS[0], tok).input_ids
