"""Rolling-buffer KV cache (Mistral 7B, section 2): W slots per layer, the keys and values of position i in slot
``i mod W``, so memory stays at W tokens however long the sequence grows.

Worked example, W = 4, a 6-token prompt (positions 0..5) then decoding:

    prefill 0..5  the chunk attends to [cache, its own 6 keys], then writes its last W tokens:
                  slot 0: pos 4, slot 1: pos 5, slot 2: pos 2, slot 3: pos 3
    decode 6      writes slot 2 (pos 2 is now outside the window), attends to positions {3, 4, 5, 6}
    decode 7      writes slot 3, attends to {4, 5, 6, 7}

Every slot remembers its position (-1: empty; a padding token is never written nor attended to) and masks are
built from positions, not slot order. Write order, the static decode path and the decode kernels:
docs/modules.md, "model/cache.py".
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
