"""moxin's data: one reader for every source kind, one bad-record counter, per-stage extractors, and one data
module per stage over a shared base (pretrain_data, sft_data, dpo_data, grpo_data; docs/architecture.md)."""

from moxin.data.bad_records import RecordStats
from moxin.data.dedup import DedupFilter, normalize_text, text_hash
from moxin.data.documents import iter_documents, iter_records, validate_source
from moxin.data.mixture import Mixture, validate_weights
from moxin.data.packing import Packer
from moxin.data.phases import Phase
from moxin.data.reader import DataError, SourceConfig, read_records

__all__ = [
    "DataError", "SourceConfig", "read_records", "RecordStats", "iter_documents", "iter_records", "validate_source",
    "DedupFilter", "normalize_text", "text_hash", "Mixture", "validate_weights", "Packer", "Phase",
    "MoxinDataModule", "PretrainDataModule",
]


def __getattr__(name):  # lazy: importing lightning only when a data module is asked for
    if name == "MoxinDataModule":
        from moxin.data.base import MoxinDataModule

        return MoxinDataModule
    if name == "PretrainDataModule":
        from moxin.data.pretrain_data import PretrainDataModule

        return PretrainDataModule
    raise AttributeError(name)
