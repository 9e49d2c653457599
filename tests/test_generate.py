"""Batched generation: greedy equals argmax over full forwards, sampling is seeded, filters, stop tokens,
padding sides, log-probabilities."""

import pytest
import torch

from moxin.model import generate, sample_next
from tests.conftest import tiny_model

W = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model(sliding_window=W)


def prompts_of(lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lens]


LENS = [3, 12, 7]


_GREEDY: dict = {}


def greedy_reference(model, prompt, n):
    """Greedy continuation by argmax over full forwards (no cache); memoised across parametrisations."""
    key = (id(model), tuple(prompt), n)
    if key in _GREEDY:
        return _GREEDY[key]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    _GREEDY[key] = seq[len(prompt):]
    return _GREEDY[key]


@pytest.mark.parametrize("side,chunk", [("left", None), ("right", None), ("left", 5)])
def test_greedy_equals_full_forward_argmax(model, side, chunk):
    ps = prompts_of(LENS)
    out = generate(model, ps, 20, temperature=0, pad_side=side, prefill_chunk=chunk)
    for p, got in zip(ps, out.tokens):
        assert got == greedy_reference(model, p, 20)
    assert out.finished == [False] * 3


def test_left_and_right_padding_agree(model):
    ps = prompts_of(LENS, seed=3)
    kw = dict(temperature=1.0, top_k=50)
    a = generate(model, ps, 15, pad_side="left", generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, ps, 15, pad_side="right", generator=torch.Generator().manual_seed(7), **kw)
    assert a.tokens == b.tokens


def test_seed_reproduces_sampling(model):
    ps = prompts_of(LENS)
    run = lambda s: generate(model, ps, 12, temperature=1.0, generator=torch.Generator().manual_seed(s)).tokens  # noqa: E731
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_1_and_tiny_top_p_are_greedy(model):
    ps = prompts_of(LENS)
    greedy = generate(model, ps, 10, temperature=0).tokens
    g = torch.Generator().manual_seed(0)
    assert generate(model, ps, 10, temperature=1.3, top_k=1, generator=g).tokens == greedy
    assert generate(model, ps, 10, temperature=1.3, top_p=1e-6, generator=g).tokens == greedy


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    k2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(k2.tolist()) == {1, 2}
    # top_p=0.8: p = softmax([0,3,2,1]) ~ [.03,.64,.24,.09]; keep tokens 1, 2 (0.64 < 0.8 before token 2)
    p8 = sample_next(logits, 1.0, top_p=0.8, generator=g)
    assert set(p8.tolist()) == {1, 2}
    assert sample_next(logits[:1], 0).tolist() == [1]


def test_stop_tokens_end_rows(model):
    ps = prompts_of(LENS)
    free = generate(model, ps, 12, temperature=0).tokens
    stop = free[1][4]  # row 1 produces it at step 4 (or earlier, if it appeared before)
    out = generate(model, ps, 12, temperature=0, stop_tokens=(stop,))
    for row, got, fin in zip(free, out.tokens, out.finished):
        if stop in row:
            i = row.index(stop)
            assert got == row[:i + 1] and fin
        else:
            assert got == row and not fin
    assert out.finished[1] and len(out.tokens[1]) <= 5


def test_all_rows_stop_early(model):
    ps = prompts_of([4])
    first = generate(model, ps, 1, temperature=0).tokens[0][0]
    out = generate(model, ps, 50, temperature=0, stop_tokens=(first,))
    assert out.tokens == [[first]] and out.finished == [True]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_match_recomputation(model, temperature):
    ps = prompts_of(LENS)
    out = generate(model, ps, 10, temperature=temperature, top_k=20, return_logprobs=True,
                   generator=torch.Generator().manual_seed(0))
    for p, toks, lps in zip(ps, out.tokens, out.logprobs):
        assert len(lps) == len(toks)
        with torch.no_grad():
            logits = model(torch.tensor([p + toks]))[0, len(p) - 1:-1]
        ref = (logits / (temperature or 1.0)).log_softmax(-1).gather(-1, torch.tensor(toks)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=1e-4)


