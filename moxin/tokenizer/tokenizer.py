"""The moxin ``Tokenizer``: one small class over a fast ``tokenizers`` backend.

Three kinds of input are accepted by :func:`load_tokenizer`:

Details: docs/modules.md, "tokenizer/tokenizer.py".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, normalizers

from moxin.config import MoxinUserError

#: The SentencePiece word-boundary marker ("lower one eighth block"), standing for a space.
SPIECE_UNDERLINE = "\u2581"

#: The shipped expert tokenizer (moxin/tokenizer/cjk.py builds it): base Mistral v1 + zh/ja/ko experts.
ASSET_DIR = Path(__file__).resolve().parent / "assets" / "moxin-cjk"
#: Names ``load_tokenizer`` accepts for the shipped artifact.
CJK_SPECS = ("moxin-cjk", "mistral-cjk")

#: File name of the Mistral 7B v1 SentencePiece model inside the ``mistral_common`` package.
MISTRAL_MODEL_RESOURCE = ("mistral_common", "data/tokenizer.model.v1")

_SPEC_HELP = (
    'pass "mistral" (the Mistral/Moxin 32000-piece model shipped in the mistral-common package), '
    '"moxin-cjk" (Mistral + Chinese/Japanese/Korean experts, moxin/tokenizer/cjk.py), '
    "a path to a Hugging Face tokenizer.json, or a path to a SentencePiece .model file"
)


class TokenizerError(MoxinUserError, ValueError):
    """A tokenizer spec or file that cannot be used; the message names the input and the fix."""


class Tokenizer:
    """Text <-> token ids with known special ids; picklable.

    Do not construct directly: use :func:`load_tokenizer`. Attributes:

    * ``bos_id`` / ``eos_id``: beginning / end of sequence ids (Mistral: 1 / 2).
    * ``pad_id``: the id to put at padded places. The Mistral model has no pad piece, so this is ``<unk>`` (0),
      kept distinct from ``eos_id`` so code that looks for eos is never fooled by padding. Padded places carry
      label -100, so the id itself never reaches a loss.
    * ``vocab_size``: number of ids the backend can produce (embedding rows needed).
    * ``name``: the spec it was loaded from (for logs and cache keys).
    """

    def __init__(
        self,
        backend: _HFTokenizer | None,
        *,
        bos_id: int | None,
        eos_id: int | None,
        pad_id: int | None,
        name: str,
        sp_model_proto: bytes | None = None,
        strip_leading_space: bool = False,
    ) -> None:
        self._hf = backend
        self._sp = None
        self._sp_proto = sp_model_proto if backend is None else None
        if backend is None:
            if sp_model_proto is None:
                raise TokenizerError("Tokenizer needs a tokenizers backend or a SentencePiece model proto")
            self._sp = _sentencepiece_processor(sp_model_proto)
        else:
            # Text is text: never turn "</s>" in a document into the control id.
            backend.encode_special_tokens = True
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id
        self.name = name
        # SentencePiece-style models prepend "▁" to every encoded string ("add_dummy_prefix"). Chat rendering
        # needs to encode a segment that *continues* earlier text, without that prefix: see encode(..., continuation).
        self._dummy_prefix = strip_leading_space
        self._special_ids = frozenset(i for i in (bos_id, eos_id, pad_id, self._unk_id()) if i is not None)

    # ------------------------------------------------------------------ properties
    @property
    def bos_id(self) -> int:
        if self._bos_id is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no beginning-of-sequence token; use bos=False")
        return self._bos_id

    @property
    def eos_id(self) -> int:
        if self._eos_id is None:
            raise TokenizerError(f"tokenizer {self.name!r} has no end-of-sequence token")
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id if self._pad_id is not None else self.eos_id

    @property
    def vocab_size(self) -> int:
        if self._sp is not None:
            return self._sp.get_piece_size()
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids dropped by ``decode(skip_special=True)``."""
        return self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry written in the backend's own form (``"▁the"``, ``"<0x0A>"``), or None."""
        if self._sp is not None:
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i
        return self._hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        """Vocabulary entry for an id, or None when out of range."""
        if self._sp is not None:
            return self._sp.id_to_piece(idx) if 0 <= idx < self._sp.get_piece_size() else None
        return self._hf.id_to_token(idx)

    # ------------------------------------------------------------------ encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False, *, continuation: bool = False) -> list[int]:
        """Token ids of ``text``.

        Args:
            text: any string; special-token strings inside it are encoded as plain text.
            bos: prepend ``bos_id``.
            eos: append ``eos_id``.
            continuation: encode ``text`` as the continuation of earlier text, i.e. without the SentencePiece
                dummy-prefix ``"▁"`` that a fresh string gets. Used to tokenize a document segment by segment
                (chat turns) so the pieces join up to exactly the encoding of the whole string, as long as the
                segments meet at a newline or a special token (true for the chat template).
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode expects a str, got {type(text).__name__}: {text!r:.80}")
        ids = self._encode_one(text, continuation)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        """``[encode(t, bos, eos) for t in texts]``, batched in the fast backend."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"Tokenizer.encode_batch: texts[{i}] is {type(t).__name__}, expected str")
        if self._sp is not None:
            out = [list(x) for x in self._sp.encode(texts)]
        else:
            out = [e.ids for e in self._hf.encode_batch(texts, add_special_tokens=False)]
        if bos or eos:
            b, e = ([self.bos_id] if bos else []), ([self.eos_id] if eos else [])
            out = [b + ids + e for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special`` the ids in :attr:`special_ids` are left out."""
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        if self._sp is not None:
            return self._sp.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        backend = "sentencepiece" if self._sp is not None else "tokenizers"
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self._bos_id}, "
            f"eos_id={self._eos_id}, pad_id={self._pad_id}, backend={backend})"
        )

    # ------------------------------------------------------------------ internals
    def _unk_id(self) -> int | None:
        if self._sp is not None:
            return self._sp.unk_id()
        return self._hf.token_to_id("<unk>")

    def _encode_one(self, text: str, continuation: bool) -> list[int]:
        if self._sp is not None:
            if continuation and self._dummy_prefix:
                # Encode with a sentinel newline in front: a byte-fallback piece that never merges with its
                # neighbours, so dropping its ids leaves exactly the continuation encoding.
                ids = self._sp.encode("\n" + text)
                return ids[len(self._sp.encode("\n")) :]
            return self._sp.encode(text)
        if continuation and self._dummy_prefix:
            ids = self._hf.encode("\n" + text, add_special_tokens=False).ids
            return ids[len(self._hf.encode("\n", add_special_tokens=False).ids) :]
        return self._hf.encode(text, add_special_tokens=False).ids

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_hf"] = self._hf.to_str() if self._hf is not None else None
        state["_sp"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        hf = state.pop("_hf")
        self.__dict__.update(state)
        self._hf = None
        if hf is not None:
            self._hf = _HFTokenizer.from_str(hf)
            self._hf.encode_special_tokens = True
        if self._sp_proto is not None:
            self._sp = _sentencepiece_processor(self._sp_proto)


# ---------------------------------------------------------------------- loading


def mistral_model_path() -> Path:
    """Path of the Mistral 7B v1 SentencePiece model inside the installed ``mistral-common`` package."""
    import importlib.resources

    pkg, rel = MISTRAL_MODEL_RESOURCE
    try:
        root = importlib.resources.files(pkg)
    except ModuleNotFoundError as e:
        raise TokenizerError(
            'load_tokenizer("mistral") needs the PyPI package mistral-common (pip install mistral-common), '
            f"which ships {rel}; or pass a path to a tokenizer.model / tokenizer.json instead"
        ) from e
    path = Path(str(root.joinpath(rel)))
    if not path.is_file():
        raise TokenizerError(
            f"mistral-common is installed but {path} is missing (version without tokenizer.model.v1?); "
            "install mistral-common>=1.5 or pass a path to a tokenizer.model / tokenizer.json"
        )
    return path


def cjk_tokenizer_dir(spec: str) -> Path | None:
    """The artifact directory for a ``moxin-cjk`` spec, or None when ``spec`` is not one."""
    if str(spec).strip().lower() not in CJK_SPECS:
        return None
    if not (ASSET_DIR / "tokenizer.json").is_file():
        raise TokenizerError(f"the moxin-cjk tokenizer files are missing from {ASSET_DIR} (broken install?); "
                             "rebuild them with python scripts/train_cjk_experts.py")
    return ASSET_DIR


def as_tokenizer(tokenizer) -> Tokenizer:
    """A tokenizer object as it is (a :class:`Tokenizer`, or any picklable object with ``encode``, ``bos_id`` and
    ``eos_id``), a spec loaded with :func:`load_tokenizer`. Only for APIs that take a config's spec: the export
    helpers of :mod:`moxin.tokenizer.hf_export` (scripts/convert_checkpoint.py). A run builds its one tokenizer in
    moxin/assemble.py and hands the object everywhere; stages, data modules, callbacks and evaluation take only it."""
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(tokenizer)
    return tokenizer


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from ``"mistral"``, a ``tokenizer.json`` path or a SentencePiece ``.model`` path.

    A directory holding ``tokenizer.json`` (preferred) or ``tokenizer.model`` is accepted too. Raises
    :class:`TokenizerError` naming the input and what to pass instead.
    """
    if isinstance(spec, Tokenizer):
        return spec
    s = os.fspath(spec)
    if s.strip().lower() in ("mistral", "moxin", "mistral-7b", "moxin-7b"):
        return _load_sentencepiece(mistral_model_path(), name="mistral")
    cjk_dir = cjk_tokenizer_dir(s)  # the CJK expert tokenizer (moxin/tokenizer/cjk.py)
    if cjk_dir is not None:
        tok = _load_tokenizer_json(cjk_dir / "tokenizer.json")
        tok.name = s.strip().lower()
        return tok
    path = Path(s).expanduser()
    if path.is_dir():
        for cand in ("tokenizer.json", "tokenizer.model"):
            if (path / cand).is_file():
                path = path / cand
                break
        else:
            raise TokenizerError(f"tokenizer directory {path} holds neither tokenizer.json nor tokenizer.model; {_SPEC_HELP}")
    if not path.exists():
        raise TokenizerError(f"tokenizer spec {s!r}: no such file; {_SPEC_HELP}")
    if not path.is_file():
        raise TokenizerError(f"tokenizer spec {s!r} is not a regular file; {_SPEC_HELP}")
    try:
        head = path.open("rb").read(64)
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer file {path}: {e}; {_SPEC_HELP}") from e
    if path.suffix == ".json" or head.lstrip().startswith(b"{"):
        return _load_tokenizer_json(path)
    return _load_sentencepiece(path, name=str(path))


def _sentencepiece_processor(proto: bytes):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(proto)
    return sp


def _load_sentencepiece(path: Path, name: str) -> Tokenizer:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as e:  # pragma: no cover - sentencepiece is a declared dependency
        raise TokenizerError(f"reading {path} needs the sentencepiece package (pip install sentencepiece)") from e
    proto_bytes = path.read_bytes()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(proto_bytes)
        if not proto.pieces:
            raise ValueError("no pieces")
    except Exception as e:
        raise TokenizerError(
            f"{path} is not a SentencePiece model ({type(e).__name__}: {e}); {_SPEC_HELP}"
        ) from e
    ts = proto.trainer_spec
    bos = ts.bos_id if ts.bos_id >= 0 else None
    eos = ts.eos_id if ts.eos_id >= 0 else None
    pad = ts.pad_id if ts.pad_id >= 0 else (ts.unk_id if ts.unk_id >= 0 else None)
    dummy = proto.normalizer_spec.add_dummy_prefix
    try:
        backend = sentencepiece_to_tokenizers(proto)
    except NotImplementedError:
        backend = None  # exact fallback: the sentencepiece library itself
    return Tokenizer(
        backend, bos_id=bos, eos_id=eos, pad_id=pad, name=name,
        sp_model_proto=proto_bytes if backend is None else None, strip_leading_space=dummy,
    )


def sentencepiece_to_tokenizers(proto) -> _HFTokenizer:
    """Build a ``tokenizers.Tokenizer`` that encodes exactly like a SentencePiece BPE model.

    How SentencePiece BPE encodes, and how each step is mirrored:

    1. Normalize: identity rule (required; other rules raise ``NotImplementedError`` so the caller falls back to
       the sentencepiece library), spaces -> ``"▁"``, and with ``add_dummy_prefix`` one ``"▁"`` in front of the
       whole string. ``remove_extra_whitespaces`` (strip and collapse runs of spaces) is mirrored too.
    2. Merge greedily over the whole normalized string: repeatedly join the adjacent pair whose joined piece is in
       the vocabulary with the highest *score* (leftmost on ties). A ``tokenizers`` BPE whose merge list holds every
       (left, right) split of every normal piece, ranked by the joined piece's score, does the same. Note the rank
       is the score, not the id: Mistral's ``"▁▁"`` and ``"▁▁▁▁"`` sit at ids 259-260 with score -1e9, so they
       merge last.
    3. Characters without a piece fall back to ``<0xNN>`` byte pieces (``byte_fallback``).

    Decoding mirrors ``sp.decode``: ``"▁"`` -> space, byte pieces fused into UTF-8, and the dummy-prefix space
    dropped from the start.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    ns, ts = proto.normalizer_spec, proto.trainer_spec
    if ts.model_type != pb.TrainerSpec.BPE:
        raise NotImplementedError("only SentencePiece BPE models convert to tokenizers exactly")
    if ns.name not in ("identity", "") or ns.precompiled_charsmap or ts.treat_whitespace_as_suffix:
        raise NotImplementedError(f"normalizer {ns.name!r} has no exact tokenizers equivalent here")

    P = pb.ModelProto.SentencePiece
    vocab: dict[str, int] = {}
    scores: dict[str, float] = {}
    for i, p in enumerate(proto.pieces):
        vocab[p.piece] = i
        if p.type in (P.NORMAL, P.USER_DEFINED):
            scores[p.piece] = p.score
    if any(p.type == P.USER_DEFINED for p in proto.pieces):
        # user-defined pieces are matched before BPE in SentencePiece; not mirrored here.
        raise NotImplementedError("SentencePiece user-defined pieces are not converted")

    merges: list[tuple[float, int, str, str]] = []
    for piece, score in scores.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in scores and right in scores:
                merges.append((-score, vocab[piece], left, right))
    merges.sort()
    unk = proto.pieces[ts.unk_id].piece if ts.unk_id >= 0 else None
    bpe = models.BPE(
        vocab=vocab,
        merges=[(l, r) for _, _, l, r in merges],
        unk_token=unk,
        byte_fallback=ts.byte_fallback,
        fuse_unk=True,
        dropout=None,
    )
    tok = _HFTokenizer(bpe)

    norm = []
    if ns.remove_extra_whitespaces:
        norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(_Regex(r" {2,}"), " ")]
    if ns.add_dummy_prefix:
        norm.append(normalizers.Prepend(SPIECE_UNDERLINE))
    norm.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    tok.normalizer = normalizers.Sequence(norm)

    dec = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if ns.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _Regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "[BOS]")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<eos>", "<|endoftext|>", "[EOS]")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")


def _load_tokenizer_json(path: Path) -> Tokenizer:
    try:
        text = path.read_text(encoding="utf-8")
        backend = _HFTokenizer.from_str(text)
        data = json.loads(text)
    except Exception as e:
        raise TokenizerError(
            f"{path} is not a readable Hugging Face tokenizer.json ({type(e).__name__}: {e}); {_SPEC_HELP}"
        ) from e

    def named(field: str) -> str | None:
        cfg = path.with_name("tokenizer_config.json")
        if cfg.is_file():
            try:
                v = json.loads(cfg.read_text(encoding="utf-8")).get(field)
            except Exception:
                return None
            if isinstance(v, dict):
                v = v.get("content")
            return v if isinstance(v, str) else None
        return None

    added = {t["content"]: t["id"] for t in data.get("added_tokens", []) if t.get("special", False)}

    def pick(field: str, names: tuple[str, ...]) -> int | None:
        n = named(field)
        if n is not None and backend.token_to_id(n) is not None:
            return backend.token_to_id(n)
        for cand in names:
            if cand in added:
                return added[cand]
        for cand in names:
            if backend.token_to_id(cand) is not None:
                return backend.token_to_id(cand)
        return None

    bos, eos = pick("bos_token", _BOS_NAMES), pick("eos_token", _EOS_NAMES)
    pad = pick("pad_token", _PAD_NAMES)
    if pad is None:
        pad = backend.token_to_id("<unk>")
    if eos is None:
        raise TokenizerError(
            f"{path}: cannot tell the end-of-sequence token (none of {_EOS_NAMES} is a special token and there "
            "is no tokenizer_config.json with eos_token beside it); add one of those"
        )
    # A Metaspace pre-tokenizer or a Prepend("▁") normalizer means the SentencePiece dummy-prefix convention.
    dummy = '"Prepend"' in json.dumps(data.get("normalizer")) or (
        '"Metaspace"' in json.dumps(data.get("pre_tokenizer")) and '"never"' not in json.dumps(data.get("pre_tokenizer"))
    )
    return Tokenizer(backend, bos_id=bos, eos_id=eos, pad_id=pad, name=str(path), strip_leading_space=dummy)
