"""One attention call, several kernels.

`AttentionMask.build(backend, window, doc_ids, ...)` decides once per forward how causal, optionally
sliding-window and document-masked grouped-query attention is computed (``sdpa`` with a dense mask, the
reference; ``flex``, FlexAttention's block mask; ``flash``, FlashAttention's varlen bounds) and every layer calls
`mask.apply(q, k, v)`. All backends give the reference's numbers (tests/test_attention.py). Which backend ``auto``
takes and why, and the host-side document bounds that spare a device sync: docs/modules.md, "model/attention.py".

Shapes: q (B, H, T, D); k, v (B, KVH, T, D); returns (B, H, T, D).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moxin.devices import to_device
from moxin.model import masks

try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    HAS_FLEX = True
except ImportError:  # pragma: no cover
    HAS_FLEX = False

try:  # optional: pip install 'moxin[gpu]' (flash-attn 2)
    from flash_attn import flash_attn_varlen_func  # type: ignore

    HAS_FLASH2 = True
except ImportError:
    HAS_FLASH2 = False


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # the parent package is missing
        return False


# optional: pip install 'moxin[flash4]' (FlashAttention-4, CuTe DSL kernels for Hopper / Blackwell). Imported on
# first use: the import takes seconds.
HAS_FLASH4 = _has_module("flash_attn.cute")
HAS_FLASH = HAS_FLASH2 or HAS_FLASH4


def flash_version(device) -> int | None:
    """Which FlashAttention the ``flash`` backend runs on `device`: 4 (Hopper or newer, flash-attn-4 installed),
    2 (flash-attn 2 installed), or None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if HAS_FLASH4 and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9:
        return 4
    return 2 if HAS_FLASH2 else None


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        if device.type != "cuda":
            return "sdpa"
        if flash_version(device) == 4:  # the fastest for windows and documents (docs/performance.md)
            return "flash"
        return "flex" if HAS_FLEX else "sdpa"
    if backend == "flash" and not HAS_FLASH:
        raise RuntimeError("attn_backend=flash needs FlashAttention: pip install 'moxin[flash4]' (flash-attn-4, "
                           "Hopper or newer) or 'moxin[gpu]' (flash-attn 2); or use attn_backend=flex / sdpa")
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


def mark_varying(t: torch.Tensor | None, *dims: int) -> None:
    """Tell torch.compile that `dims` of `t` change from call to call (GRPO's micro-batches: rows of many lengths,
    a varying number of them), so a compiled block is traced for any size the first time instead of once for the
    first size and again when it changes (every such recompile takes minutes on a GPU, and past
    ``torch._dynamo.config.recompile_limit`` (8) variants of a block the rest run eagerly). A size of 1 is still
    specialised by Dynamo (``maybe_mark_dynamic`` accepts that). No effect outside compiled code."""
    if t is not None:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def _document_block_mask(doc_ids: torch.Tensor, window: int | None):
    """The block mask of (B, Tp) document ids padded to whole blocks: causal, within the document, within the
    window. One function, so that its compiled form and a compiled block taking its result see one mask of one
    structure whatever the batch (`masks.training_mask` of a window that comes and goes was two)."""
    B, Tp = doc_ids.shape
    return create_block_mask(masks.training_mask(window, doc_ids), B, None, Tp, Tp, device=doc_ids.device)


@functools.cache
def _compiled_document_block_mask():
    # compiled once (torchtitan's `torch.compile(create_block_mask)`): the eager one evaluates the mask on every
    # (q, kv) pair in Python-level vmap and costs more than the attention itself at 4K
    return torch.compile(_document_block_mask)


def _mark_block_mask_varying(bm) -> None:
    """`mark_varying` over a BlockMask's tensors: (B, H, rows of blocks[, columns of blocks])."""
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks",
                 "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(bm, name, None)
        if t is not None:
            mark_varying(t, 0, *range(2, t.dim()))


