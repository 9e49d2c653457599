"""One attention call, several kernels.

`AttentionMask.build(backend, window, doc_ids, ...)` decides, once per training forward, how causal (optionally
sliding-window, optionally document-masked) grouped-query attention is computed, and prepares what that kernel
needs (dense mask, FlexAttention block mask, flash-attn sequence bounds); every layer then calls
`mask.apply(q, k, v)`. `attend(q, k, v, window, doc_ids, backend)` does both for one call. Backends:

- ``sdpa``: `F.scaled_dot_product_attention` with an explicit dense mask built from `masks.py`. The reference;
  runs anywhere, O(T^2) memory for the mask.
- ``flex``: FlexAttention with a block mask from the same mask functions (CUDA; compiled once per shape).
  Blocks entirely outside the window or the document are skipped, so cost grows with T*W, not T^2. Where
  there is nothing to skip (the window covers the row and it holds one document: DPO pairs, GRPO rollouts,
  4K blocks without boundaries) it hands over to SDPA's dense causal kernel, which is faster there.
- ``flash``: flash-attn's varlen kernel with ``window_size=(W-1, 0)``; documents become separate sequences
  via ``cu_seqlens``. Used only when the ``flash_attn`` package is installed and asked for.

Shapes: q (B, H, T, D); k, v (B, KVH, T, D); returns (B, H, T, D). All backends give the same numbers up to
floating-point rounding; tests/test_attention.py holds them to the reference.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moxin.model import masks

try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover
    HAS_FLEX = False

try:  # optional: pip install moxin[gpu]
    from flash_attn import flash_attn_varlen_func  # type: ignore

    HAS_FLASH = True
except ImportError:
    HAS_FLASH = False


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "flex" if (device.type == "cuda" and HAS_FLEX) else "sdpa"
    if backend == "flash" and not HAS_FLASH:
        raise RuntimeError("attn_backend=flash needs the flash-attn package: pip install 'moxin[gpu]', "
                           "or use attn_backend=flex / sdpa")
    if backend in ("flex", "flash") and device.type != "cuda":
        raise RuntimeError(f"attn_backend={backend} runs on CUDA only; use attn_backend=sdpa on {device.type}")
    if backend not in ("sdpa", "flex", "flash"):
        raise ValueError(f"unknown attention backend {backend!r}: choose auto, sdpa, flex or flash")
    return backend


def sdpa_reference(q, k, v, window: int | None, doc_ids: torch.Tensor | None):
    """SDPA with the dense mask of `masks.training_mask`: the reference every kernel is tested against."""
    B, H, T, D = q.shape
    if window is None and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != H)
    mask = masks.dense_mask(masks.training_mask(window, doc_ids), B, T, T, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != H)


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=8)
def _static_block_mask(T: int, window: int | None, device: str):
    return create_block_mask(masks.training_mask(window, None), None, None, T, T, device=device)


#: Compiled FlexAttention kernels are not lowered reliably below this head size (seen: Inductor errors at 16);
#: smaller heads (test-size models) take the SDPA reference, which gives the same numbers.
FLEX_MIN_HEAD_DIM = 32

#: FlexAttention works on blocks of this many queries/keys; sequences are padded up to a multiple of it.
FLEX_BLOCK = 128


def flex_block_mask(window: int | None, doc_ids: torch.Tensor | None, batch: int, seq_len: int, device):
    """The FlexAttention block mask of a training forward over `seq_len` tokens padded to `FLEX_BLOCK`.

    Without documents the mask depends on the shape only and is cached. With documents it is built for the
    batch (compiled `create_block_mask`: the eager one evaluates the mask on every (q, kv) pair in Python-level
    vmap and costs more than the attention itself at 4K)."""
    pad = (-seq_len) % FLEX_BLOCK
    Tp = seq_len + pad
    if doc_ids is None:
        return _static_block_mask(Tp, window, str(device))
    if pad:
        doc_ids = F.pad(doc_ids, (0, pad), value=-1)  # padding is its own document
    return create_block_mask(masks.training_mask(window, doc_ids), batch, None, Tp, Tp, device=device,
                             _compile=torch.device(device).type == "cuda")


def flex(q, k, v, block_mask):
    """FlexAttention over a length padded up to a multiple of `FLEX_BLOCK` (the block mask's length).

    Why pad: Inductor lowers FlexAttention for whole blocks; lengths such as 40 or 64 tokens (DPO pairs, GRPO
    rollouts, short validation rows) have no valid kernel configuration on some torch versions
    (``NoValidChoicesError: No choices to select``), and every distinct length compiles a new kernel. Padding
    keys and queries at the end is exact: the causal mask keeps every real query (q < T) from the padded keys
    (kv >= T > q), and the padded queries' outputs are dropped, so they receive no gradient either.
    """
    B, H, T, D = q.shape
    pad = block_mask.shape[-2] - T
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, *, T + pad, D)
    out = _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)
    return out[:, :, :T] if pad else out


def flash_seqlens(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device) -> tuple[torch.Tensor, int]:
    """flash-attn varlen's cu_seqlens and longest sequence: every (row, document) becomes one sequence."""
    if doc_ids is None:
        doc_ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    flat = (doc_ids + torch.arange(batch, device=device).unsqueeze(1) * (seq_len + 1)).flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = change.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([batch * seq_len])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def flash(q, k, v, window: int | None, cu: torch.Tensor, max_len: int):
    B, H, T, D = q.shape
    KVH = k.shape[1]
    qf = q.transpose(1, 2).reshape(B * T, H, D)  # (B*T, H, D)
    kf = k.transpose(1, 2).reshape(B * T, KVH, D)
    vf = v.transpose(1, 2).reshape(B * T, KVH, D)
    ws = (-1, -1) if window is None else (window - 1, 0)
    out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True, window_size=ws)
    return out.reshape(B, T, H, D).transpose(1, 2)


