"""Generation tasks scored by a verifier: pass@1 from greedy decoding, pass@k from sampled completions.

Completions come from moxin's rollout engine (:func:`moxin.model.generate.generate`, the one GRPO trains with),
so a prompt is decoded exactly as in RL. Verifiers are :mod:`moxin.rewards` (math-verify equality, exact
``Answer: N``), run in worker processes with a per-item timeout (:func:`moxin.rewards.score_batch`).

pass@k is the unbiased estimator of Chen et al. 2021 (arXiv 2107.03374): with n samples of which c are correct,
``1 - C(n - c, k) / C(n, k)``, averaged over problems; k = 1 is the sampled accuracy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moxin.distributed import all_reduce_values
from moxin.model.generate import generate
from moxin.rewards import get_verifier, score_batch
from moxin.tensor_parallel import row_share

__all__ = ["GenRecord", "generate_all", "score_generations", "score_texts"]


@dataclass
class GenRecord:
    tokens: list[int]
    finished: bool


@torch.no_grad()
def generate_all(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
                 stop_tokens: tuple[int, ...], pad_id: int, batch_size: int = 64,
                 generator: torch.Generator | None = None, lockstep: bool = False,
                 stop_strings: tuple[str, ...] = (), tokenizer=None, by_length: bool = False,
                 generator_of: Callable[[int], torch.Generator] | None = None,
                 split: tuple[int, int] | None = None) -> list[GenRecord | None]:
    """Completions of every prompt in batches of ``batch_size``, left-padded; a row ends at a stop token or once its
    text holds one of ``stop_strings`` (decoded with ``tokenizer``: lm-eval's ``until``).

    generator_of: batch b samples from ``generator_of(b)`` instead of ``generator`` (each batch its own, so its
    draws do not depend on how many steps an earlier batch ran for: what `split` needs to sample as one process).
    split (rank, size): a tensor-parallel group's `size` ranks split every batch as GRPO's rollouts do
    (`moxin.tensor_parallel.row_share`, `generate`'s rows_of); this rank decodes its share and the other rows'
    records are None (`moxin.tensor_parallel.gather_rows` gives the group all of them). Not with lockstep.

    by_length: batch the prompts longest first (results still in prompt order), so a batch pads less, as lm-eval's
    Collator orders its requests; sampled completions then draw their random numbers in that order.
    lockstep (FSDP2): every rank makes the same number of ``generate`` calls (a rank out of prompts decodes a
    one-token dummy prompt) and the calls decode eagerly in lockstep, because every forward is collective."""
    if split is not None and lockstep:
        raise ValueError("generate_all: split (a tensor group's share of each batch) cannot decode in lockstep, "
                         "where the group's forwards are collective and every rank feeds the same rows")
    if split is not None and temperature > 0 and generator_of is None:
        raise ValueError("generate_all: a sampled split needs generator_of (one generator a batch): with one "
                         "generator a share that stops early would shift the next batch's draws")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i])) if by_length else list(range(len(prompts)))
    n_calls = -(-len(prompts) // batch_size) if prompts else 0
    if lockstep:
        n_calls = int(all_reduce_values([n_calls], device, "max")[0])
    out: list[GenRecord | None] = [None] * len(prompts)
    for b in range(n_calls):
        idx = order[b * batch_size:(b + 1) * batch_size]
        rows_of = None
        if split is not None:
            first, end = row_share(len(idx), *split)
            if first == end:
                continue
            idx, rows_of = idx[first:end], (first, len(idx))
        chunk = [prompts[i] for i in idx]
        res = generate(model, chunk or [[stop_tokens[0] if stop_tokens else pad_id]], max_new_tokens,
                       temperature=temperature, top_p=top_p, stop_tokens=stop_tokens, pad_side="left",
                       generator=generator if generator_of is None else generator_of(b), pad_id=pad_id,
                       lockstep=lockstep, decode="eager" if lockstep else "auto", stop_strings=stop_strings,
                       tokenizer=tokenizer, rows_of=rows_of)
        for i, t, f in zip(idx, res.tokens, res.finished):
            out[i] = GenRecord(t, f)
    model.train(was_training)
    return out


def score_generations(tokenizer, gens: list[GenRecord], answers: list[str], verifier: str,
                      verifier_kwargs: dict | None = None, timeout_s: float = 10.0,
                      max_workers: int | None = None) -> tuple[list[str], list]:
    """(decoded completions, RewardResults) of generations against their reference answers."""
    texts = [tokenizer.decode(g.tokens) for g in gens]
    return texts, score_texts(texts, answers, verifier, verifier_kwargs, timeout_s, max_workers)


def score_texts(texts: list[str], answers: list[str], verifier: str, verifier_kwargs: dict | None = None,
                timeout_s: float = 10.0, max_workers: int | None = None) -> list:
    """RewardResults of completion texts against their reference answers (worker processes, a deadline each)."""
    results, _ = score_batch(get_verifier(verifier, **(verifier_kwargs or {})), texts, answers,
                             timeout_s=timeout_s, max_workers=max_workers)
    return results
