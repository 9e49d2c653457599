"""moxin-cjk: the CJK expert tokenizer (moxin/tokenizer/cjk.py) against the base Mistral tokenizer and against a
plain-Python reference of the whole pipeline (normalize, route, BPE by merge rank, byte fallback)."""

import json
import pickle
import random
from pathlib import Path

import pytest
import torch

from moxin.data.sample import sample_path
from moxin.presets import load_preset
from moxin.tokenizer import format_prompt, load_tokenizer, render_chat
from moxin.tokenizer.cjk import (
    META_FILE, RUN_PATTERN, SAMPLE_HELDOUT_EVERY, base_splits, compose, document_language, export_files,
    extend_embeddings, is_claimed, language_of, runs_of_text, script_runs, train_expert,
)
from moxin.tokenizer.tokenizer import ASSET_DIR, TokenizerError

SPACE = "\u2581"


@pytest.fixture(scope="module")
def base():
    return load_tokenizer("mistral")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("moxin-cjk")


@pytest.fixture(scope="module")
def meta():
    return json.loads((ASSET_DIR / META_FILE).read_text(encoding="utf-8"))


# ---- random mixed-script strings -----------------------------------------------------------------------------
POOLS = [
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789",
    " ", "  ", "\n", "\t", "\r\n", "\u3000",                       # whitespace runs, ideographic space
    ".,;:!?()[]{}<>/\\|'\"`~@#$%^&*-_=+",
    "的是在了我和有不人也你为他这中与年对就都上说国时间會為這個們說對麼於發機關",  # Han, simplified + traditional
    "𠀀𠀁𪚥𫝀",                                                         # Han extension B and later (astral)
    "ひらがなカタカナのをにはがでてしたーゝゞヽヾｱｲｳｴｵ",                # kana, long vowel, iteration, halfwidth
    "한국어텍스트입니다가나다라마바사아자차카타파하ㄱㄴㅎㅏㅓᄀᄂ",          # Hangul syllables, compatibility + conjoining jamo
    "、。「」『』（）！？，：；　々〆〇ＡＢＣ１２３～",                      # CJK punctuation, fullwidth forms
    "😀🎉👍🏽🇯🇵❤️",                                                     # emoji, modifiers, flags, variation selector
    "\u0301\u0308\u0327\u200d\u200b\ufeff",                            # combining marks, ZWJ, ZWSP, BOM
    "éñüßøåçœ",
    "</s>", "<s>", "<unk>", "<|user|>\n", "<|assistant|>\n", "<|system|>\n",
    "def f(x):\n    return x  # 注释\n",
]


