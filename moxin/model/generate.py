"""Batched generation on the rolling-buffer cache: prefill (optionally in chunks), then decode.

Prompts are padded left or right (position -1: never cached nor attended to); sampling is temperature, top-k
and top-p (temperature 0: greedy); a row stops at any of `stop_tokens`, at any of `stop_strings` in its decoded text
(:class:`StopStrings`, lm-eval's ``until``), or after `max_new_tokens`; randomness
comes only from `generator`, so a seed reproduces the rollouts. The decode paths (``eager``, the reference;
``static``; ``graph``; ``compiled``) give the same tokens: docs/modules.md, "model/generate.py".
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moxin.config import DecodePath
from moxin.model.cache import RollingKVCache, flex_decode_applies

DECODE_PATHS = tuple(p.value for p in DecodePath)

#: With decode="compiled" the cache holds a multiple of this many slots (capped at the window), so that
#: generations whose prompt + new tokens differ by less than this reuse one compiled step.
CACHE_ROUND = 128


@dataclass
class GenerationOutput:
    tokens: list[list[int]]
    """New tokens per prompt, the stop token included when one was produced."""
    finished: list[bool]
    """True when the row stopped on a stop token, False when it ran into max_new_tokens (truncated)."""
    logprobs: list[list[float]] | None = None
    """Log-probability of each sampled token under the sampling distribution's logits (temperature applied)."""


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                rows_of: tuple[int, int] | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). temperature 0 means greedy.

    rows_of (first, total): the B rows are rows first..first+B of a batch of `total` rows. The draw is then the
    whole batch's (`torch.multinomial`'s own exponential race, argmax(p / q) with q ~ Exp(1) over a (total, V)
    tensor from `generator`) and these rows take theirs, so each row gets the token `torch.multinomial` gives it
    in the whole batch from the same generator state: a batch split over processes samples as one."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the first always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    if rows_of is None:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    first, total = rows_of
    if not 0 <= first <= first + len(probs) <= total:
        raise ValueError(f"sample_next(rows_of={rows_of}): {len(probs)} rows from row {first} do not lie within "
                         f"{total} rows")
    q = probs.new_empty(total, probs.shape[-1]).exponential_(1, generator=generator)
    return (probs / q[first:first + len(probs)]).argmax(-1)


class StopStrings:
    """Which rows' generated text contains a stop string, checked on the host as tokens arrive.

    ``feed(row, new_tokens)`` is True once ``decode(all of the row's tokens so far)`` contains one of ``stops``. A stop
    string may span several tokens, so each check decodes the new tokens with enough earlier ones in front that at
    least ``max(len(stop)) + 4`` characters precede them (4 more than a stop string can reach back: a window's first
    characters may decode differently, a leading space dropped, a split UTF-8 character as replacement characters);
    a stop string wholly in earlier tokens was found by an earlier check. Each check costs two decodes of about that
    many tokens, not of the whole row."""

    def __init__(self, stops, decode: Callable[[list[int]], str], batch: int):
        self.stops = tuple(s for s in stops if s)
        if not self.stops:
            raise ValueError("StopStrings needs at least one non-empty stop string")
        self.decode = decode
        self.need = max(map(len, self.stops)) + 4
        self.tokens: list[list[int]] = [[] for _ in range(batch)]

    def feed(self, row: int, new: list[int]) -> bool:
        toks = self.tokens[row]
        first_new = len(toks)
        toks.extend(new)
        s = first_new
        while s > 0:  # reach back far enough that `need` characters precede the new tokens
            s = max(0, s - self.need)
            if len(self.decode(toks[s:first_new])) >= self.need:
                break
        text = self.decode(toks[s:])
        return any(stop in text for stop in self.stops)


def _stop_on_strings(checker: StopStrings, out: torch.Tensor, seen: int, t: int, done: torch.Tensor,
                     stopped: torch.Tensor) -> int:
    """Feed the rows still running their tokens ``seen..t`` and end the rows whose text now holds a stop string;
    returns the next unseen column."""
    new = out[:, seen:t + 1].tolist()
    live = (~done).tolist()
    hits = [i for i, row in enumerate(new) if live[i] and checker.feed(i, row)]
    if hits:
        idx = torch.tensor(hits, device=done.device)
        done[idx] = True
        stopped[idx] = True
    return t + 1


