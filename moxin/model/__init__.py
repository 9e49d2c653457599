"""The common model core: plain PyTorch, no Lightning, no parallelism, no data code."""

from moxin.model.cache import RollingKVCache
from moxin.model.generate import GenerationOutput, generate, sample_next
from moxin.model.transformer import Transformer

__all__ = ["Transformer", "RollingKVCache", "generate", "sample_next",
           "GenerationOutput", "load_hf", "save_hf"]


def load_hf(*args, **kwargs):
    """Read a Hugging Face MistralForCausalLM directory into a moxin Transformer (see moxin.model.hf)."""
    from moxin.model.hf import load_hf as _load

    return _load(*args, **kwargs)


def save_hf(*args, **kwargs):
    """Write a moxin Transformer as a Hugging Face MistralForCausalLM directory (see moxin.model.hf)."""
    from moxin.model.hf import save_hf as _save

    return _save(*args, **kwargs)
