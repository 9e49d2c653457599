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

from moxin.config import ModelConfig
from moxin.model.attention import AttentionMask, DocBounds, mark_varying, resolve_backend
from moxin.model.masks import doc_ids_from_positions
from moxin.numerics import mm_f32


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


class _AutocastLinear(torch.autograd.Function):
    """x W^T under autocast, W's gradient returned in fp32 straight from the product: autocast's own linear rounds
    that gradient to the low dtype and a separate kernel casts it back to fp32 for the optimizer (bandwidth-bound: a
    read and a write of every weight a step). On CUDA the product writes fp32 itself (`mm` with `out_dtype`), which is
    also the more exact gradient (not rounded to bf16); elsewhere the product is rounded and cast as autocast does.
    x and the output are as under autocast (x in the low dtype, the output too), so is x's gradient."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        w = weight.to(dtype)
        ctx.save_for_backward(x, w)
        return F.linear(x, w)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        grad_w = mm_f32(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]))
        return (grad @ w if ctx.needs_input_grad[0] else None), grad_w, None


class Linear(nn.Linear):
    """nn.Linear (same parameters and state dict) whose fp32 weight under autocast gets its fp32 gradient from the
    product itself (`_AutocastLinear`); every other case (no autocast, no gradient, a bias, low-precision weights
    as under FSDP2's mixed precision) is `F.linear` as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (self.bias is None and w.requires_grad and w.dtype == torch.float32
                and torch.is_autocast_enabled(x.device.type)):
            dtype = torch.get_autocast_dtype(x.device.type)
            if dtype != torch.float32:
                return _AutocastLinear.apply(x.to(dtype), w, dtype)
        return F.linear(x, w, self.bias)


class _Fusable(nn.Module):
    """A module whose input projections (`_FUSED`: Linear names, in order) can share one weight, so that one
    product replaces several (`fuse`). The Linear weights become row slices (views) of the fused tensor, so memory
    is unchanged and in-place updates of the parameters (`copy_`, `load_state_dict`) reach it. Inference only:
    the fused product is used while the weights need no gradient, and whatever gives the parameters new tensors
    (`.to()`, `.cuda()`, `to_empty`, `load_state_dict(assign=True)`, a deep copy, pickling) drops the fusion
    rather than leave a stale copy."""

    _FUSED: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.fused_weight: torch.Tensor | None = None  # a plain attribute: not in the state dict
        self.register_load_state_dict_post_hook(_Fusable._after_load)

    def _views_fused(self) -> bool:
        f = self.fused_weight
        return f is not None and all(getattr(self, n).weight.untyped_storage().data_ptr()
                                     == f.untyped_storage().data_ptr() for n in self._FUSED)

    @staticmethod
    def _after_load(module, incompatible_keys) -> None:
        if not module._views_fused():  # assign=True put new tensors in place
            module.fused_weight = None

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["fused_weight"] = None  # a copy's parameters are separate tensors
        return state

    @torch.no_grad()
    def fuse(self) -> None:
        lins = [getattr(self, n) for n in self._FUSED]
        if any(lin.weight.requires_grad for lin in lins):
            raise ValueError("fuse_projections is for inference copies: call model.requires_grad_(False) first (a "
                             "fused product would give the separate weights no gradient)")
        fused = torch.cat([lin.weight for lin in lins])
        start = 0
        for lin in lins:
            n = lin.weight.shape[0]
            lin.weight.data = fused[start:start + n]
            start += n
        self.fused_weight = fused

    def _apply(self, fn, recurse=True):
        self.fused_weight = None  # the parameters get new tensors: they would no longer be views of it
        return super()._apply(fn, recurse)

    def _fused_outputs(self, x) -> tuple[torch.Tensor, ...] | None:
        """The fused projections of x split per Linear, or None when unfused or a gradient is wanted."""
        lins = [getattr(self, n) for n in self._FUSED]
        if self.fused_weight is None or lins[0].weight.requires_grad:
            return None
        return F.linear(x, self.fused_weight).split([lin.weight.shape[0] for lin in lins], dim=-1)


