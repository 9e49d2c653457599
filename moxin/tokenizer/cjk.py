"""Tokenizer-level mixture of experts for Chinese, Japanese and Korean (``load_tokenizer("moxin-cjk")``).

A base BPE tokenizer (Mistral v1 by default) joined with one separately trained BPE expert per language whose
pieces are appended after the base vocabulary; a ``Split`` pre-tokenizer routes CJK runs so expert merges fire
only there, and everything else keeps exactly the base ids. One ``tokenizers`` pipeline, so the export is a
``tokenizer.json`` that transformers loads with the same ids. How and why: docs/modules.md, "tokenizer/cjk.py".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from moxin.tokenizer.tokenizer import SPIECE_UNDERLINE, TokenizerError, cjk_tokenizer_dir
#: File beside tokenizer.json describing the experts (id ranges, training sources).
META_FILE = "moxin_cjk.json"

# ---- scripts ---------------------------------------------------------------------------------------------------
#: Hangul: Jamo, compatibility Jamo, Jamo extended A/B, syllables.
HANGUL = "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff"
#: Kana: hiragana, katakana (with the long-vowel mark ー), phonetic extensions, halfwidth katakana.
KANA = "\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f"
#: Han: CJK unified ideographs, extension A, compatibility ideographs, the supplementary planes (ext. B and on),
#: and the CJK strokes / radicals blocks.
HAN = "\u2e80-\u2fdf\u31c0-\u31ef\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003ffff"
#: CJK symbols and punctuation (、。「」々〆 and the ideographic space) and the fullwidth forms (，！？（）０-９).
CJK_PUNCT = "\u3000-\u303f\uff01-\uff65\uffe0-\uffee"

#: Characters claimed by the experts (everything else belongs to the base).
CLAIMED_CLASS = f"[{HANGUL}{KANA}{HAN}{CJK_PUNCT}]"
_CLAIMED_RE = re.compile(CLAIMED_CLASS)
#: Pre-tokens handed to the experts: a Hangul run, or a Han/kana/CJK-punctuation run, each with at most one
#: leading "▁" (the space before a Korean word, or the base's dummy prefix at the start of the text).
#: (Written with one shared "▁?" rather than one per alternative: the same matches, ~10 % faster on Latin text.)
RUN_PATTERN = f"{SPIECE_UNDERLINE}?(?:[{HANGUL}]+|[{HAN}{KANA}{CJK_PUNCT}]+)"
_RUN_RE = re.compile(RUN_PATTERN)

LANGS = ("zh", "ja", "ko")
#: Every SAMPLE_HELDOUT_EVERY-th record of the sample's cjk.jsonl is held out from expert training (evaluation).
SAMPLE_HELDOUT_EVERY = 5


def is_claimed(s: str) -> bool:
    """Whether ``s`` contains a character that an expert owns (Han, kana, Hangul, CJK punctuation)."""
    return _CLAIMED_RE.search(s) is not None


def script_runs(normalized: str) -> list[str]:
    """The expert pre-tokens of an already normalized string (``"▁"`` for spaces), in order. Reference
    implementation of the ``Split`` pre-tokenizer (tests hold the Rust one to it)."""
    return _RUN_RE.findall(normalized)


def language_of(piece: str) -> str | None:
    """Which expert's script a piece belongs to: ``"ko"`` (Hangul), ``"ja"`` (has kana), ``"han"`` (Han or CJK
    punctuation only: shared by zh and ja) or None (no claimed character)."""
    if re.search(f"[{HANGUL}]", piece):
        return "ko"
    if re.search(f"[{KANA}]", piece):
        return "ja"
    return "han" if is_claimed(piece) else None


def document_language(text: str) -> str:
    """zh / ja / ko of a whole document by script: any Hangul -> ko, else any kana -> ja, else zh."""
    if re.search(f"[{HANGUL}]", text):
        return "ko"
    return "ja" if re.search(f"[{KANA}]", text) else "zh"


#: The scripts (language_of values) whose pre-tokens each expert is trained on.
_SCRIPTS_OF = {"zh": ("han",), "ja": ("ja", "han"), "ko": ("ko",)}


# ---- training one expert -----------------------------------------------------------------------------------------
@dataclass
class Expert:
    """One language's BPE: its pieces (alphabet first, then merge results, in the trainer's id order) and merges
    (in rank order). ``sources`` records what it was trained on (written into the artifact's metadata)."""

    lang: str
    pieces: list[str]
    merges: list[tuple[str, str]]
    sources: list[str] = field(default_factory=list)


def runs_of_text(text: str) -> Iterator[str]:
    """Expert pre-tokens of raw text, normalized as the Mistral base normalizes it (a leading "▁", spaces -> "▁")."""
    for line in text.splitlines():
        if line.strip():
            yield from script_runs(SPIECE_UNDERLINE + line.replace(" ", SPIECE_UNDERLINE))


def train_expert(lang: str, counts: Mapping[str, float], vocab_size: int, *, min_frequency: int = 2,
                 max_token_length: int | None = 8, limit_alphabet: int = 30000, scale: float | None = None,
                 sources: Sequence[str] = ()) -> Expert:
    """Train one BPE expert on pre-token counts with the ``tokenizers`` trainer.

    ``counts`` maps a pre-token (a run as :func:`script_runs` gives it, e.g. ``"中国"`` or ``"▁한국어"``) to its
    frequency; frequencies may be relative (word-frequency lists): they are multiplied by ``scale`` (default:
    so that they add up to 20 million) and rounded, at least 1. Pre-tokens holding characters that do not belong
    to this expert's script raise, naming the word, because they would be routed to another expert at encode time.
    ``limit_alphabet`` keeps only that many most frequent characters as single pieces (rarer ones keep the base's
    id or byte fallback), leaving the rest of ``vocab_size`` to multi-character pieces.
    """
    if lang not in LANGS:
        raise TokenizerError(f"expert language {lang!r}: expected one of {LANGS}")
    words = {w: c for w, c in counts.items() if w and c > 0}
    for w in words:
        if _RUN_RE.fullmatch(w) is None:
            raise TokenizerError(f"expert {lang!r}: training word {w!r} is not a single CJK run "
                                 f"(split text with runs_of_text first)")
    # Another language's script in a word list (Hangul in the ja list, kana in the zh list) is dropped: a piece
    # of it would sit in this expert's id range but belong to another expert's pre-tokens.
    words = {w: c for w, c in words.items() if language_of(w) in _SCRIPTS_OF[lang]}
    if not words:
        raise TokenizerError(f"expert {lang!r}: no training words in its script (all sources empty?)")
    total = sum(words.values())
    scale = scale if scale is not None else 2e7 / total
    rounded = {w: max(1, round(c * scale)) for w, c in words.items()}

    def batches() -> Iterator[list[str]]:
        batch, size = [], 0
        for w, c in rounded.items():
            while c > 0:  # a word repeated c times, as one whitespace-separated string (at most 4096 at a time)
                k = min(c, 4096)
                batch.append(" ".join([w] * k))
                size += k
                c -= k
                if size >= 200_000:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  max_token_length=max_token_length, limit_alphabet=limit_alphabet)
    tok.train_from_iterator(batches(), trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    pieces = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    return Expert(lang, pieces, merges, list(sources))


# ---- composing base + experts ------------------------------------------------------------------------------------
def compose(base: dict, experts: Sequence[Expert]) -> tuple[dict, dict]:
    """Join a base ``tokenizer.json`` (as a dict) and trained experts into one tokenizer.json dict.

    Returns ``(tokenizer_json, meta)``. Base ids are unchanged; each expert piece that the base (or an earlier
    expert) lacks gets the next free id, in the experts' order. ``meta`` lists, per expert, its new id range and
    how many of its pieces reuse existing ids.
    """
    model = base.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"base tokenizer model is {model.get('type')!r}; the CJK experts extend a BPE base "
                             "(SentencePiece-style, like Mistral or Llama 2)")
    pre = base.get("pre_tokenizer")
    if pre is not None and pre.get("type") != "Metaspace":
        raise TokenizerError(f"base pre-tokenizer {pre.get('type')!r} is not supported (only none or Metaspace: the "
                             "experts' pieces are written with '▁' for spaces, not byte-level characters)")
    vocab: dict[str, int] = dict(model["vocab"])
    n_base = len(vocab)
    if sorted(vocab.values()) != list(range(n_base)):
        raise TokenizerError("base tokenizer vocabulary ids are not 0..N-1; cannot append expert ids after it")
    base_merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    kept = [m for m in base_merges if not (is_claimed(m[0]) or is_claimed(m[1]))]

    meta = {"base_vocab_size": n_base, "experts": []}
    for ex in experts:
        start, reused = len(vocab), 0
        for p in ex.pieces:
            if p in vocab:
                reused += 1
            else:
                vocab[p] = len(vocab)
        meta["experts"].append({"lang": ex.lang, "first_id": start, "end_id": len(vocab), "pieces": len(ex.pieces),
                                "reused_ids": reused, "merges": len(ex.merges), "sources": ex.sources})
    # Expert merges, interleaved by relative rank (zh and ja share Han pre-tokens; ko never meets them).
    ranked = []
    for k, ex in enumerate(experts):
        n = max(len(ex.merges), 1)
        ranked += [((r + 1) / n, k, m) for r, m in enumerate(ex.merges)]
    ranked.sort(key=lambda t: (t[0], t[1]))
    seen = set(kept)
    merges = list(kept)
    for _, _, m in ranked:
        if m not in seen:
            seen.add(m)
            merges.append(m)
    meta["vocab_size"] = len(vocab)

    split = {"type": "Split", "pattern": {"Regex": RUN_PATTERN}, "behavior": "Isolated", "invert": False}
    out = dict(base)
    out["model"] = dict(model, vocab=vocab, merges=[list(m) for m in merges])
    out["pre_tokenizer"] = split if pre is None else {"type": "Sequence", "pretokenizers": [pre, split]}
    return out, meta


