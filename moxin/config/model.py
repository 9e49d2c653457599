"""ModelConfig: a Mistral-style decoder (grouped-query attention, SwiGLU MLP, RMSNorm pre-norm, rotary embeddings
in the Hugging Face rotate-half layout, optional sliding-window attention).

The presets are the files ``conf/model/*.yaml`` (``model=<name>``); code reads them with
``moxin.model.config.load_preset(name)``, which lives above this leaf package.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

__all__ = ["ModelConfig"]


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Vocabulary size; 32000 for the Mistral / Moxin SentencePiece tokenizer."""
    dim: int = 4096
    """Hidden size (d_model)."""
    n_layers: int = 36
    """Number of transformer blocks (36 for Moxin-7B, 32 for Mistral-7B)."""
    n_heads: int = 32
    """Query heads."""
    n_kv_heads: int = 8
    """Key/value heads (grouped-query attention: each KV head serves n_heads // n_kv_heads query heads)."""
    head_dim: int = 128
    """Per-head dimension. Usually dim // n_heads."""
    hidden_dim: int = 14336
    """SwiGLU intermediate size."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """RoPE base. Mistral/Moxin use 1e4; a wrong value silently ruins pretrained checkpoints."""
    sliding_window: int | None = 4096
    """Each token attends to at most this many positions, itself included (0 <= q - k < W). None: full causal.
    Also the number of slots per layer of the rolling KV cache."""
    max_seq_len: int = 32768
    """Longest sequence the model is meant for (HF max_position_embeddings); training rows may not exceed it."""
    tie_embeddings: bool = False
    """Share the input embedding with the output head. False for Mistral/Moxin."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights (output projections scaled by depth)."""
    attn_backend: str = "auto"
    """Attention kernel: auto (flash with FlashAttention-4 on a Hopper GPU where flash-attn-4 is installed, else
    flex on CUDA, sdpa elsewhere), flex, flash (FlashAttention-4 or flash-attn 2), sdpa (reference)."""

    def __post_init__(self) -> None:
        problems = []
        if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window < 1:
            problems.append(f"sliding_window={self.sliding_window} must be >= 1 or null")
        if self.attn_backend not in ("auto", "flex", "flash", "sdpa"):
            problems.append(f"attn_backend={self.attn_backend!r} must be one of auto, flex, flash, sdpa")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be positive")
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    # ---- derived figures -------------------------------------------------------------------------------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of `Transformer(self)`."""
        attn = self.dim * self.head_dim * (self.n_heads * 2 + self.n_kv_heads * 2)
        mlp = 3 * self.dim * self.hidden_dim
        block = attn + mlp + 2 * self.dim
        emb = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * block + self.dim + emb + head
        if not include_embeddings:
            total -= emb
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), the PaLM-appendix count:
        6 * (non-embedding parameters, output head included) + attention score/value matmuls
        (6 * 2 * layers * heads * head_dim * effective context, halved for causality)."""
        n = self.num_params(include_embeddings=False)
        ctx = seq_len if self.sliding_window is None else min(seq_len, self.sliding_window)
        return 6 * n + 6 * self.n_layers * self.n_heads * self.head_dim * ctx

    def kv_cache_bytes_per_token(self, bytes_per_el: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_el

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