def random_text(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        pool = rng.choice(POOLS)
        k = rng.randint(1, 6)
        out.append("".join(rng.choice(pool) for _ in range(k)) if len(pool) > 8 else pool)
    return "".join(out)


RNG_TEXTS = [random_text(random.Random(seed), random.Random(seed).randint(0, 25)) for seed in range(400)]


# ---- plain-Python reference of the pipeline ------------------------------------------------------------------
class ReferenceEncoder:
    """The composed tokenizer.json, executed the slow obvious way: normalize like SentencePiece (" " -> "▁",
    "▁" in front), cut expert runs with Python's re, then per pre-token repeatedly merge the adjacent pair of
    lowest merge rank (leftmost on ties), and spell characters without a piece as <0xNN> bytes."""

    def __init__(self, tok_json: dict):
        import re

        self.vocab = tok_json["model"]["vocab"]
        self.rank = {tuple(m): r for r, m in enumerate(tok_json["model"]["merges"])}
        self.run_re = re.compile(RUN_PATTERN)

    def pretokens(self, normalized: str) -> list[str]:
        out, pos = [], 0
        for m in self.run_re.finditer(normalized):
            if m.start() > pos:
                out.append(normalized[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(normalized):
            out.append(normalized[pos:])
        return out

    def bpe(self, word: str) -> list[int]:
        syms = list(word)
        while True:
            best = None
            for i in range(len(syms) - 1):
                r = self.rank.get((syms[i], syms[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        ids = []
        for s in syms:
            if s in self.vocab:
                ids.append(self.vocab[s])
            else:
                ids += [self.vocab[f"<0x{b:02X}>"] for b in s.encode("utf-8")]
        return ids

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        normalized = SPACE + text.replace(" ", SPACE)
        return [i for p in self.pretokens(normalized) for i in self.bpe(p)]


@pytest.fixture(scope="module")
def reference():
    return ReferenceEncoder(json.loads((ASSET_DIR / "tokenizer.json").read_text(encoding="utf-8")))


# ---- the shipped artifact ------------------------------------------------------------------------------------
def test_load_and_special_ids(tok, base, meta):
    assert tok.name == "moxin-cjk"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (base.bos_id, base.eos_id, base.pad_id) == (1, 2, 0)
    assert tok.vocab_size == meta["vocab_size"] > base.vocab_size == meta["base_vocab_size"] == 32000
    assert [e["lang"] for e in meta["experts"]] == ["zh", "ja", "ko"]
    assert meta["experts"][-1]["end_id"] == tok.vocab_size
    for i in range(base.vocab_size):  # the base vocabulary is untouched, id for id
        assert tok.id_to_token(i) == base.id_to_token(i)
    size = sum(p.stat().st_size for p in ASSET_DIR.iterdir())
    assert size < 4e6, f"artifact is {size / 1e6:.1f} MB"


def test_english_and_code_keep_base_ids(tok, base):
    texts = []
    for name in ("prose", "code"):
        texts += [json.loads(line)["text"] for line in sample_path(name).read_text(encoding="utf-8").splitlines()]
    texts += [line for line in sample_path("chat").read_text(encoding="utf-8").splitlines()]
    assert tok.encode_batch(texts) == base.encode_batch(texts)
    assert tok.encode("\n".join(texts[:50]), bos=True, eos=True) == base.encode("\n".join(texts[:50]), bos=True,
                                                                                eos=True)


def test_random_strings_without_cjk_keep_base_ids(tok, base):
    texts = [t for t in RNG_TEXTS if not is_claimed(t)]
    assert len(texts) > 20
    assert tok.encode_batch(texts) == base.encode_batch(texts)


@pytest.mark.parametrize("text", RNG_TEXTS[:200] + ["", " ", "  中文  ", "\n\n한국어\n", "　全角スペース　", "a中b한c"])
def test_round_trip_is_lossless(tok, text):
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, continuation=True)) == text or text[:1] == " "


def test_round_trip_batch_and_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    ids = clone.encode_batch(RNG_TEXTS)
    assert ids == tok.encode_batch(RNG_TEXTS) == [tok.encode(t) for t in RNG_TEXTS]
    assert [clone.decode(i) for i in ids] == RNG_TEXTS


def test_base_space_marker_decodes_like_the_base(tok, base):
    # U+2581 is the base's own space marker: Mistral decodes it as a space, and so does moxin-cjk (no CJK there).
    for t in ("a\u2581b", "中\u2581文"):
        assert tok.decode(tok.encode(t)) == base.decode(base.encode(t)) == t.replace("\u2581", " ")


def test_rust_pipeline_equals_python_reference(tok, reference):
    texts = RNG_TEXTS + [json.loads(line)["text"] for line in sample_path("cjk").read_text("utf-8").splitlines()]
    for t in texts:
        assert tok.encode(t) == reference.encode(t), t


def test_pre_tokenizer_routes_like_the_reference(tok):
    pre = tok._hf.pre_tokenizer
    for t in RNG_TEXTS:
        normalized = tok._hf.normalizer.normalize_str(t) if t else ""
        pieces = [p for p, _ in pre.pre_tokenize_str(normalized)]
        assert "".join(pieces) == normalized
        assert [p for p in pieces if is_claimed(p)] == script_runs(normalized)
        # a pre-token is either an expert run or holds no claimed character at all
        assert all(p in script_runs(p) or not is_claimed(p) for p in pieces)


def test_expert_pieces_belong_to_their_script(tok, meta):
    for e in meta["experts"]:
        for i in range(e["first_id"], e["end_id"], 97):
            lang = language_of(tok.id_to_token(i))
            assert lang == e["lang"] or (lang == "han" and e["lang"] in ("zh", "ja")), (e["lang"], i)


def test_experts_compress_heldout_sample(tok, base):
    """The held-out split of the sample's cjk.jsonl (every 5th record, never trained on): fewer tokens in each
    language. (The Debian-documentation figures are in scripts/bench/tokenizer.py.)"""
    by_lang = {"zh": [], "ja": [], "ko": []}
    for i, line in enumerate(sample_path("cjk").read_text(encoding="utf-8").splitlines()):
        if i % SAMPLE_HELDOUT_EVERY == 0:
            text = json.loads(line)["text"]
            by_lang[document_language(text)].append(text)
    for lang, texts in by_lang.items():
        assert texts, lang
        text = "\n".join(texts)
        ratio = len(base.encode(text)) / len(tok.encode(text))
        assert ratio > 1.2, (lang, ratio)


def test_chat_template_segments_join_exactly(tok):
    convo = [
        {"role": "system", "content": "你是一个简洁的助手。"},
        {"role": "user", "content": "日本の首都はどこですか？ And Korea?"},
        {"role": "assistant", "content": "東京です。서울입니다.\n  Indented 한국어."},
        {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": "不客气！"},
    ]
    ct = render_chat(convo, tok, add_generation_prompt=False)
    text = format_prompt(convo, add_generation_prompt=False)
    parts = text.split("</s>")
    expected = [tok.bos_id]
    for k, part in enumerate(parts):
        if part:
            expected += tok.encode(part, continuation=k > 0)
        if k < len(parts) - 1:
            expected.append(tok.eos_id)
    assert ct.input_ids == expected
    turns = tok.decode([i for i, m in zip(ct.input_ids, ct.loss_mask) if m])
    assert turns == "東京です。서울입니다.\n  Indented 한국어.不客气！"


def test_transformers_loads_the_same_ids(tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(ASSET_DIR))
    for t in RNG_TEXTS[:100] + ["中文和日本語のテキスト、한국어 텍스트입니다. def f(x): return x"]:
        t = t.replace("</s>", "").replace("<s>", "").replace("<unk>", "")  # transformers parses special strings
        assert hf(t)["input_ids"] == tok.encode(t, bos=True), t
        assert hf.decode(hf(t)["input_ids"], skip_special_tokens=True) == t
    assert hf.convert_tokens_to_ids(hf.eos_token) == tok.eos_id


def test_export_files_name_what_each_tokenizer_spec_copies(tmp_path):
    names = sorted(p.name for p in export_files("moxin-cjk"))
    assert names == sorted(["tokenizer.json", "tokenizer_config.json", META_FILE])
    f = tmp_path / "tokenizer.json"
    f.write_text("{}")
    assert export_files(str(f)) == [f]
    assert export_files("mistral") == []


# ---- building blocks -----------------------------------------------------------------------------------------
def test_runs_of_text_splits_out_the_cjk_runs_with_their_word_marker():
    assert list(runs_of_text("Hello 世界, 안녕 하세요 and 日本語です。")) == [
        "▁世界", "▁안녕", "▁하세요", "▁日本語です。"]
    assert list(runs_of_text("中文")) == ["▁中文"]
    assert script_runs("▁▁中") == ["▁中"]


def _tiny_base() -> dict:
    """A small SentencePiece-style BPE base: bytes, letters, '▁', two Han characters and merges, one touching Han."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for p in ["▁", "a", "b", "中", "文", "▁a", "ab", "中文"]:
        vocab[p] = len(vocab)
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, normalizers

    t = HF(models.BPE(vocab=vocab, merges=[("▁", "a"), ("a", "b"), ("中", "文")], unk_token="<unk>",
                      byte_fallback=True, fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(content=" ", left=1, right=0)])
    return json.loads(t.to_str())


def test_compose_keeps_base_ids_and_appends_experts(tmp_path):
    from moxin.tokenizer.tokenizer import _load_tokenizer_json

    base_json = _tiny_base()
    n = len(base_json["model"]["vocab"])
    ex = train_expert("zh", {"中文字": 5.0, "文字": 3.0, "字": 1.0}, vocab_size=10, min_frequency=1, scale=1.0)
    assert set(ex.pieces) >= {"中", "文", "字", "文字"}
    tj, meta = compose(base_json, [ex])
    assert meta["base_vocab_size"] == n and meta["experts"][0]["first_id"] == n
    vocab = tj["model"]["vocab"]
    assert all(vocab[p] == i for p, i in base_json["model"]["vocab"].items())
    assert vocab["中"] < n and vocab["文字"] >= n  # expert pieces the base has keep the base id
    assert ["中", "文"] not in tj["model"]["merges"]  # base merges touching CJK give way to the experts
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tj))
    t = _load_tokenizer_json(path)
    for text in ("ab 中文字", "中文字ab文字", "ab ab", "字 字"):
        assert t.encode(text) == ReferenceEncoder(tj).encode(text)
        assert t.decode(t.encode(text)) == text
    assert t.encode("ab ab") == [vocab["▁a"], vocab["b"], vocab["▁a"], vocab["b"]]  # base merges, base ids
    assert any(i >= n for i in t.encode("ab 中文字"))


def test_compose_and_train_errors_name_the_problem():
    with pytest.raises(TokenizerError, match="ByteLevel"):
        compose({"model": {"type": "BPE", "vocab": {}}, "pre_tokenizer": {"type": "ByteLevel"}}, [])
    with pytest.raises(TokenizerError, match="Unigram"):
        compose({"model": {"type": "Unigram"}}, [])
    with pytest.raises(TokenizerError, match="not a single CJK run"):
        train_expert("zh", {"abc": 1.0}, vocab_size=10)
    with pytest.raises(TokenizerError, match="expected one of"):
        train_expert("fr", {"中": 1.0}, vocab_size=10)


# ---- model side ----------------------------------------------------------------------------------------------
def test_extend_embeddings_means_of_the_base_split(tok, base):
    torch.manual_seed(0)
    emb = torch.randn(base.vocab_size, 8)
    out = torch.randn(base.vocab_size, 8)
    state = {"tok_embeddings.weight": emb, "output.weight": out, "norm.weight": torch.ones(8)}
    grown = extend_embeddings(state, tok, base)
    assert grown["tok_embeddings.weight"].shape == (tok.vocab_size, 8)
    assert torch.equal(grown["tok_embeddings.weight"][: base.vocab_size], emb)
    assert grown["norm.weight"] is state["norm.weight"]
    for i in (base.vocab_size, base.vocab_size + 1234, tok.vocab_size - 1):
        text = tok.decode([i]) if not tok.id_to_token(i).startswith(SPACE) else " " + tok.decode([i])
        ids = base.encode("\n" + text)[len(base.encode("\n")):]
        assert base.decode(ids) == text.lstrip(" ") or base.decode(ids).strip() == text.strip()
        assert torch.allclose(grown["output.weight"][i], out[ids].mean(0))
    assert base_splits(tok, base, [base.vocab_size])[0]
    with pytest.raises(TokenizerError, match="rows"):
        extend_embeddings({"tok_embeddings.weight": torch.zeros(100, 8)}, tok, base)


def test_extend_vocab_script_hf_folder_and_checkpoint(tmp_path, tok, base, monkeypatch):
    """scripts/extend_vocab.py: a HF folder becomes a HF folder with the grown matrices and the expert tokenizer
    (loadable by moxin and by transformers with the same ids); a moxin checkpoint becomes a .safetensors that
    init_from accepts for a model of the extended size."""
    import importlib.util

    from moxin.model import Transformer
    from moxin.model.hf import load_hf, save_hf
    from moxin.checkpoint.weights import load_init_weights

    spec = importlib.util.spec_from_file_location("extend_vocab", Path(__file__).resolve().parents[1] / "scripts" /
                                                  "extend_vocab.py")
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    monkeypatch.setattr(ev, "load_tokenizer", {"moxin-cjk": tok, "mistral": base}.__getitem__)  # loaded once
    cfg = load_preset("tiny").replace(vocab_size=base.vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg)
    save_hf(model, tmp_path / "hf")
    ev.main([str(tmp_path / "hf"), str(tmp_path / "hf-cjk"), "--pad-to", "64"])
    grown = load_hf(tmp_path / "hf-cjk")
    rows = -(-tok.vocab_size // 64) * 64
    assert grown.cfg.vocab_size == rows
    new_emb = grown.tok_embeddings.weight.detach()
    assert torch.equal(new_emb[: base.vocab_size], model.tok_embeddings.weight.detach())
    i = tok.encode("中国")[-1]
    assert i >= base.vocab_size
    split = base_splits(tok, base, [i])[0]
    assert torch.allclose(new_emb[i], model.tok_embeddings.weight.detach()[split].mean(0), atol=1e-6)
    exported = load_tokenizer(tmp_path / "hf-cjk")
    text = "中文、日本語のテキスト、한국어 and English."
    assert exported.encode(text) == tok.encode(text) and exported.vocab_size == tok.vocab_size

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    ev.main([str(ckpt), str(tmp_path / "cjk.safetensors")])
    target = Transformer(cfg.replace(vocab_size=tok.vocab_size))
    load_init_weights(target, str(tmp_path / "cjk.safetensors"))
    assert torch.equal(target.output.weight.detach()[: base.vocab_size], model.output.weight.detach())
