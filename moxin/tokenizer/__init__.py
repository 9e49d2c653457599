"""Tokenizers for moxin: the :class:`Tokenizer` class, :func:`load_tokenizer`, and the Tülu chat template.

    >>> from moxin.tokenizer import load_tokenizer, render_chat
    >>> tok = load_tokenizer("mistral")          # Mistral/Moxin 32000-piece SentencePiece BPE, offline
    >>> tok.encode("Hello world", bos=True)
    [1, 22557, 1526]
"""

from moxin.tokenizer.chat import (
    ChatTokens,
    ChatValidationError,
    format_prompt,
    render_chat,
    validate_conversation,
)
from moxin.tokenizer.tokenizer import (
    Tokenizer,
    TokenizerError,
    as_tokenizer,
    load_tokenizer,
    mistral_model_path,
    sentencepiece_to_tokenizers,
)

__all__ = [
    "ChatTokens",
    "ChatValidationError",
    "Tokenizer",
    "TokenizerError",
    "as_tokenizer",
    "format_prompt",
    "load_tokenizer",
    "mistral_model_path",
    "render_chat",
    "sentencepiece_to_tokenizers",
    "validate_conversation",
]