class Attention(_Fusable):
    _FUSED = ("wq", "wk", "wv")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask: AttentionMask | None, cache=None, layer_idx: int = 0):
        B, T, _ = x.shape
        qkv = self._fused_outputs(x) or (self.wq(x), self.wk(x), self.wv(x))
        q = qkv[0].view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd): the projections' layout
        k = qkv[1].view(B, T, self.n_kv_heads, self.head_dim)
        v = qkv[2].view(B, T, self.n_kv_heads, self.head_dim)
        if cache is None and mask.takes_bthd(q.dtype):
            # FlashAttention takes this layout: q, k and v reach it, and their gradients come back, without copies
            cos_t, sin_t = cos.transpose(1, 2), sin.transpose(1, 2)  # (B, T, 1, hd)
            out = mask.apply_bthd(apply_rope(q, cos_t, sin_t), apply_rope(k, cos_t, sin_t), v)
            return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            out = cache.attend(layer_idx, q, k, v)
        else:
            out = mask.apply(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(_Fusable):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    _FUSED = ("w1", "w3")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w3 = Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up
        self.w2 = Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        gate, up = self._fused_outputs(x) or (self.w1(x), self.w3(x))
        return self.w2(F.silu(gate) * up)


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

    def fuse_projections(self) -> "Transformer":
        """Fuse every block's q/k/v projections into one product and gate/up into another, for an inference copy
        (weights without gradients): decode reads the same bytes in four products a block instead of seven
        (figures: docs/performance.md, "Decode: FlexAttention's decoding kernel and fused projections"). Same
        memory: the separate weights become views of the fused ones (see `_Fusable`). Returns the model."""
        for layer in self.layers:
            layer.attention.fuse()
            layer.feed_forward.fuse()
        return self

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
                return_hidden: bool = False, head=None, doc_bounds: DocBounds | None = None,
                varying_shapes: bool = False, attn_mask: AttentionMask | None = None):
        """tokens (B, T) -> logits (B, T, V), or final-normed hidden states (B, T, D) with return_hidden.

        positions (B, T): None means 0..T-1 in every row. In training, a 0 inside a row starts a new document.
        cache: a `RollingKVCache` for generation; positions are then required (-1 marks padding).
        head: a function `head(hidden (B, T, D), output_weight (V, D))` applied instead of the output layer
            and returned as is; losses use it to work on chunks of logits (never all (B*T, V) at once). It
            runs inside this forward, where FSDP2 has gathered the output weight.
        doc_bounds: `DocBounds.from_positions` of the same positions, computed on the host before they were sent
            (the stages attach it to every batch): the attention is then prepared without reading the device, so
            the host queues the forward while the GPU still runs the previous step. Training forwards only.
        varying_shapes: the rows' batch and length change from call to call (GRPO's micro-batches): compiled
            blocks take them as dynamic sizes from the first call (`attention.mark_varying`).
        attn_mask: a prepared `AttentionMask` for rows whose visibility their positions cannot express (evaluation's
            packed prefix trees, moxin/eval/loglik.py); the positions then only rotate. Not with a cache.
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
            doc_ids = None if cache is not None or attn_mask is not None else doc_ids_from_positions(positions)
        if T > self.cfg.max_seq_len and cache is None:
            raise ValueError(f"sequence length {T} exceeds the model's max_seq_len={self.cfg.max_seq_len}")
        if doc_bounds is not None and doc_ids is None:  # no positions given, or a generation cache
            raise ValueError("doc_bounds describe the documents of training rows: pass them with those rows' "
                             "positions, and not with a generation cache")
        if attn_mask is not None and cache is not None:
            raise ValueError("attn_mask is for forwards without a cache (a generation cache builds its own masks)")
        mask = attn_mask
        if cache is None and mask is None:  # one mask for all layers (and their recomputation), not one per layer
            mask = AttentionMask.build(resolve_backend(self.cfg.attn_backend, tokens.device), self.cfg.sliding_window,
                                       doc_ids, B, T, self.cfg.head_dim, tokens.device, bounds=doc_bounds,
                                       varying=varying_shapes)

        h = self.tok_embeddings(tokens)  # (B, T, D)
        cos, sin = rope_cos_sin(positions.clamp(min=0), self.cfg.head_dim, self.cfg.rope_theta, h.dtype)
        if varying_shapes:
            mark_varying(h, 0, 1), mark_varying(cos, 0, 2), mark_varying(sin, 0, 2)
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
