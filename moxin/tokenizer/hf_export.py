"""Tokenizer files for a Hugging Face export, so that `AutoTokenizer` + `apply_chat_template` give moxin's ids.

:func:`write_hf_tokenizer_files` writes ``tokenizer.json`` (moxin's SentencePiece-BPE port with ``<s>`` added
as moxin adds it), ``tokenizer_config.json`` (with the Tülu chat template for post-trained models) and
``generation_config.json``. Why each file, and the known differences from moxin's tokenizer:
docs/modules.md, "tokenizer/hf_export.py".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import DictConfig
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, normalizers, pre_tokenizers, processors

from moxin.tokenizer import as_tokenizer, mistral_model_path, sentencepiece_to_tokenizers
from moxin.tokenizer.cjk import export_files
from moxin.ui import stage_kind

#: The Tülu 3 template of moxin/tokenizer/chat.py in Jinja. It begins with ``bos_token + ' '``: the space stands
#: for SentencePiece's dummy prefix on the first text segment (moxin's ``render_chat`` encodes that segment with
#: it), which HF's tokenizer only adds at offset 0 and the bos token occupies that offset.
TULU_CHAT_TEMPLATE = (
    "{{ bos_token + ' ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
    "{% if not loop.last %}{{ '\n' }}{% endif %}"
    "{% else %}{{ raise_exception('unknown role ' + message['role'] + '; expected system, user or assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

CHAT_STAGES = ("sft", "dpo", "grpo")


def _hf_tokenizer_json(spec: str):
    """moxin's tokenizer as a `tokenizers.Tokenizer` with HF's conventions (bos added, specials split out)."""
    path = mistral_model_path() if spec == "mistral" else Path(spec)
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    tok = sentencepiece_to_tokenizers(proto)
    if proto.normalizer_spec.remove_extra_whitespaces:
        raise NotImplementedError("remove_extra_whitespaces SentencePiece models are exported without tokenizer.json")
    if proto.normalizer_spec.add_dummy_prefix:  # the Prepend normalizer would run on every segment
        tok.normalizer = normalizers.Sequence([])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    pieces = [p.piece for p in proto.pieces]
    ts = proto.trainer_spec
    specials = [pieces[i] for i in (ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id) if 0 <= i < len(pieces)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    bos = pieces[ts.bos_id] if ts.bos_id >= 0 else None
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, ts.bos_id)])
    return tok


def write_hf_tokenizer_files(hf_dir: str | Path, cfg: DictConfig, tokenizer=None) -> list[Path]:
    """Write tokenizer.json (SentencePiece tokenizers), tokenizer_config.json and generation_config.json into
    an exported model folder for the run's ``tokenizer`` (None: ``cfg.tokenizer`` is loaded). Returns the files
    written."""
    hf_dir = Path(hf_dir)
    tok = as_tokenizer(cfg.tokenizer if tokenizer is None else tokenizer)
    spec = tok.name  # "mistral" (any of its aliases), or the path of the file it was loaded from
    written = []
    is_sp = spec == "mistral" or spec.endswith(".model")
    if is_sp:
        _hf_tokenizer_json(spec).save(str(hf_dir / "tokenizer.json"))
        written.append(hf_dir / "tokenizer.json")

    def piece(i):
        return tok.id_to_token(i) if i is not None else None

    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tok._bos_id), "eos_token": piece(tok._eos_id), "unk_token": piece(tok._unk_id()),
        "pad_token": piece(tok._pad_id), "add_bos_token": tok._bos_id is not None, "add_eos_token": False,
        "model_max_length": int(cfg.model.get("max_seq_len", 4096)), "clean_up_tokenization_spaces": False,
    }
    tc = {k: v for k, v in tc.items() if v is not None}
    if stage_kind(cfg) in CHAT_STAGES:
        tc["chat_template"] = TULU_CHAT_TEMPLATE if getattr(tok, "_dummy_prefix", is_sp) else \
            TULU_CHAT_TEMPLATE.replace("{{ bos_token + ' ' }}", "{{ bos_token }}")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    written.append(hf_dir / "tokenizer_config.json")
    gen = {"bos_token_id": tok._bos_id, "eos_token_id": tok._eos_id, "do_sample": False,
           "max_new_tokens": 256}
    if tok._pad_id is not None:
        gen["pad_token_id"] = tok._pad_id
    (hf_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    written.append(hf_dir / "generation_config.json")
    return written


def write_export_tokenizer(hf_dir: str | Path, cfg: DictConfig, tokenizer=None) -> list[Path]:
    """Everything tokenizer-side a Hugging Face export carries, as a run's `hf/` has it: the tokenizer's own files
    (moxin-cjk's tokenizer.json and experts' metadata, or a tokenizer file given by path), the SentencePiece model
    as tokenizer.model for the Mistral tokenizer, then :func:`write_hf_tokenizer_files`. Used by the run's export
    and by scripts/convert_checkpoint.py."""
    hf_dir = Path(hf_dir)
    written = []
    for f in export_files(cfg.tokenizer):
        if not (hf_dir / f.name).exists():
            shutil.copy2(f, hf_dir / f.name)
        written.append(hf_dir / f.name)
    tok = as_tokenizer(cfg.tokenizer if tokenizer is None else tokenizer)
    if tok.name == "mistral":  # the SentencePiece model, under the name HF's LlamaTokenizer expects
        shutil.copy2(mistral_model_path(), hf_dir / "tokenizer.model")
        written.append(hf_dir / "tokenizer.model")
    return written + write_hf_tokenizer_files(hf_dir, cfg, tok)