def _all_done(done: torch.Tensor, lockstep: bool) -> bool:
    if lockstep and torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = done.all().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return bool(done.all())


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: tuple[int, ...] = (),
             pad_side: str = "left", prefill_chunk: int | None = None, generator: torch.Generator | None = None,
             pad_id: int = 0, cache_dtype: torch.dtype | None = None, return_logprobs: bool = False,
             decode: str = "auto", sync_every: int = 16, lockstep: bool = False,
             on_finished: Callable[[list[int], list[list[int]]], None] | None = None,
             stop_strings: tuple[str, ...] = (), tokenizer=None,
             rows_of: tuple[int, int] | None = None) -> GenerationOutput:
    """Generate up to `max_new_tokens` for every prompt (lists of token ids) with one rolling cache.

    decode: auto (graph on CUDA, eager elsewhere), eager, static, graph or compiled; see the module docstring.
    sync_every: with static/graph, tokens between host checks of "every row has stopped".
    lockstep: with torch.distributed initialised, stop only when every rank's rows have stopped, so all ranks run
        the same number of forwards (needed when the forward is collective, as under FSDP2).
    on_finished: called on the host as rows finish, ``on_finished(rows, tokens)`` with the prompt indices and
        their new tokens (stop token included), each row exactly once: rows that stopped are reported at the
        stop checks (every token on the eager path, every `sync_every` tokens otherwise), the rest at the end.
        Lets a caller work on finished completions (GRPO scores them) while the others still decode.
    stop_strings: a row also stops once its text (``tokenizer.decode`` of its new tokens) contains one of these,
        checked with the stop tokens (every `sync_every` tokens off the eager path, so a row may run a few tokens
        past it); its tokens are returned as generated and ``finished`` is True: cut the text at the first stop
        string (moxin.eval.scoring.truncate_at), as lm-eval cuts its ``until``.
    rows_of: (first, total): `prompts` are rows first.. of a batch of `total` prompts that another process (or
        call) decodes the rest of, each from `generator` in the same state: every step draws the whole batch's
        sampling noise and uses these rows' (`sample_next`), so the rows get the tokens `generate` gives them in the
        whole batch (where the forward's numbers do not depend on the batch's size). GRPO's rollouts under tensor
        parallelism split a batch so."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (add the bos token)")
    if pad_side not in ("left", "right"):
        raise ValueError(f"pad_side must be 'left' or 'right', got {pad_side!r}")
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode must be one of {', '.join(DECODE_PATHS)}, got {decode!r}")
    checker = None
    if any(stop_strings):
        if tokenizer is None:
            raise ValueError("generate(stop_strings=...) needs the tokenizer that decodes the new tokens")
        checker = StopStrings(stop_strings, tokenizer.decode, len(prompts))
    device = next(model.parameters()).device
    if decode == "auto":
        decode = "graph" if device.type == "cuda" else "eager"
    if decode == "graph" and device.type != "cuda":
        raise ValueError(f"decode='graph' needs a CUDA model, this one is on {device.type}; use static, compiled "
                         "or eager")
    dtype = cache_dtype or next(model.parameters()).dtype
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    L = int(lens.max())
    tokens = torch.full((B, L), pad_id, dtype=torch.long, device=device)
    positions = torch.full((B, L), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        s = L - len(p) if pad_side == "left" else 0
        tokens[i, s:s + len(p)] = torch.tensor(p, device=device)
        positions[i, s:s + len(p)] = torch.arange(len(p), device=device)
    cache_len = L + max_new_tokens
    if decode == "compiled":
        cache_len = -(-cache_len // CACHE_ROUND) * CACHE_ROUND
    cache = RollingKVCache(model.cfg, B, cache_len, device=device, dtype=dtype)

    # prefill, chunk by chunk; keep each row's logits at its last prompt token
    chunk = prefill_chunk or L
    last_logits = torch.zeros(B, model.cfg.vocab_size, device=device)
    last_col = (L - 1) if pad_side == "left" else None
    for s in range(0, L, chunk):
        logits = model(tokens[:, s:s + chunk], positions[:, s:s + chunk], cache=cache)  # (B, c, V)
        cols = torch.arange(s, min(s + chunk, L), device=device)
        end_col = torch.full_like(lens, last_col) if last_col is not None else lens - 1
        hit = (end_col.unsqueeze(1) == cols.unsqueeze(0))  # (B, c)
        rows = hit.any(1)
        if rows.any():
            idx = hit.float().argmax(1)
            last_logits[rows] = logits[rows, idx[rows]].float()

    stops = torch.tensor(list(stop_tokens) or [-1], device=device)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lps = torch.zeros(B, max_new_tokens, device=device) if return_logprobs else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = torch.zeros(B, dtype=torch.long, device=device)
    logits = last_logits
    step = None
    if decode != "eager":
        graph = decode == "graph" or (decode == "compiled" and device.type == "cuda")
        step = _DecodeStep(model, cache, B, device, graph=graph, compile=decode == "compiled")
    check_every = 1 if step is None else max(1, sync_every)
    reported = torch.zeros(B, dtype=torch.bool, device=device)
    seen = 0
    for t in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator, rows_of)
        nxt = torch.where(done, pad_id, nxt)
        out[:, t] = nxt
        if lps is not None:
            scaled = logits.float() / (temperature if temperature > 0 else 1.0)
            lps[:, t] = scaled.log_softmax(-1).gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        n_new += (~done).long()
        is_stop = torch.isin(nxt, stops) & ~done
        stopped |= is_stop
        done |= is_stop
        check = (t + 1) % check_every == 0
        if checker is not None and (check or t == max_new_tokens - 1):
            seen = _stop_on_strings(checker, out, seen, t, done, stopped)
        if check and on_finished is not None:
            _report(on_finished, done & ~reported, reported, out, n_new)
        if t == max_new_tokens - 1 or (check and _all_done(done, lockstep)):
            break
        pos = torch.where(done, -1, lens + t).unsqueeze(1)  # finished rows feed padding
        if step is None:
            logits = model(nxt.unsqueeze(1), pos, cache=cache)[:, -1]
        else:
            logits = step(nxt.unsqueeze(1), pos)

    if on_finished is not None:
        _report(on_finished, ~reported, reported, out, n_new)
    counts = n_new.tolist()
    out_l = out.tolist()
    res = GenerationOutput(tokens=[row[:n] for row, n in zip(out_l, counts)], finished=stopped.tolist())
    if lps is not None:
        res.logprobs = [row[:n] for row, n in zip(lps.tolist(), counts)]
    return res


def _report(on_finished, rows_mask: torch.Tensor, reported: torch.Tensor, out: torch.Tensor, n_new: torch.Tensor):
    """Hand the rows of `rows_mask` (not reported before) to `on_finished` and mark them reported."""
    rows = rows_mask.nonzero().flatten()
    if rows.numel() == 0:
        return
    reported[rows] = True
    counts = n_new[rows].tolist()
    on_finished(rows.tolist(), [r[:n] for r, n in zip(out[rows].tolist(), counts)])


class _DecodeStep:
    """One single-token forward on the cache's static path, optionally compiled, optionally captured in a CUDA
    graph.

    The graph reads the token and position buffers and writes the logits buffer; the cache's k, v and pos
    tensors are updated in place by the replay. The first call runs eagerly (on a side stream, as capture
    requires: it is also that step's real computation), then the graph is captured; later calls copy their
    inputs into the static buffers and replay. The returned logits are overwritten by the next call.

    Compiled: `_compiled_step` (one `torch.compile` of the step function, shared by every call, so a new cache
    of a shape seen before reuses the compiled code) replaces the eager forward, inside the graph when there
    is one.
    """

    def __init__(self, model, cache: RollingKVCache, batch: int, device, graph: bool, compile: bool = False):
        self.model, self.cache = model, cache
        cache.static_decode = True
        if compile and flex_decode_applies(cache, model.cfg.head_dim, device):
            cache.decode_kernel = "flex"  # FlexAttention's decoding kernel, compiled with the step
        self.use_graph = graph
        self.graph = None
        self.compiled = compile
        if graph:
            self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.pos = torch.full((batch, 1), -1, dtype=torch.long, device=device)
            self.out = None

    def _forward(self, tok, pos):
        if self.compiled:
            try:
                return _compiled_step()(self.model, self.cache, tok, pos)
            except Exception as e:  # pragma: no cover - depends on the torch build and the model's ops
                warnings.warn(f"generate: torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                              "continuing uncompiled (decode='graph' on CUDA, 'static' elsewhere)")
                self.compiled = False
                self.cache.decode_kernel = "sdpa"  # uncompiled FlexAttention would materialise the scores
        return _step(self.model, self.cache, tok, pos)

    def __call__(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self._forward(tok, pos)
        self.tok.copy_(tok)
        self.pos.copy_(pos)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        # first step: run it for real on a side stream (warm-up), then capture the same computation
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self._forward(self.tok, self.pos).clone()
        torch.cuda.current_stream().wait_stream(side)
        try:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                self.out = self._forward(self.tok, self.pos)
            self.graph = g
        except Exception as e:  # pragma: no cover - depends on the model's kernels
            warnings.warn(f"generate: CUDA graph capture of the decode step failed ({type(e).__name__}: {e}); "
                          "continuing without the graph (decode='static')")
            self.use_graph, self.graph = False, None
            torch.cuda.synchronize()
        return logits


def _step(model, cache, tok, pos):
    return model(tok, pos, cache=cache)[:, -1]


_COMPILED = None


def _compiled_step():
    """`_step` compiled once per process (fixed shapes: each new model or cache shape compiles once more)."""
    global _COMPILED
    if _COMPILED is None:
        # emulate_precision_casts: fused kernels round where the eager code casts (RMSNorm's fp32 -> bf16), so
        # compiled tokens match the eager reference's instead of drifting by one bf16 rounding
        _COMPILED = torch.compile(_step, dynamic=False, fullgraph=True, options={"emulate_precision_casts": True})
    return _COMPILED