def test_generate_refuses_empty_prompts_and_an_unknown_pad_side(model):
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match="pad_side"):
        generate(model, [[1]], 3, pad_side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_static_decode_equals_eager(model, side):
    """The sync-free fixed-shape decode path (the CUDA-graph path minus the graph) gives the same tokens,
    log-probs and stops as the eager reference, also after the rolling cache wrapped (window 8)."""
    ps = prompts_of(LENS, seed=5)
    kw = dict(temperature=1.0, top_k=50, stop_tokens=(17, 23), pad_side=side, return_logprobs=True)
    a = generate(model, ps, 25, decode="eager", generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, ps, 25, decode="static", sync_every=4, generator=torch.Generator().manual_seed(3), **kw)
    assert a.tokens == b.tokens and a.finished == b.finished
    for x, y in zip(a.logprobs, b.logprobs):
        assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    g = generate(model, ps, 20, temperature=0, decode="static")
    assert g.tokens == generate(model, ps, 20, temperature=0, decode="eager").tokens


@pytest.mark.parametrize("grad_mode", [True, False])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_generate_never_records_autograd_history(model, grad_mode, decode):
    """Rollouts must not build a graph (memory grows with every token): no forward inside `generate` may run
    with grad enabled, whatever the caller's grad mode."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args: seen.append(torch.is_grad_enabled()))
    try:
        with torch.set_grad_enabled(grad_mode):
            out = generate(model, prompts_of(LENS), 6, temperature=0, decode=decode, return_logprobs=True)
    finally:
        hook.remove()
    assert seen and not any(seen), f"{sum(seen)} of {len(seen)} forwards ran with grad enabled"
    assert all(len(t) == 6 for t in out.tokens)


def test_compiled_decode_equals_eager_and_compiles_once_per_cache_size():
    """decode="compiled" (torch.compile of the single-token step; on a CPU without the CUDA graph) gives the eager
    reference's tokens, stops and log-probs; prompt batches whose
    prompt + new tokens round to the same cache size (CACHE_ROUND slots) reuse one compiled step."""
    from torch._dynamo.utils import counters

    from moxin.model.generate import CACHE_ROUND

    model = tiny_model(sliding_window=None, n_layers=2)  # no window: the cache is sized by the rounding
    kw = dict(temperature=1.0, top_k=50, stop_tokens=(17, 23), return_logprobs=True)
    torch._dynamo.reset()
    counters.clear()
    for lens, side in (([3, 12, 7], "left"), ([5, 9, 2], "right")):  # 12 + 25 and 9 + 25 round to the same size
        assert -(-(max(lens) + 25) // CACHE_ROUND) == 1
        ps = prompts_of(lens, seed=5)
        a = generate(model, ps, 25, decode="eager", pad_side=side, generator=torch.Generator().manual_seed(3), **kw)
        b = generate(model, ps, 25, decode="compiled", sync_every=4, pad_side=side,
                     generator=torch.Generator().manual_seed(3), **kw)
        assert a.tokens == b.tokens and a.finished == b.finished
        for x, y in zip(a.logprobs, b.logprobs):
            assert torch.allclose(torch.tensor(x), torch.tensor(y), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # (the wrapping cache's compiled path: tests/test_gpu.py)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_on_finished_reports_every_row_once_as_it_stops(model, decode):
    """on_finished gets each row exactly once with the tokens generate returns; rows that stop are reported at the
    stop check that sees them (before generation ends), rows cut at max_new_tokens at the end."""
    forwards = [0]
    hook = model.register_forward_pre_hook(lambda m, a: forwards.__setitem__(0, forwards[0] + 1))
    seen = {}

    def on_finished(rows, toks):
        for r, t in zip(rows, toks):
            assert r not in seen
            seen[r] = (t, forwards[0])

    ps = prompts_of([3, 12, 7, 5, 9], seed=7)
    kw = dict(temperature=1.0, top_k=50, stop_tokens=(17, 23, 99, 101, 200, 301, 411), sync_every=4)
    try:
        ref = generate(model, ps, 40, decode=decode, generator=torch.Generator().manual_seed(1), **kw)
        forwards[0] = 0
        out = generate(model, ps, 40, decode=decode, generator=torch.Generator().manual_seed(1),
                       on_finished=on_finished, **kw)
    finally:
        hook.remove()
    assert out.tokens == ref.tokens and out.finished == ref.finished  # the callback changes nothing
    assert sorted(seen) == list(range(len(ps)))
    assert all(seen[r][0] == out.tokens[r] for r in seen)
    total = forwards[0]
    early = [r for r in seen if out.finished[r] and len(out.tokens[r]) + 4 < max(len(t) for t in out.tokens)]
    assert early, "the stop tokens were chosen so that some rows stop well before the others"
    assert all(seen[r][1] < total for r in early)  # handed over while other rows still decoded
