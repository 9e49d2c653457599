"""The built-in sample corpus: small real text shipped with moxin for the default CPU run and the tests.

Files (one JSON object per line; see README.md in this folder for sources and licences):

* ``prose.jsonl``, ``code.jsonl``, ``cjk.jsonl``: pretraining documents ``{"text": ...}``.
* ``chat.jsonl`` / ``chat_heldout.jsonl``: Tülu-form SFT conversations ``{"messages": [...]}``.
* ``preferences.jsonl`` / ``preferences_heldout.jsonl``: DPO pairs ``{"chosen": [...], "rejected": [...]}``.
* ``eval_mc.jsonl``: a small multiple-choice task ``{"question", "choices", "gold"}`` (``conf/eval/sample.yaml``).
* ``eval_math.jsonl``: small arithmetic problems ``{"problem", "answer"}`` for generation + verifier evaluation.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_DIR = Path(__file__).resolve().parent

#: Every data file of the sample corpus, by short name.
SAMPLE_FILES = (
    "prose", "code", "cjk", "chat", "chat_heldout", "preferences", "preferences_heldout", "eval_mc", "eval_math",
)


def sample_path(name: str) -> Path:
    """Path of a sample file: ``sample_path("prose")`` or ``sample_path("prose.jsonl")``.

    Raises ``FileNotFoundError`` naming the known files when ``name`` is not one of them.
    """
    stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
    path = SAMPLE_DIR / f"{stem}.jsonl"
    if stem not in SAMPLE_FILES or not path.is_file():
        raise FileNotFoundError(
            f"no sample file {name!r} in {SAMPLE_DIR}; known: {', '.join(SAMPLE_FILES)} "
            "(regenerate code/chat/preferences with scripts/build_sample_corpus.py)"
        )
    return path
