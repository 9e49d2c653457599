"""Rolling-buffer KV cache (Mistral 7B, section 2).

With sliding-window attention a query at position p only sees keys at positions p-W+1 .. p, so the cache
keeps W slots per layer and the keys/values of position i live in slot ``i mod W``. Memory is fixed at W
tokens however long the sequence grows: for Moxin-7B at 32K tokens, 4096 slots instead of 32768, 8x less.

Worked example, W = 4 slots, one sequence of 6 prompt tokens (positions 0..5) then decoding:

    prefill positions 0..5 (one chunk of 6 > W):
        the chunk attends to [cache (empty), its own 6 keys] under causal + window masks, then only the
        last W tokens are written: slot = pos % 4  ->  slot 0: pos 4, slot 1: pos 5, slot 2: pos 2, slot 3: pos 3
    decode position 6: its key goes to slot 6 % 4 = 2, overwriting pos 2, which position 6 no longer sees
        (6 - 2 = 4 = W); it attends to slots holding positions {3, 4, 5, 6}: exactly its window.
    decode position 7: slot 3 (pos 3 -> pos 7); window {4, 5, 6, 7}.

A chunk of several tokens must attend before it writes: its first query may still need keys that its own
later tokens would overwrite. A single decode token can write first (it only evicts the position just
outside its window), which lets decode attend over the W slots alone.

Every slot remembers the position it holds (``pos``, -1 when empty), and masks are built from positions, not
slot order, so left padding, right padding and per-row lengths all work: a token with position -1 (padding)
is never written and never attended to. When the whole generation is shorter than W, the cache allocates only
``max_len`` slots (nothing wraps then).

Static decode (``static_decode = True``, used by `generate`'s fast path on CUDA): a single-token step writes
exactly one slot per row, so it needs neither ``nonzero()`` nor any other host synchronisation: the slot of
row b is ``pos_b mod capacity``; a padding row (-1) writes the value the slot already holds, and every buffer
(``k``, ``v``, ``pos``) is updated in place. All shapes stay fixed from step to step, which lets a CUDA graph
capture the whole decode forward and replay it. The numbers are the same as the eager path's (same mask,
same attention call); tests hold them equal.

Decode attention kernel (``decode_kernel``): ``sdpa`` (`F.scaled_dot_product_attention` with the visibility mask,
everywhere), or ``flex`` (FlexAttention's decoding kernel, visibility recomputed inside it), which
`generate`'s compiled decode picks on CUDA where it applies (`flex_decode_applies`): on an H200 at the Moxin-7B
shape, batch 64, it took 38 us a layer where SDPA took 53 at 384 slots (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moxin.config import ModelConfig
from moxin.model.attention import FLEX_BLOCK, FLEX_MIN_HEAD_DIM, HAS_FLEX

if HAS_FLEX:
    from torch.nn.attention.flex_attention import flex_attention

#: Module switch for A/B runs: False keeps SDPA in the compiled decode.
FLEX_DECODE = True


def flex_decode_applies(cache: "RollingKVCache", head_dim: int, device) -> bool:
    """Whether the compiled decode step takes FlexAttention's decoding kernel for this cache: on CUDA, heads of at
    least `FLEX_MIN_HEAD_DIM` (as training's flex kernels), slots a multiple of FlexAttention's key block."""
    return (FLEX_DECODE and HAS_FLEX and torch.device(device).type == "cuda" and head_dim >= FLEX_MIN_HEAD_DIM
            and cache.capacity % FLEX_BLOCK == 0)


def _decode_flex(q, keys, values, q_pos, slot_pos, window: int | None):
    """The static single-token step's attention through FlexAttention: q (B, H, 1, hd); keys, values
    (B, KVH, C, hd) with this step's key already stored; q_pos (B, 1) the step's positions (-1: padding);
    slot_pos (B, C) the positions the slots held before this step. Visibility is recomputed inside the kernel from
    these two inputs, exactly as `RollingKVCache._visible` over the updated slots: slot ``q_pos mod C`` now holds
    q_pos, a key is visible when valid, not in the future and inside the window, and a padding row sees slot 0
    (no empty softmax). Compiled, the mask may only read the step's inputs (Inductor does not lower a
    FlexAttention modification that reads a tensor computed in the same graph). GQA maps query head h to key
    head h // G, as `enable_gqa` in SDPA; each cached key/value is read once. Fast only when compiled (the
    decode step is); the eager form materialises the scores and serves as the CPU check."""
    C = keys.shape[2]

    def visible(score, b, h, q_idx, kv_idx):
        qp = q_pos[b, 0]
        written = (qp >= 0) & (kv_idx == qp % C)
        kp = torch.where(written, qp, slot_pos[b, kv_idx])
        vis = (kp >= 0) & (kp <= qp)
        if window is not None:
            vis = vis & (qp - kp < window)
        vis = vis | ((qp < 0) & (kv_idx == 0))
        return torch.where(vis, score, -float("inf"))

    return flex_attention(q, keys, values, score_mod=visible, enable_gqa=keys.shape[1] != q.shape[1])


def _decode_sdpa(q, keys, values, mask):
    """Single-token attention over the cache. q (B, H, 1, hd); keys, values (B, KVH, C, hd); mask (B, 1, 1, C).

    The G = H / KVH query heads that share a key/value head are folded into the query-length axis,
    (B, H, 1, hd) -> (B, KVH, G, hd), so the kernel reads each cached key/value once instead of an
    `enable_gqa` expansion that materialises G copies of the cache per layer (which made decode several
    times slower than its weight reads on a GPU). Same arithmetic, same result."""
    B, H, T, hd = q.shape
    KVH = keys.shape[1]
    qg = q.reshape(B, KVH, (H // KVH) * T, hd)  # head h = kv * G + g, as enable_gqa's repeat_interleave
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)  # mask broadcasts over KVH, G
    return out.reshape(B, H, T, hd)


class RollingKVCache:
    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int | None = None, *,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """Slots per layer: the window W, or `max_len` when a whole generation fits in fewer than W tokens.
        With `sliding_window=None` (full attention) the cache needs `max_len` slots."""
        W = cfg.sliding_window
        if W is None and max_len is None:
            raise ValueError("a full-attention model (sliding_window=None) needs max_len for its cache")
        self.window = W
        self.capacity = W if max_len is None else (max_len if W is None else min(W, max_len))
        self.max_len = max_len
        self.batch_size = batch_size
        shape = (batch_size, cfg.n_kv_heads, self.capacity, cfg.head_dim)
        # one tensor per layer, not one (n_layers, ...) tensor: a compiled decode step updates each layer's
        # buffer in place, where a slice of a shared buffer made Inductor copy the whole cache every step
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = torch.full((batch_size, self.capacity), -1, dtype=torch.long, device=device)  # position per slot
        self._step = None
        self.static_decode = False
        """Single-token forwards take the sync-free, fixed-shape path (see the module docstring)."""
        self.decode_kernel = "sdpa"
        """The static path's attention kernel: sdpa or flex (see the module docstring)."""

    def nbytes(self) -> int:
        """Bytes the cache actually allocates (keys, values, slot positions)."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v, self.pos))

    def reset(self) -> None:
        self.pos.fill_(-1)

    def _visible(self, q_pos: torch.Tensor, kv_pos: torch.Tensor) -> torch.Tensor:
        """(B, 1, Tq, Tk) mask: key valid, not in the future, inside the window. Padded queries (-1) see
        everything valid or, with nothing valid, their row's first key, so no softmax row is empty (NaN)."""
        qp, kp = q_pos.unsqueeze(-1), kv_pos.unsqueeze(-2)  # (B, Tq, 1), (B, 1, Tk)
        vis = (kp >= 0) & (kp <= qp)
        if self.window is not None:
            vis &= (qp - kp) < self.window
        empty = ~vis.any(-1, keepdim=True)
        vis = vis | (empty & (torch.arange(vis.shape[-1], device=vis.device) == 0))
        return vis.unsqueeze(1)

    def begin(self, positions: torch.Tensor) -> None:
        """Called once per forward with the (B, T) positions of the new tokens; prepares masks and slots."""
        B, T = positions.shape
        if B != self.batch_size:
            raise ValueError(f"cache was built for batch {self.batch_size}, got tokens of batch {B}")
        if T == 1 and self.static_decode:
            return self._begin_static(positions)
        if self.max_len is not None and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is beyond the cache's max_len={self.max_len}")
        valid = positions >= 0
        # only the last `capacity` tokens of each row can survive; writing only those avoids slot collisions
        last = positions.max(dim=1, keepdim=True).values
        keep = valid & (positions > last - self.capacity)
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        slots = positions[b_idx, t_idx] % self.capacity
        decode = T == 1
        if decode:  # write first, then attend over the slots alone
            new_pos = self.pos.clone()
            new_pos[b_idx, slots] = positions[b_idx, t_idx]
            mask = self._visible(positions, new_pos)
        else:  # attend over [old slots, new tokens], then write
            new_pos = None
            mask = self._visible(positions, torch.cat([self.pos, torch.where(valid, positions, -1)], dim=1))
        self._step = (decode, b_idx, t_idx, slots, mask, new_pos, positions)

    def _begin_static(self, positions: torch.Tensor) -> None:
        """Single-token step without host syncs: one slot per row, fixed shapes. The caller guarantees
        positions < max_len (generate does: it sizes the cache for prompt + new tokens)."""
        valid = positions >= 0  # (B, 1)
        slot = positions.clamp(min=0) % self.capacity  # (B, 1)
        old = self.pos.gather(1, slot)
        new_pos = self.pos.clone().scatter_(1, slot, torch.where(valid, positions, old))
        mask = self._visible(positions, new_pos)
        self._step = ("static", valid, slot, None, mask, new_pos, positions)

    def _attend_static(self, layer: int, q, k, v):
        _, valid, slot, _, mask, _, _ = self._step
        kc, vc = self.k[layer], self.v[layer]  # (B, KVH, C, hd)
        B = kc.shape[0]
        # (rows, :, slot) indexes one (KVH, hd) slice per row: an index_put that Inductor compiles to a store
        # into the cache itself (a scatter made it rebuild the layer's whole cache every step)
        rows, col = torch.arange(B, device=kc.device), slot.view(B)
        keep = valid.view(B, 1, 1)
        # padding rows rewrite the value the slot already holds
        kc[rows, :, col] = torch.where(keep, k[:, :, 0].to(kc.dtype), kc[rows, :, col])
        vc[rows, :, col] = torch.where(keep, v[:, :, 0].to(vc.dtype), vc[rows, :, col])
        if self.decode_kernel == "flex":
            _, _, _, _, _, _, positions = self._step
            return _decode_flex(q, kc.to(q.dtype), vc.to(q.dtype), positions, self.pos, self.window)
        return _decode_sdpa(q, kc.to(q.dtype), vc.to(q.dtype), mask)

    def attend(self, layer: int, q, k, v):
        """q (B, H, T, hd); k, v (B, KVH, T, hd) of the new tokens, RoPE applied. Returns (B, H, T, hd)."""
        if self._step[0] == "static":
            return self._attend_static(layer, q, k, v)
        decode, b_idx, t_idx, slots, mask, _, _ = self._step
        kc, vc = self.k[layer], self.v[layer]  # (B, KVH, C, hd)
        k_new = k[b_idx, :, t_idx].to(kc.dtype)  # (N, KVH, hd)
        v_new = v[b_idx, :, t_idx].to(vc.dtype)
        if decode:
            kc[b_idx, :, slots] = k_new
            vc[b_idx, :, slots] = v_new
            return _decode_sdpa(q, kc.to(q.dtype), vc.to(q.dtype), mask)
        else:
            keys = torch.cat([kc, k.to(kc.dtype)], dim=2)
            values = torch.cat([vc, v.to(vc.dtype)], dim=2)
            kc[b_idx, :, slots] = k_new
            vc[b_idx, :, slots] = v_new
        gqa = keys.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=gqa)

    def end(self) -> None:
        decode, b_idx, t_idx, slots, _, new_pos, positions = self._step
        if decode == "static":
            self.pos.copy_(new_pos)  # in place: a captured graph keeps pointing at the same buffer
        elif decode:
            self.pos = new_pos
        else:
            self.pos[b_idx, slots] = positions[b_idx, t_idx]
        self._step = None
