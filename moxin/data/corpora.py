"""The real pretraining corpora of the Moxin recipe, as :class:`SourceConfig` entries (streamed from the hub).

Names checked on huggingface.co (dataset pages): SlimPajama-627B (jsonl.zst under train/chunk*/, fields ``text``
and ``meta.redpajama_set_name``), DCLM-baseline-1.0 (jsonl.zst under global-shard_*_of_10/, field ``text``),
the-stack-dedup (parquet under data/<language>/, field ``content``; gated: accept the terms on the hub and log in
with a token first). Mixture proportions were not published (see moxin_facts.md); choose them in the phases.
"""

from __future__ import annotations

from moxin.data.sources import SourceConfig

CORPORA: dict[str, SourceConfig] = {
    "slimpajama": SourceConfig(name="slimpajama", path="cerebras/SlimPajama-627B", text_field="text", split="train"),
    "dclm": SourceConfig(name="dclm", path="mlfoundations/dclm-baseline-1.0", text_field="text", split="train"),
    # all languages; restrict with data_files="data/python/*.parquet" (one folder per language)
    "stack": SourceConfig(name="stack", path="bigcode/the-stack-dedup", text_field="content", split="train"),
}


def corpus(name: str, **overrides) -> SourceConfig:
    """A copy of one entry of CORPORA with fields overridden (e.g. ``data_files`` for one language)."""
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    base = CORPORA[name]
    return SourceConfig(**{**base.__dict__, **overrides})