@dataclass
class AttentionMask:
    """The attention of one training forward, decided and prepared once and shared by every layer (and by the
    recomputation under activation checkpointing): which kernel runs, and what it needs.

    kernel: ``causal`` (SDPA's dense causal kernel: the window covers the rows and each row holds one
    document), ``dense`` (SDPA with an explicit boolean mask: the reference), ``flex`` (block mask) or
    ``flash`` (varlen sequence bounds)."""

    kernel: str
    window: int | None = None
    doc_ids: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # (B, 1, T, T) bool, kernel dense
    block_mask: object = None  # flex's BlockMask over the padded length, kernel flex
    cu_seqlens: torch.Tensor | None = None  # kernel flash
    max_len: int = 0

    @classmethod
    def build(cls, backend: str, window: int | None, doc_ids: torch.Tensor | None, batch: int, seq_len: int,
              head_dim: int, device) -> "AttentionMask":
        """backend: a resolved backend (sdpa, flex or flash). doc_ids (B, T): document index of every token."""
        if backend not in ("sdpa", "flex", "flash"):
            raise ValueError(f"unknown attention backend {backend!r}: choose sdpa, flex or flash")
        if window is not None and window >= seq_len:
            window = None  # the window never bites: plain causal
        if doc_ids is not None and bool((doc_ids[:, -1] == doc_ids[:, 0]).all()):
            doc_ids = None  # one document per row (one host sync per forward, not per layer)
        if backend == "flash":
            cu, max_len = flash_seqlens(doc_ids, batch, seq_len, device)
            return cls("flash", window, doc_ids, cu_seqlens=cu, max_len=max_len)
        if window is None and doc_ids is None:
            # nothing to skip: SDPA's dense causal kernel (flash on a GPU) beats a block-sparse one, no padding
            return cls("causal")
        if backend == "flex" and head_dim >= FLEX_MIN_HEAD_DIM:
            return cls("flex", window, doc_ids, block_mask=flex_block_mask(window, doc_ids, batch, seq_len, device))
        dense = masks.dense_mask(masks.training_mask(window, doc_ids), batch, seq_len, seq_len, device)
        return cls("dense", window, doc_ids, dense=dense)

    def apply(self, q, k, v):
        """q (B, H, T, D); k, v (B, KVH, T, D) -> (B, H, T, D)."""
        gqa = k.shape[1] != q.shape[1]
        if self.kernel == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self.kernel == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
        if self.kernel == "flex":
            return flex(q, k, v, self.block_mask)
        return flash(q, k, v, self.window, self.cu_seqlens, self.max_len)


def attend(q, k, v, *, window: int | None, doc_ids: torch.Tensor | None, backend: str):
    """Training-time attention over one packed block, mask built for this call (a model builds one
    `AttentionMask` per forward instead). See the module docstring."""
    B, H, T, D = q.shape
    return AttentionMask.build(backend, window, doc_ids, B, T, D, q.device).apply(q, k, v)
