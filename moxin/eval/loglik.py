"""Log-likelihood of a continuation given a context, computed the way lm-evaluation-harness does for a
Hugging Face causal LM (``lm_eval/models/huggingface.py``), so multiple-choice scores agree item by item.

The context's trailing whitespace moves to the continuation, the whole string is tokenized (not the continuation
alone), the input is left-truncated to the model's length, and the continuation's log-probs are summed.
Requests with the same input share a row. What is mirrored, step by step: docs/modules.md, "eval/loglik.py".
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moxin.distributed import all_reduce_values
from moxin.model import masks
from moxin.model.attention import AttentionMask

__all__ = ["encode_pair", "encode_pairs", "LoglikResult", "loglikelihoods"]


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's ``HFLM._encode_pair`` with moxin's tokenizer: (context ids, continuation ids)."""
    return encode_pairs(tokenizer, [(context, continuation)], bos=bos)[0]


def _encode_eos_text(tokenizer, text: str, bos: bool, eos_text: str) -> list[int]:
    """``text`` with each ``eos_text`` encoded as the eos id, the way a Hugging Face tokenizer splits a special token
    out of text; the pieces after an eos are encoded as continuations (no dummy prefix), as moxin's chat renderer
    encodes the segments after one."""
    parts = text.split(eos_text)
    ids = tokenizer.encode(parts[0], bos=bos)
    for part in parts[1:]:
        ids.append(tokenizer.eos_id)
        if part:
            ids.extend(tokenizer.encode(part, continuation=True))
    return ids


def encode_pairs(tokenizer, pairs, bos: bool = True, eos_text: str | None = None) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``HFLM._encode_pair`` of every (context, continuation): the context's trailing whitespace moves to
    the continuation, the whole string is tokenized and split after the context's ids, an empty context is the
    prefix token alone. Each distinct text is tokenized once, all of them in one batched call where the tokenizer
    has `encode_batch` (a question's options share their context, a repeated item all its texts). ``eos_text``
    (chat contexts): that text is the eos id (:func:`_encode_eos_text`)."""
    texts: dict[tuple[str, bool], list[int] | None] = {}
    moved = []
    for context, continuation in pairs:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        moved.append((context, continuation))
        for key in ([(continuation, False)] if context == "" else [(context, bos), (context + continuation, bos)]):
            texts[key] = None
    for flag in (False, True):
        group = [t for t, b in texts if b == flag]
        if not group:
            continue
        batch = getattr(tokenizer, "encode_batch", None)
        if eos_text is not None:
            encoded = [_encode_eos_text(tokenizer, t, flag, eos_text) for t in group]
        else:
            encoded = batch(group, bos=flag) if batch else [tokenizer.encode(t, bos=flag) for t in group]
        texts.update(zip(((t, flag) for t in group), encoded))
    out = []
    for context, continuation in moved:
        if context == "":  # lm-eval: the prefix token (bos) stands for an empty context
            out.append(([tokenizer.bos_id], texts[continuation, False]))
        else:
            ctx = texts[context, bos]
            out.append((ctx, texts[context + continuation, bos][len(ctx):]))
    return out


@dataclass
class LoglikResult:
    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class _Batch:
    """One forward's rows. tokens (B, T); positions and last (B, T) for packed prefix trees (None: plain rows, each
    input from column 0); place: input index -> (row, the column of each of its tokens, by depth)."""

    tokens: np.ndarray
    positions: np.ndarray | None
    last: np.ndarray | None
    place: dict[int, tuple[int, np.ndarray]]


def _batches(lengths: list[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Request indices, longest first, cut into batches whose padded size (rows x longest) fits the budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * longest > batch_tokens or len(cur) >= max_batch):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def _padded_batches(inputs: list[np.ndarray], batch_tokens: int, max_batch: int, pad_id: int) -> list[_Batch]:
    """One right-padded row per input, longest first, under the token budget."""
    out = []
    for idx in _batches([len(x) for x in inputs], batch_tokens, max_batch):
        tokens = np.full((len(idx), len(inputs[idx[0]])), pad_id, dtype=np.int64)
        place = {}
        for r, u in enumerate(idx):
            tokens[r, :len(inputs[u])] = inputs[u]
            place[u] = (r, np.arange(len(inputs[u])))
        out.append(_Batch(tokens, None, None, place))
    return out


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _tree_rows(inputs: list[np.ndarray], row_len: int) -> list[list[tuple[int, int]]]:
    """The inputs in lexicographic order cut into rows of at most `row_len` packed tokens: each row a list of
    (input, tokens it shares with the row's previous input). In that order the new tokens of every input, written one
    after another, are a depth-first walk of the trie of the row's inputs: a shared prefix (a question's context
    before its options, a few-shot prefix, bos) is written once. A row's first input shares nothing."""
    order = sorted(range(len(inputs)), key=lambda u: inputs[u].tolist())
    rows: list[list[tuple[int, int]]] = []
    cur: list[tuple[int, int]] = []
    used = 0
    for u in order:
        shared = _common_prefix(inputs[cur[-1][0]], inputs[u]) if cur else 0
        if cur and used + len(inputs[u]) - shared > row_len:
            rows.append(cur)
            cur, used, shared = [], 0, 0
        cur.append((u, shared))
        used += len(inputs[u]) - shared
    if cur:
        rows.append(cur)
    return rows