def add_special_tokens(tok_json: dict, specials: Mapping[str, str]) -> dict:
    """Mark existing vocabulary entries as special ``added_tokens`` (``{"bos": "<s>", ...}``) and give the file a
    post-processor that prepends bos, as the Mistral tokenizer does in ``transformers``. Ids do not change; moxin
    encodes with ``add_special_tokens=False`` and text-is-text, so neither affects moxin's own ids."""
    vocab = tok_json["model"]["vocab"]
    have = {t["content"] for t in tok_json.get("added_tokens") or []}
    added = list(tok_json.get("added_tokens") or [])
    for name in ("unk", "bos", "eos"):
        s = specials.get(name)
        if s is None or s in have:
            continue
        if s not in vocab:
            raise TokenizerError(f"special token {s!r} ({name}) is not in the base vocabulary")
        added.append({"id": vocab[s], "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    tok_json["added_tokens"] = sorted(added, key=lambda t: t["id"])
    bos = specials.get("bos")
    if bos is not None and tok_json.get("post_processor") is None:
        tok_json["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
        }
    return tok_json


def write_artifact(out_dir: str | Path, tok_json: dict, meta: dict, specials: Mapping[str, str]) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` (for ``transformers.AutoTokenizer``) and the experts'
    metadata into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False, separators=(",", ":")),
                                        encoding="utf-8")
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768, "clean_up_tokenization_spaces":
           False, "legacy": False}
    for name in ("bos", "eos", "unk"):
        if specials.get(name):
            cfg[f"{name}_token"] = specials[name]
    if specials.get("unk"):
        cfg["pad_token"] = specials["unk"]  # as moxin: pad with <unk> (labels -100), never with eos
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


# ---- loading -------------------------------------------------------------------------------------------------------
def export_files(spec) -> list[Path]:
    """Files a Hugging Face export must carry so that ``transformers`` loads the same tokenizer: for
    ``moxin-cjk`` (or a directory holding a composed tokenizer) the tokenizer.json, tokenizer_config.json and
    the experts' metadata; for a plain file path that file; else nothing."""
    d = cjk_tokenizer_dir(str(spec)) if isinstance(spec, (str, Path)) else None
    p = Path(str(spec))
    if d is None and p.is_dir() and (p / META_FILE).is_file():
        d = p
    if d is not None:
        return [d / n for n in ("tokenizer.json", "tokenizer_config.json", META_FILE) if (d / n).is_file()]
    return [p] if p.is_file() else []


# ---- model side ----------------------------------------------------------------------------------------------------
def piece_text(piece: str) -> str:
    """Text of a vocabulary piece (``"▁한국"`` -> ``" 한국"``)."""
    return piece.replace(SPIECE_UNDERLINE, " ")


def base_splits(tokenizer, base, token_ids: Sequence[int]) -> list[list[int]]:
    """Base ids of each token's text, as the base tokenizer splits it: as a *continuation* (no dummy-prefix
    space), so a piece's own leading ``"▁"`` stays the one space it stands for. Batched: every text is encoded
    after a newline, whose ids are then dropped (the same trick as ``Tokenizer.encode(continuation=True)``)."""
    texts = []
    for i in token_ids:
        piece = tokenizer.id_to_token(int(i))
        if piece is None:
            raise TokenizerError(f"id {i} is not in tokenizer {tokenizer.name!r} (vocab_size {tokenizer.vocab_size})")
        texts.append(piece_text(piece))
    if not getattr(base, "_dummy_prefix", False):
        return base.encode_batch(texts)
    lead = len(base.encode("\n"))
    return [ids[lead:] for ids in base.encode_batch(["\n" + t for t in texts])]


def extend_embeddings(state: dict, tokenizer, base, names: Iterable[str] = ("tok_embeddings.weight",
                                                                           "output.weight")) -> dict:
    """Grow the embedding / output matrices of ``state`` (moxin parameter names) from the base vocabulary to
    ``tokenizer.vocab_size`` rows. Each new row is the mean of the base rows of the new token's text as the base
    tokenizer splits it, so a pretrained model starts out reading (and, through the output rows, scoring) an
    expert token like the base tokens it replaces. Rows already there are copied unchanged; a matrix that is
    already as large is left alone. Returns a new dict (tensors for the grown matrices are new)."""
    out = dict(state)
    n_new = tokenizer.vocab_size
    splits: dict[int, tuple] = {}  # first new row -> (flat base ids, offsets), shared by both matrices
    for name in names:
        if name not in state:
            continue
        w = state[name]
        n_old = w.shape[0]
        if n_old >= n_new:
            continue
        if n_old < base.vocab_size:
            raise TokenizerError(f"{name} has {n_old} rows but the base tokenizer {base.name!r} has "
                                 f"{base.vocab_size} ids; this checkpoint was not trained with that base")
        if n_old not in splits:
            lists = [[j for j in ids if j < base.vocab_size] or [base.pad_id]
                     for ids in base_splits(tokenizer, base, range(n_old, n_new))]
            offsets = torch.tensor([0] + [len(x) for x in lists[:-1]]).cumsum(0)
            splits[n_old] = (torch.tensor([j for x in lists for j in x]), offsets)
        flat, offsets = splits[n_old]
        new_rows = F.embedding_bag(flat, w.float(), offsets, mode="mean")  # row i: mean of w[ids of token i]
        out[name] = torch.cat([w, new_rows.to(w.dtype)])
    return out
