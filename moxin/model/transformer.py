"""The Mistral-style decoder shared by every stage. Architecture only: no parallelism, no data, no losses.

    tokens (B, T) -> embedding -> n_layers x [x + Attn(RMSNorm(x)); x + MLP(RMSNorm(x))] -> RMSNorm -> output

Positions (B, T) drive both RoPE and the document mask: a position of 0 inside a row starts a new packed
document, which never sees the previous ones. With a `RollingKVCache` the same forward serves generation
(prefill and decode); there a position of -1 marks a padding token that is neither stored nor attended to.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moxin.model.attention import AttentionMask, resolve_backend
from moxin.model.config import ModelConfig
from moxin.model.masks import doc_ids_from_positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like HF Mistral, then cast back before the weight
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, 1, T, head_dim) in the rotate-half layout (the two halves share frequencies)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float().unsqueeze(-1) * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # under autocast q/k are bf16 while h (and cos/sin) is fp32
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask | None, cache=None, layer_idx: int = 0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KVH, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            out = cache.attend(layer_idx, q, k, v)
        else:
            out = mask.apply(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MLP(cfg)

    def forward(self, x, cos, sin, mask: AttentionMask | None, cache=None, layer_idx: int = 0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, layer_idx)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections (wo, w2) scaled by 1/sqrt(2 * n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None, *, cache=None,
                return_hidden: bool = False, head=None):
        """tokens (B, T) -> logits (B, T, V), or final-normed hidden states (B, T, D) with return_hidden.

        positions (B, T): None means 0..T-1 in every row. In training, a 0 inside a row starts a new document.
        cache: a `RollingKVCache` for generation; positions are then required (-1 marks padding).
        head: a function `head(hidden (B, T, D), output_weight (V, D))` applied instead of the output layer
            and returned as is; losses use it to work on chunks of logits (never all (B*T, V) at once). It
            runs inside this forward, where FSDP2 has gathered the output weight.
        """
        B, T = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("generation with a cache needs explicit positions (B, T)")
            positions = torch.arange(T, device=tokens.device).expand(B, T)
            doc_ids = None
        elif positions.shape != tokens.shape:
            raise ValueError(f"positions shape {tuple(positions.shape)} must equal tokens shape {tuple(tokens.shape)}")
        else:
            doc_ids = None if cache is not None else doc_ids_from_positions(positions)
        if T > self.cfg.max_seq_len and cache is None:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        mask = None
        if cache is None:  # one mask for all layers (and their recomputation): built here, not per layer
            mask = AttentionMask.build(resolve_backend(self.cfg.attn_backend, tokens.device), self.cfg.sliding_window,
                                       doc_ids, B, T, self.cfg.head_dim, tokens.device)

        h = self.tok_embeddings(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(positions.clamp(min=0), self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        if cache is not None:
            cache.begin(positions)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, cache, i)
        if cache is not None:
            cache.end()
        h = self.norm(h)
        if head is not None:
            return head(h, self.output.weight)
        return h if return_hidden else self.output(h)