def flex_block_mask(window: int | None, doc_ids: torch.Tensor | None, batch: int, seq_len: int, device,
                    varying: bool = False):
    """The FlexAttention block mask of a training forward over `seq_len` tokens padded to `FLEX_BLOCK`.

    Without documents the mask depends on the shape only and is cached. With documents it is built for the
    batch by `_document_block_mask` (compiled on CUDA); pass the model's window whether or not it bites at this
    length, so every batch's mask has one structure. `varying`: the batch's shape changes from call to call
    (`mark_varying` on the ids and the mask's tensors)."""
    pad = (-seq_len) % FLEX_BLOCK
    Tp = seq_len + pad
    if doc_ids is None:
        return _static_block_mask(Tp, window, str(device))
    if pad:
        doc_ids = F.pad(doc_ids, (0, pad), value=-1)  # padding is its own document
    if varying:
        mark_varying(doc_ids, 0, 1)
    build = _compiled_document_block_mask() if torch.device(device).type == "cuda" else _document_block_mask
    bm = build(doc_ids, window)
    if varying:
        _mark_block_mask_varying(bm)
    return bm


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
    # inside a compiled region (a compiled block) Dynamo traces flex_attention into the region's graph; calling
    # the separately compiled wrapper there is a graph break before and after it, forward and backward
    kernel = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
    out = kernel(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != H)
    return out[:, :, :T] if pad else out


@dataclass
class DocBounds:
    """The document bounds of a batch of packed rows, computed where the rows' positions are (on the host, before
    the batch goes to the GPU), so that a training forward prepares its attention without reading the device.

    batch, seq_len: the rows' shape. cu_seqlens: int32 (n + 1,) starts of the n (row, document) sequences and the
    total, as FlashAttention's varlen call takes them; None when every row holds one document. max_len: the
    longest of them. Lightning moves it with the batch (`to`)."""

    batch: int
    seq_len: int
    cu_seqlens: torch.Tensor | None
    max_len: int

    @classmethod
    def from_positions(cls, positions: torch.Tensor) -> "DocBounds":
        """From (B, T) positions where a 0 starts a document (the model's rule). On a GPU tensor this reads the
        device, which is what it exists to avoid: give it the host's copy."""
        if positions.dim() != 2:
            raise ValueError(f"positions must be (batch, seq_len), got shape {tuple(positions.shape)}")
        B, T = positions.shape
        doc_ids = masks.doc_ids_from_positions(positions)
        if one_doc_per_row(doc_ids):
            return cls(B, T, None, T)
        cu, max_len = flash_seqlens(doc_ids, B, T, positions.device)
        return cls(B, T, cu, max_len)

    @property
    def one_doc_per_row(self) -> bool:
        return self.cu_seqlens is None

    def to(self, device, non_blocking: bool = False) -> "DocBounds":
        """A copy whose `cu_seqlens` is on `device` (pinned first when copied to a GPU without blocking, so the
        copy waits for nothing already queued)."""
        cu = self.cu_seqlens
        if cu is None or cu.device == torch.device(device):
            return self
        return dataclasses.replace(self, cu_seqlens=to_device(cu, device) if non_blocking else cu.to(device))


def one_doc_per_row(doc_ids: torch.Tensor) -> bool:
    """Whether every row of (B, T) document ids holds one document (reads the values: a device sync on a GPU)."""
    return bool((doc_ids[:, -1] == doc_ids[:, 0]).all())


