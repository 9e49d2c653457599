"""RollingKVCache: cached prefill + decode equals the full forward, across the window, chunking, wrapping and
padding; memory is W slots per layer."""

import pytest
import torch

from moxin.model import RollingKVCache
from moxin.presets import load_preset
from tests.conftest import tiny_model

W = 8


@pytest.fixture(scope="module")
def model():
    return tiny_model(sliding_window=W)


def cached_logits(model, x, prompt_len, chunk=None, max_len=None):
    """Prefill x[:, :prompt_len] in chunks, then feed the rest one token at a time; logits of every token."""
    B, T = x.shape
    cache = RollingKVCache(model.cfg, B, max_len)
    pos = torch.arange(T).expand(B, T)
    chunk = chunk or prompt_len
    outs = []
    with torch.no_grad():
        for s in range(0, prompt_len, chunk):
            e = min(s + chunk, prompt_len)
            outs.append(model(x[:, s:e], pos[:, s:e], cache=cache))
        for t in range(prompt_len, T):
            outs.append(model(x[:, t:t + 1], pos[:, t:t + 1], cache=cache))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("prompt_len", [1, 5, W, W + 1, 21])
def test_prefill_decode_equals_full_forward(model, prompt_len):
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(cached_logits(model, x, prompt_len), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, W, W + 3, 2 * W + 1])
def test_chunked_prefill(model, chunk):
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = model(x)
    torch.testing.assert_close(cached_logits(model, x, 33, chunk=chunk), full, atol=1e-5, rtol=1e-5)


def test_decode_long_after_wrap(model):
    x = torch.randint(0, 512, (1, 50))
    with torch.no_grad():
        full = model(x)
    got = cached_logits(model, x, 3)  # 47 decode steps: the 8-slot buffer wraps ~6 times
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_capacity_and_slot_positions(model):
    cache = RollingKVCache(model.cfg, 1)
    assert cache.capacity == W
    x = torch.randint(0, 512, (1, 13))
    with torch.no_grad():
        model(x, torch.arange(13).unsqueeze(0), cache=cache)
    # slot = position mod W, holding the last W positions 5..12
    assert cache.pos[0].tolist() == [8, 9, 10, 11, 12, 5, 6, 7]
    small = RollingKVCache(model.cfg, 1, max_len=5)
    assert small.capacity == 5  # a generation shorter than W allocates only what it needs


def test_full_attention_cache(model):
    full_model = tiny_model(sliding_window=None)
    x = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        ref = full_model(x)
    torch.testing.assert_close(cached_logits(full_model, x, 11, chunk=4, max_len=30), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_len"):
        RollingKVCache(full_model.cfg, 1)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_single_rows(model, side):
    lens = [3, 13, 9]
    L = max(lens)
    n_dec = 14  # decoding wraps the buffer for every row
    seqs = [torch.randint(0, 512, (n + n_dec,)) for n in lens]
    B = len(lens)
    tok = torch.zeros(B, L, dtype=torch.long)
    pos = torch.full((B, L), -1)
    for i, (s, n) in enumerate(zip(seqs, lens)):
        o = L - n if side == "left" else 0
        tok[i, o:o + n] = s[:n]
        pos[i, o:o + n] = torch.arange(n)
    cache = RollingKVCache(model.cfg, B)
    with torch.no_grad():
        pre = model(tok, pos, cache=cache)
        dec = []
        for t in range(n_dec):
            nt = torch.stack([s[n + t] for s, n in zip(seqs, lens)]).unsqueeze(1)
            npos = torch.tensor([n + t for n in lens]).unsqueeze(1)
            dec.append(model(nt, npos, cache=cache))
        dec = torch.cat(dec, 1)
        for i, (s, n) in enumerate(zip(seqs, lens)):
            alone = model(s.unsqueeze(0))[0]
            o = L - n if side == "left" else 0
            torch.testing.assert_close(pre[i, o:o + n], alone[:n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dec[i], alone[n:], atol=1e-5, rtol=1e-5)


def test_cache_memory_is_one_eighth_at_8x_window():
    cfg = load_preset("tiny", sliding_window=W)
    rolling = RollingKVCache(cfg, 2)
    full = RollingKVCache(cfg.replace(sliding_window=None), 2, max_len=8 * W)
    assert full.nbytes() == 8 * rolling.nbytes()
    assert len(rolling.k) == cfg.n_layers and rolling.k[0].shape[2] == W and full.k[0].shape[2] == 8 * W


def test_moxin_7b_cache_figures():
    """Computed, not allocated: bf16 K+V for one 32K sequence, full vs rolling (W=4096)."""
    cfg = load_preset("moxin-7b")
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2  # K and V, bf16
    assert per_token == cfg.kv_cache_bytes_per_token() == 144 * 1024
    full = per_token * cfg.max_seq_len
    rolling = per_token * cfg.sliding_window
    assert full == 4.5 * 2**30 and rolling == 0.5625 * 2**30 and full == 8 * rolling


def test_cache_rejects_bad_use(model):
    cache = RollingKVCache(model.cfg, 2, max_len=10)
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3).unsqueeze(0), cache=cache)
    with pytest.raises(ValueError, match="max_len=10"):
        model(torch.zeros(2, 1, dtype=torch.long), torch.full((2, 1), 10), cache=cache)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(2, 3, dtype=torch.long), cache=cache)


def test_flex_decode_attention_equals_sdpa():
    """The compiled decode's FlexAttention form recomputes visibility inside the kernel from the step's positions
    and the slots' previous positions; run here in its eager form through the static single-token path, it gives
    the SDPA path's logits step after step: left padding, a row that finishes (position -1 from then on), the
    rolling cache wrapping (window 8), 4 query heads a key head. Where it applies: CUDA, heads of 32 or more,
    slots a multiple of FlexAttention's block."""
    from moxin.model import cache as C

    if not C.HAS_FLEX:
        pytest.skip("no FlexAttention in this torch")
    model = tiny_model(head_dim=32, n_heads=8, n_kv_heads=2, sliding_window=W)
    B, P = 3, 6
    toks = torch.randint(3, 512, (B, P))
    pos = torch.arange(P).expand(B, P).clone()
    pos[1, :2] = -1  # left padding
    pos[1, 2:] -= 2
    caches = [RollingKVCache(model.cfg, B, 40) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(toks, pos, cache=c)
            c.static_decode = True
        caches[1].decode_kernel = "flex"
        nxt = pos.max(1).values + 1
        for t in range(20):
            step_pos = nxt.clone().unsqueeze(1)
            if t >= 5:
                step_pos[2] = -1  # row 2 finished
            tok = torch.randint(3, 512, (B, 1))
            ref, got = (model(tok, step_pos, cache=c)[:, -1] for c in caches)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            nxt += 1
    assert torch.equal(caches[0].pos, caches[1].pos)
    cfg = load_preset("tiny", head_dim=32, sliding_window=1024)  # 256 slots: the generation fits
    assert C.flex_decode_applies(RollingKVCache(cfg, 2, 256), 32, "cuda")
    assert not C.flex_decode_applies(RollingKVCache(cfg, 2, 256), 32, "cpu")
    assert not C.flex_decode_applies(RollingKVCache(cfg, 2, 200), 32, "cuda")  # 200 slots: no whole blocks
    assert not C.flex_decode_applies(RollingKVCache(cfg, 2, 256), 16, "cuda")
