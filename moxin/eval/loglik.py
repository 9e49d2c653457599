"""Log-likelihood of a continuation given a context, computed the way lm-evaluation-harness does for a
Hugging Face causal LM (``lm_eval/models/huggingface.py``), so multiple-choice scores agree item by item.

The context's trailing whitespace moves to the continuation, the whole string is tokenized (not the continuation
alone), the input is left-truncated to the model's length, and the continuation's log-probs are summed.
Requests with the same input share a row. What is mirrored, step by step: docs/modules.md, "eval/loglik.py".
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from moxin.distributed import all_reduce_values

__all__ = ["encode_pair", "encode_pairs", "LoglikResult", "loglikelihoods"]


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True) -> tuple[list[int], list[int]]:
    """lm-eval's ``HFLM._encode_pair`` with moxin's tokenizer: (context ids, continuation ids)."""
    return encode_pairs(tokenizer, [(context, continuation)], bos=bos)[0]


def encode_pairs(tokenizer, pairs, bos: bool = True) -> list[tuple[list[int], list[int]]]:
    """lm-eval's ``HFLM._encode_pair`` of every (context, continuation): the context's trailing whitespace moves to
    the continuation, the whole string is tokenized and split after the context's ids, an empty context is the
    prefix token alone. Each distinct text is tokenized once, all of them in one batched call where the tokenizer
    has `encode_batch` (a question's options share their context, a repeated item all its texts)."""
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


@torch.no_grad()
def loglikelihoods(model, requests: list[tuple[list[int], list[int]]], *, max_len: int | None = None,
                   batch_tokens: int = 16384, max_batch: int = 64, pad_id: int = 0,
                   lockstep: bool = False) -> list[LoglikResult]:
    """Summed log p(continuation | context) and is_greedy for every (context ids, continuation ids) request.

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
    # one model row per distinct input: repeated requests, and the options of a question that differ only in
    # their last token (single-token continuations after one context), share a forward, as lm-eval's Collator
    # shares them; every request still reads its own continuation's positions and targets
    row_index: dict[tuple[int, ...], int] = {}
    rows_in: list[list[int]] = []
    requests_of: list[list[int]] = []
    for i, inp in enumerate(inps):
        u = row_index.setdefault(tuple(inp), len(rows_in))
        if u == len(rows_in):
            rows_in.append(inp)
            requests_of.append([])
        requests_of[u].append(i)
    batches = _batches([len(x) for x in rows_in], batch_tokens, max_batch)
    n_runs = len(batches)
    if lockstep:
        n_runs = int(all_reduce_values([n_runs], device, "max")[0])
    results: list[LoglikResult | None] = [None] * len(requests)
    no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()
    for b in range(n_runs):
        if b >= len(batches):  # keep collective forwards matched across ranks
            model(torch.full((1, 1), pad_id, dtype=torch.long, device=device), head=lambda h, w: None)
            continue
        idx = batches[b]
        T = max(len(rows_in[u]) for u in idx)
        tokens = torch.full((len(idx), T), pad_id, dtype=torch.long)
        rows, cols, targets, order = [], [], [], []
        for r, u in enumerate(idx):
            n = len(rows_in[u])
            tokens[r, :n] = torch.tensor(rows_in[u])
            for i in requests_of[u]:
                c = len(conts[i])
                rows += [r] * c
                cols += range(n - c, n)
                targets += conts[i]
                order.append(i)
        rows_t = torch.tensor(rows, device=device)
        cols_t = torch.tensor(cols, device=device)
        tgt = torch.tensor(targets, device=device)

        def head(h, w):
            with no_autocast:
                logits = torch.nn.functional.linear(h[rows_t, cols_t].float(), w.float())
                logp = logits.log_softmax(-1)
                return logp.gather(-1, tgt[:, None]).squeeze(-1), logits.argmax(-1) == tgt

        lp, greedy = model(tokens.to(device), head=head)
        lp, greedy = lp.cpu(), greedy.cpu()  # summed in fp32, as lm-eval sums
        s = 0
        for i in order:
            c = len(conts[i])
            results[i] = LoglikResult(float(lp[s:s + c].sum()), bool(greedy[s:s + c].all()), c)
            s += c
    return results  # type: ignore[return-value]