def flash_seqlens(doc_ids: torch.Tensor | None, batch: int, seq_len: int, device) -> tuple[torch.Tensor, int]:
    """FlashAttention varlen's cu_seqlens and longest sequence: every (row, document) becomes one sequence."""
    if doc_ids is None:  # one sequence a row: known without reading the device
        return torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=device), seq_len
    flat = (doc_ids + torch.arange(batch, device=device).unsqueeze(1) * (seq_len + 1)).flatten()
    change = torch.ones_like(flat, dtype=torch.bool)
    change[1:] = flat[1:] != flat[:-1]
    starts = change.nonzero().flatten()
    cu = torch.cat([starts, starts.new_tensor([batch * seq_len])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


@functools.cache
def _flash4():
    # optional (pip install "moxin[flash4]"), imported on the first FlashAttention-4 call
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func as varlen  # type: ignore

    return flash_attn_func, varlen


FLASH_DTYPES = (torch.bfloat16, torch.float16)


@torch.compiler.disable  # FlashAttention-4 launches CuTe kernels from Python: compiled blocks call it eagerly
def flash_bthd(q, k, v, window: int | None, cu: torch.Tensor | None, max_len: int, version: int = 2):
    """FlashAttention over q (B, T, H, D) and k, v (B, T, KVH, D), its own layout (GQA native); returns (B, T, H, D).
    cu None: one document per row (FlashAttention-4's batched kernel); else varlen over `cu` (every row and
    document its own sequence). Contiguous inputs are read without a copy, and the gradients it returns are
    contiguous in the same layout."""
    B, T, H, D = q.shape
    KVH = k.shape[2]
    if version == 4:
        dense, varlen = _flash4()
        ws = (None, None) if window is None else (window - 1, 0)
        if cu is None:
            out = dense(q, k, v, causal=True, window_size=ws)
        else:
            out = varlen(q.reshape(B * T, H, D), k.reshape(B * T, KVH, D), v.reshape(B * T, KVH, D),
                         cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_len, max_seqlen_k=max_len,
                         causal=True, window_size=ws)
        out = out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases
    else:
        if cu is None:
            cu, max_len = flash_seqlens(None, B, T, q.device)
        ws = (-1, -1) if window is None else (window - 1, 0)
        out = flash_attn_varlen_func(q.reshape(B * T, H, D), k.reshape(B * T, KVH, D), v.reshape(B * T, KVH, D),
                                     cu, cu, max_len, max_len, causal=True, window_size=ws)
    return out.reshape(B, T, H, D)


def flash(q, k, v, window: int | None, cu: torch.Tensor | None, max_len: int, version: int = 2):
    """`flash_bthd` over (B, H, T, D) q and (B, KVH, T, D) k, v, as the other kernels take them."""
    out = flash_bthd(*(t.transpose(1, 2) for t in (q, k, v)), window, cu, max_len, version)
    return out.transpose(1, 2)


@dataclass
class AttentionMask:
    """The attention of one training forward, decided and prepared once and shared by every layer (and by the
    recomputation under activation checkpointing): which kernel runs, and what it needs.

    kernel: ``causal`` (SDPA's dense causal kernel: the window covers the rows and each row holds one
    document), ``dense`` (SDPA with an explicit boolean mask: the reference), ``flex`` (block mask) or
    ``flash`` (FlashAttention; varlen sequence bounds where rows hold several documents)."""

    kernel: str
    window: int | None = None
    doc_ids: torch.Tensor | None = None
    dense: torch.Tensor | None = None  # (B, 1, T, T) bool, kernel dense
    block_mask: object = None  # flex's BlockMask over the padded length, kernel flex
    cu_seqlens: torch.Tensor | None = None  # kernel flash: None = one document per row (FlashAttention-4)
    max_len: int = 0
    flash_version: int = 2
    fallback: "AttentionMask | None" = None  # kernel flash, fp32 inputs: built on first use

    @classmethod
    def build(cls, backend: str, window: int | None, doc_ids: torch.Tensor | None, batch: int, seq_len: int,
              head_dim: int, device, bounds: DocBounds | None = None, varying: bool = False) -> "AttentionMask":
        """backend: a resolved backend (sdpa, flex or flash). doc_ids (B, T): document index of every token.
        bounds: the same rows' `DocBounds` from the host; without it the decision reads the device.
        varying: the rows' shape changes from call to call (`mark_varying` on what the mask holds)."""
        if backend not in ("sdpa", "flex", "flash"):
            raise ValueError(f"unknown attention backend {backend!r}: choose sdpa, flex or flash")
        if bounds is not None and (bounds.batch, bounds.seq_len) != (batch, seq_len):
            raise ValueError(f"doc_bounds were computed for rows of shape ({bounds.batch}, {bounds.seq_len}) but "
                             f"the forward has ({batch}, {seq_len}): compute them from this batch's positions")
        model_window = window  # flex's document mask keeps it at every length: one mask structure
        if window is not None and window >= seq_len:
            window = None  # the window never bites: plain causal
        if bounds is not None:
            if bounds.one_doc_per_row:
                doc_ids = None
        elif doc_ids is not None and one_doc_per_row(doc_ids):
            doc_ids = None  # one host sync per forward, not per layer
        if window is None and doc_ids is None:
            # nothing to skip: SDPA's dense causal kernel (flash-attn 2 inside) beats a block-sparse one, no
            # padding; FlashAttention-4 is no faster here (docs/performance.md, "FlashAttention-4 for the window")
            return cls("causal")
        if backend == "flash":
            version = flash_version(device)
            if version is None:
                raise RuntimeError("attn_backend=flash: flash-attn-4 needs a Hopper or newer GPU and flash-attn 2 is "
                                   "not installed; use attn_backend=flex")
            if version == 4 and doc_ids is None:  # the batched kernel, no sequence bounds
                return cls("flash", window, None, max_len=seq_len, flash_version=4)
            if bounds is not None and not bounds.one_doc_per_row:
                cu, max_len = bounds.to(device, non_blocking=True).cu_seqlens, bounds.max_len
            else:  # flash-attn 2 takes one sequence a row as varlen too
                cu, max_len = flash_seqlens(doc_ids, batch, seq_len, device)
            return cls("flash", window, doc_ids, cu_seqlens=cu, max_len=max_len, flash_version=version)
        if backend == "flex" and head_dim >= FLEX_MIN_HEAD_DIM:
            bm = flex_block_mask(window if doc_ids is None else model_window, doc_ids, batch, seq_len, device,
                                 varying)
            return cls("flex", window, doc_ids, block_mask=bm)
        dense = masks.dense_mask(masks.training_mask(window, doc_ids), batch, seq_len, seq_len, device)
        if varying:
            mark_varying(dense, 0, 2, 3)
        return cls("dense", window, doc_ids, dense=dense)

    def takes_bthd(self, dtype: torch.dtype) -> bool:
        """Whether `apply_bthd` runs FlashAttention on inputs of `dtype` (it computes in 16 bits only)."""
        return self.kernel == "flash" and dtype in FLASH_DTYPES

    def apply_bthd(self, q, k, v):
        """q (B, T, H, D); k, v (B, T, KVH, D) -> (B, T, H, D): FlashAttention in its own layout, where
        `takes_bthd`. A compiled block hands it contiguous tensors, so neither its inputs nor the gradients it
        returns are copied (AOT autograd makes a gradient contiguous before the block's backward when the block's
        output was; (B, H, T, D) views of them were copied there, three a block)."""
        if not self.takes_bthd(q.dtype):
            raise ValueError(f"apply_bthd runs FlashAttention in 16 bits; this mask's kernel is {self.kernel!r} and "
                             f"the inputs are {q.dtype}: use apply on (B, H, T, D) tensors")
        return flash_bthd(q, k, v, self.window, self.cu_seqlens, self.max_len, self.flash_version)

    def apply(self, q, k, v):
        """q (B, H, T, D); k, v (B, KVH, T, D) -> (B, H, T, D)."""
        gqa = k.shape[1] != q.shape[1]
        if self.kernel == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if self.kernel == "dense":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense, enable_gqa=gqa)
        if self.kernel == "flex":
            return flex(q, k, v, self.block_mask)
        if q.dtype in FLASH_DTYPES:
            return flash(q, k, v, self.window, self.cu_seqlens, self.max_len, self.flash_version)
        if self.fallback is None:  # FlashAttention computes in bf16 / fp16 only
            B, _, T, D = q.shape
            self.fallback = AttentionMask.build("flex" if HAS_FLEX else "sdpa", self.window, self.doc_ids, B, T, D,
                                                q.device)
        return self.fallback.apply(q, k, v)


def attend(q, k, v, *, window: int | None, doc_ids: torch.Tensor | None, backend: str):
    """Training-time attention over one packed block, mask built for this call (a model builds one
    `AttentionMask` per forward instead). See the module docstring."""
    B, H, T, D = q.shape
    return AttentionMask.build(backend, window, doc_ids, B, T, D, q.device).apply(q, k, v)