def _pack_row(entries: list[tuple[int, int]], inputs: list[np.ndarray], tokens: np.ndarray, positions: np.ndarray,
              last: np.ndarray, place: dict, r: int) -> None:
    """Write one row of `_tree_rows` into tokens, positions (depth in the trie, which the rotary embedding reads) and
    last (the index of the last token of each token's subtree, `masks.subtree`). `last` comes in as every index
    itself, which is what padding keeps: a padding token sees itself only."""
    open_chains: list[list[int]] = []  # [depth of first token, index of first token, length] of unfinished subtrees
    off, path = 0, np.empty(0, dtype=np.int64)
    for u, shared in entries:
        inp = inputs[u]
        while open_chains and open_chains[-1][0] + open_chains[-1][2] > shared:  # subtrees this input leaves
            depth, start, n = open_chains[-1]
            keep = max(0, shared - depth)  # the chain's tokens above the branch point stay open
            last[start + keep:start + n] = off - 1
            if keep:
                open_chains[-1][2] = keep
                break
            open_chains.pop()
        new = len(inp) - shared
        tokens[off:off + new] = inp[shared:]
        positions[off:off + new] = np.arange(shared, len(inp))
        path = np.concatenate([path[:shared], np.arange(off, off + new)])
        place[u] = (r, path)
        open_chains.append([shared, off, new])
        off += new
    for _, start, n in open_chains:
        last[start:start + n] = off - 1


#: Packed rows are padded to a multiple of this many tokens (a multiple of any tensor-parallel size up to 16).
ROW_MULTIPLE = 16


