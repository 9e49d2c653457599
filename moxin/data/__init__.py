"""Pretraining data: sources, dedup, weighted mixture, packing, the phased data module."""

from moxin.data.dedup import DedupFilter, normalize_text, text_hash
from moxin.data.mixture import Mixture, validate_weights
from moxin.data.packing import Packer
from moxin.data.sources import DataError, SourceConfig, iter_documents, validate_source

__all__ = [
    "DataError", "SourceConfig", "iter_documents", "validate_source", "DedupFilter", "normalize_text", "text_hash",
    "Mixture", "validate_weights", "Packer", "Phase", "PretrainDataModule",
]


def __getattr__(name):  # lazy: importing lightning only when the data module is asked for
    if name in ("Phase", "PretrainDataModule", "PackedDataset"):
        from moxin.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(name)
