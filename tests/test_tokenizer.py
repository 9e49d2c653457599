"""Tokenizer: exact parity of the fast tokenizers backend with the sentencepiece library, round trips, errors."""

import json
import pickle

import pytest

sentencepiece = pytest.importorskip("sentencepiece")

from moxin.tokenizer import TokenizerError, load_tokenizer, mistral_model_path  # noqa: E402

MIXED_TEXTS = [
    "It was the best of times, it was the worst of times.",
    "def add(a, b):\n    \"\"\"Add.\"\"\"\n\tif a:\n\t\treturn a + b\n        # eight spaces\n",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    spaces   inside\t\ttabs",
    "line one\nline two\n\n\nafter blank lines\r\n",
    "digits 1234567890 and 3.14159, 2024-01-31, 0x1F",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧",
    "中文：道可道，非常道；名可名，非常名。",
    "日本語：春はあけぼの。やうやう白くなりゆく山ぎは。",
    "한국어: 모든 인간은 태어날 때부터 자유롭다.",
    "rare bytes \x00\x01\x07\x7f \u2028 \U0001d518\U0001d52b ꙮ \ufeff",
    "mixed: naïve café – “quotes” — ½ ∑ ∫ Ω",
    "text with </s> and <s> and <unk> as plain text",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def sp():
    return sentencepiece.SentencePieceProcessor(model_file=str(mistral_model_path()))


def test_mistral_special_ids(tok):
    assert tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.pad_id == 0 and tok.pad_id != tok.eos_id
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 2
    assert tok.token_to_id("<0x0A>") is not None
    assert tok.token_to_id("definitely-not-a-piece") is None


@pytest.mark.parametrize("text", MIXED_TEXTS)
def test_encoding_equals_sentencepiece(tok, sp, text):
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text))


def test_stdlib_source_and_concatenation_parity(tok, sp):
    import inspect
    import json as json_mod
    import textwrap

    texts = [inspect.getsource(m) for m in (json_mod.decoder, textwrap)] + ["\n\n".join(MIXED_TEXTS)]
    assert tok.encode_batch(texts) == [sp.encode(t) for t in texts]


@pytest.mark.parametrize("text", [t for t in MIXED_TEXTS if "<" not in t])
def test_decoding_the_encoded_text_gives_it_back(tok, text):
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_special_text_is_not_a_control_token(tok):
    ids = tok.encode("</s>")
    assert tok.eos_id not in ids and tok.decode(ids) == "</s>"


def test_bos_eos_and_batch(tok):
    ids = tok.encode("Hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == tok.encode("Hello world")
    assert tok.encode_batch(["a b", "c"], bos=True) == [tok.encode("a b", bos=True), tok.encode("c", bos=True)]
    assert tok.decode(ids, skip_special=False).startswith("<s>")
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(b"bytes")


def test_continuation_joins_exactly(tok):
    whole = "<|user|>\nHi\n<|assistant|>\n Hello there"
    head, tail = "<|user|>\nHi\n<|assistant|>\n", " Hello there"
    assert tok.encode(head) + tok.encode(tail, continuation=True) == tok.encode(whole)


def test_pickle_round_trip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    text = MIXED_TEXTS[1] + MIXED_TEXTS[8]
    assert clone.encode(text) == tok.encode(text)
    assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.vocab_size) == (1, 2, 0, 32000)


def test_sentencepiece_model_path(tok):
    other = load_tokenizer(str(mistral_model_path()))
    assert other.encode(MIXED_TEXTS[0]) == tok.encode(MIXED_TEXTS[0])


def test_tokenizer_json_path(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    data = json.loads(tok._hf.to_str())
    data["added_tokens"] = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
         "special": True}
        for i, c in ((0, "<unk>"), (1, "<s>"), (2, "</s>"))
    ]
    path.write_text(json.dumps(data))
    loaded = load_tokenizer(str(path))
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    assert loaded.encode(MIXED_TEXTS[8]) == tok.encode(MIXED_TEXTS[8])
    assert loaded.encode("</s>") == tok.encode("</s>")  # special strings in text stay text
    assert load_tokenizer(str(tmp_path)).encode("abc") == tok.encode("abc")  # directory form


def test_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(TokenizerError, match="nope.model.*no such file.*mistral"):
        load_tokenizer(str(missing))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01not a model at all")
    with pytest.raises(TokenizerError, match="junk.model.*not a SentencePiece model"):
        load_tokenizer(str(junk))
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json.*not a readable"):
        load_tokenizer(str(bad_json))
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None else ""))
