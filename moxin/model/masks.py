"""Attention masks as small composable functions.

A mask function has FlexAttention's `mask_mod` signature ``(b, h, q_idx, kv_idx) -> bool tensor`` and says
whether query ``q_idx`` may attend to key ``kv_idx`` in batch row ``b``. The same expression drives
FlexAttention's block mask on the GPU and the dense boolean mask of the SDPA reference, so the kernels cannot
disagree about what is allowed.

    mask = and_masks(causal, sliding_window(4096), document(doc_ids))

Sliding-window convention (Mistral 7B paper, Hugging Face `MistralForCausalLM`): a query at position q sees
keys at positions k with 0 <= q - k < W, itself included, so at most W keys.
"""

from __future__ import annotations

from typing import Callable

import torch

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    """A query never sees later keys."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """Keys at most ``window - 1`` positions back (combined with `causal`: 0 <= q - k < window)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    return mask_mod


def document(doc_ids: torch.Tensor) -> MaskMod:
    """Tokens of different packed documents never see each other. ``doc_ids``: (B, T) document index per token."""

    def mask_mod(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx] == doc_ids[b, kv_idx]

    return mask_mod


def and_masks(*mods: MaskMod) -> MaskMod:
    """A key is visible only if every mask allows it."""

    def mask_mod(b, h, q_idx, kv_idx):
        out = mods[0](b, h, q_idx, kv_idx)
        for m in mods[1:]:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def doc_ids_from_positions(positions: torch.Tensor) -> torch.Tensor:
    """Document index of every token of packed rows: a position of 0 starts a new document. (B, T) -> (B, T)."""
    return (positions == 0).cumsum(dim=1)


def training_mask(window: int | None, doc_ids: torch.Tensor | None) -> MaskMod:
    """The mask of a training forward: causal, optionally windowed, optionally split into documents."""
    mods = [causal]
    if window is not None:
        mods.append(sliding_window(window))
    if doc_ids is not None:
        mods.append(document(doc_ids))
    return and_masks(*mods)


def dense_mask(mask_mod: MaskMod, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Evaluate a mask function on every (b, q, kv): a (B, 1, Q, KV) boolean tensor for SDPA."""
    b = torch.arange(batch, device=device).view(batch, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    q = torch.arange(q_len, device=device).view(1, 1, q_len, 1)
    kv = torch.arange(kv_len, device=device).view(1, 1, 1, kv_len)
    return mask_mod(b, h, q, kv).expand(batch, 1, q_len, kv_len)


def subtree(last: torch.Tensor) -> MaskMod:
    """Packed prefix trees: a token sees its ancestors and itself. Tokens in depth-first order, ``last`` (B, T) the
    index of the last token of each token's subtree, so the ancestors of q are exactly the kv <= q whose subtree
    reaches q. Causal by construction; separate trees (and padding, each its own tree) never see each other."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx <= last[b, kv_idx])

    return mask_mod


def position_window(positions: torch.Tensor, window: int) -> MaskMod:
    """`sliding_window` over positions (B, T) rather than indices, for rows whose positions are not their indices
    (packed prefix trees): a query sees keys at most ``window - 1`` positions back."""

    def mask_mod(b, h, q_idx, kv_idx):
        return positions[b, q_idx] - positions[b, kv_idx] < window

    return mask_mod
