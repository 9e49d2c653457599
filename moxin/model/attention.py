"""One attention call, several kernels.

`attend(q, k, v, window, doc_ids, backend)` computes causal (optionally sliding-window, optionally
document-masked) grouped-query attention for a training forward:

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
    return backend


def sdpa_reference(q, k, v, window: int | None, doc_ids: torch.Tensor | None):
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


def flex(q, k, v, window: int | None, doc_ids: torch.Tensor | None):
    """FlexAttention over a length padded up to a multiple of `FLEX_BLOCK`.

    Why pad: Inductor lowers FlexAttention for whole blocks; lengths such as 40 or 64 tokens (DPO pairs, GRPO
    rollouts, short validation rows) have no valid kernel configuration on some torch versions
    (``NoValidChoicesError: No choices to select``), and every distinct length compiles a new kernel. Padding
    keys and queries at the end is exact: the causal mask keeps every real query (q < T) from the padded keys
    (kv >= T > q), and the padded queries' outputs are dropped, so they receive no gradient either.
    """
    B, H, T, D = q.shape
    pad = (-T) % FLEX_BLOCK
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))  # (B, *, T + pad, D)
        if doc_ids is not None:
            doc_ids = F.pad(doc_ids, (0, pad), value=-1)  # padding is its own document
    Tp = T + pad
    if doc_ids is None:
        block_mask = _static_block_mask(Tp, window, str(q.device))
    else:
        block_mask = create_block_mask(masks.training_mask(window, doc_ids), B, None, Tp, Tp, device=q.device)
    out = _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)
    return out[:, :, :T] if pad else out


def flash(q, k, v, window: int | None, doc_ids: torch.Tensor | None):
    B, H, T, D = q.shape
    KVH = k.shape[1]
    if doc_ids is None:
        doc_ids = torch.zeros(B, T, dtype=torch.long, device=q.device)
    # every (row, document) becomes one varlen sequence
    flat = (doc_ids + torch.arange(B, device=q.device).unsqueeze(1) * (T + 1)).flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = change.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([B * T])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    qf = q.transpose(1, 2).reshape(B * T, H, D)  # (B*T, H, D)
    kf = k.transpose(1, 2).reshape(B * T, KVH, D)
    vf = v.transpose(1, 2).reshape(B * T, KVH, D)
    ws = (-1, -1) if window is None else (window - 1, 0)
    out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_len, max_len, causal=True, window_size=ws)
    return out.reshape(B, T, H, D).transpose(1, 2)


def attend(q, k, v, *, window: int | None, doc_ids: torch.Tensor | None, backend: str):
    """Training-time attention over one packed block. See the module docstring."""
    if window is not None and window >= q.shape[2]:
        window = None  # the window never bites: plain causal
    if backend == "sdpa":
        return sdpa_reference(q, k, v, window, doc_ids)
    if backend == "flex":
        if q.shape[-1] < FLEX_MIN_HEAD_DIM or (window is None and doc_ids is None):
            # plain causal attention (the window covers the row, one document): SDPA's dense causal kernel
            # (flash on a GPU) is faster than a block-sparse one with nothing to skip, and needs no padding
            return sdpa_reference(q, k, v, window, doc_ids)
        return flex(q, k, v, window, doc_ids)
    if backend == "flash":
        return flash(q, k, v, window, doc_ids)
    raise ValueError(f"unknown attention backend {backend!r}")