def _tree_batches(inputs: list[np.ndarray], row_len: int, batch_tokens: int, max_batch: int,
                  pad_id: int) -> list[_Batch]:
    """Rows of packed prefix trees (`_tree_rows`), as many to a forward as the token budget holds."""
    rows = _tree_rows(inputs, row_len)
    per = max(1, min(max_batch, batch_tokens // row_len))
    out = []
    for b in range(0, len(rows), per):
        group = rows[b:b + per]
        T = max(sum(len(inputs[u]) - shared for u, shared in row) for row in group)
        # a multiple of 16 where the row allows it: tensor parallelism pads rows to a multiple of its size (which a
        # mask built for the unpadded rows would not fit), and SDPA's fused kernels want aligned mask rows
        T = max(T, min(-(-T // ROW_MULTIPLE) * ROW_MULTIPLE, row_len))
        tokens = np.full((len(group), T), pad_id, dtype=np.int64)
        positions = np.zeros((len(group), T), dtype=np.int64)
        last = np.tile(np.arange(T), (len(group), 1))
        place: dict[int, tuple[int, np.ndarray]] = {}
        for r, row in enumerate(group):
            _pack_row(row, inputs, tokens[r], positions[r], last[r], place, r)
        out.append(_Batch(tokens, positions, last, place))
    return out


@dataclass
class _TreeMask(AttentionMask):
    """The dense mask of packed prefix trees, applied with the keys and values repeated to every query head. SDPA's
    fused kernel that takes an explicit mask (memory-efficient attention) does not take grouped-query heads, so the
    grouped call would fall back to the math kernel on a GPU, which materialises every (head, query, key) score."""

    def apply(self, q, k, v):
        group = q.shape[1] // k.shape[1]
        if group > 1:  # query head h reads key head h // group, as enable_gqa does
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense)


def _tree_mask(batch: _Batch, window: int | None, device) -> tuple[torch.Tensor, AttentionMask]:
    """The rows' positions on `device` and the dense mask of their prefix trees (SDPA with an explicit mask on every
    device: the trees' attention is a small part of a forward next to the projections, and one kernel keeps the CPU
    and GPU paths alike). The window is added where some input is longer than it."""
    B, T = batch.positions.shape
    positions = torch.from_numpy(batch.positions).to(device)
    mods = [masks.subtree(torch.from_numpy(batch.last).to(device))]
    if window is not None and window <= int(batch.positions.max()):
        mods.append(masks.position_window(positions, window))
    return positions, _TreeMask("dense", dense=masks.dense_mask(masks.and_masks(*mods), B, T, T, device))


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, max_len: int | None = None,
                   batch_tokens: int = 16384, max_batch: int = 64, pad_id: int = 0, lockstep: bool = False,
                   share_prefixes: bool = True, row_tokens: int = 1024) -> list[LoglikResult]:
    """Summed log p(continuation | context) and is_greedy for every (context ids, continuation ids) request.

    share_prefixes: pack the inputs as prefix trees (`_tree_rows`), so a prefix that several inputs share (the
    context of a question's options, a few-shot prefix) goes through the model once; each token still attends to its
    own input's tokens only, at its own positions, so every result is the one of its input alone. False: one padded
    row per distinct input. row_tokens: packed tokens per row (at least the longest input).
    lockstep: with torch.distributed initialised, every rank runs the same number of forwards (a rank with fewer
    batches runs one-token dummy forwards), as needed when the forward is collective (FSDP2)."""
    device = next(model.parameters()).device
    max_len = max_len or model.cfg.max_seq_len
    inps, conts = [], []
    for k, (ctx, cont) in enumerate(requests):
        if not cont:
            raise ValueError(f"request {k}: empty continuation (an option that tokenizes to nothing cannot be scored)")
        full = (list(ctx) + list(cont))[-(max_len + 1):]
        inps.append(full[:-1])
        conts.append(full[1:][-min(len(cont), len(full) - 1):])  # all of cont unless truncation cut into it
    # one input per distinct token sequence: repeated requests, and the options of a question that differ only in
    # their last token (single-token continuations after one context), share it, as lm-eval's Collator shares them;
    # every request still reads its own continuation's positions and targets
    row_index: dict[tuple[int, ...], int] = {}
    rows_in: list[np.ndarray] = []
    requests_of: list[list[int]] = []
    for i, inp in enumerate(inps):
        u = row_index.setdefault(tuple(inp), len(rows_in))
        if u == len(rows_in):
            rows_in.append(np.asarray(inp, dtype=np.int64))
            requests_of.append([])
        requests_of[u].append(i)
    if share_prefixes and rows_in:
        row_len = min(max(row_tokens, max(len(x) for x in rows_in)), max(model.cfg.max_seq_len, max_len))
        batches = _tree_batches(rows_in, row_len, batch_tokens, max_batch, pad_id)
    else:
        batches = _padded_batches(rows_in, batch_tokens, max_batch, pad_id)
    n_runs = len(batches)
    if lockstep:
        n_runs = int(all_reduce_values([n_runs], device, "max")[0])
    results: list[LoglikResult | None] = [None] * len(requests)
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()
    for b in range(n_runs):
        if b >= len(batches):  # keep collective forwards matched across ranks
            model(torch.full((1, 1), pad_id, dtype=torch.long, device=device), head=lambda h, w: None)
            continue
        batch = batches[b]
        # the hidden states that predict a continuation token, each read once however many requests need it (the
        # options of a question all read the context's last one)
        slot_of: dict[tuple[int, int], int] = {}
        slots, targets, order = [], [], []
        for u, (r, cols) in batch.place.items():
            for i in requests_of[u]:
                for col in cols[len(cols) - len(conts[i]):].tolist():
                    slots.append(slot_of.setdefault((r, col), len(slot_of)))
                targets += conts[i]
                order.append(i)
        rows_t = torch.tensor([r for r, _ in slot_of], device=device)
        cols_t = torch.tensor([c for _, c in slot_of], device=device)
        slots_t = torch.tensor(slots, device=device)
        tgt = torch.tensor(targets, device=device)

        def head(h, w):
            with no_autocast:
                logits = torch.nn.functional.linear(h[rows_t, cols_t].float(), w.float())
                return logits.log_softmax(-1)[slots_t, tgt], logits.argmax(-1)[slots_t] == tgt

        tokens = torch.from_numpy(batch.tokens).to(device)
        if batch.positions is None:
            lp, greedy = model(tokens, head=head)
        else:
            positions, mask = _tree_mask(batch, model.cfg.sliding_window, device)
            lp, greedy = model(tokens, positions, head=head, attn_mask=mask)
        lp, greedy = lp.cpu(), greedy.cpu()  # summed in fp32, as lm-eval sums
        s = 0
        for i in order:
            c = len(conts[i])
            results[i] = LoglikResult(float(lp[s:s + c].sum()), bool(greedy[s:s + c].all()), c)
            s += c
    return results  # type: ignore[return-value]
