"""Masks and attention backends: the dense mask against a brute-force loop, document masking against running
each document alone, FlexAttention (CPU when available) and, on CUDA, flex / flash against the SDPA reference."""

import functools
import warnings

import pytest
import torch

from moxin.model import attention, masks
from tests.helpers.host_reads import HostReads


def brute_mask(positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """(B, 1, T, T) from the definition: same document (a 0 position starts one), causal, 0 <= q - k < W."""
    B, T = positions.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        doc, docs = -1, []
        for t in range(T):
            doc += int(positions[b, t] == 0)
            docs.append(doc)
        for q in range(T):
            for k in range(T):
                out[b, 0, q, k] = docs[q] == docs[k] and k <= q and (window is None or q - k < window)
    return out


def packed_positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


POS = packed_positions([[5, 9, 2, 8], [24]])  # (2, 24): several documents, one long one


@pytest.mark.parametrize("window", [None, 1, 3, 6, 24])
def test_dense_mask_matches_brute_force(window):
    doc = masks.doc_ids_from_positions(POS)
    got = masks.dense_mask(masks.training_mask(window, doc), 2, 24, 24, "cpu")
    assert torch.equal(got, brute_mask(POS, window))
    assert got[..., 0, 0].all()  # every query sees at least itself


def test_and_masks_composes():
    q, k = torch.arange(10).view(10, 1), torch.arange(10).view(1, 10)
    w = masks.sliding_window(4)(0, 0, q, k)
    c = masks.causal(0, 0, q, k)
    assert torch.equal(masks.and_masks(masks.causal, masks.sliding_window(4))(0, 0, q, k), c & w)
    assert int((c & w).sum(-1).max()) == 4  # at most W keys, itself included


def rand_qkv(B=2, H=4, KVH=2, T=24, D=16, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(B, n, T, D, generator=g, device=device, dtype=dtype).requires_grad_(requires_grad)
            for n in (H, KVH, KVH)]


@pytest.mark.parametrize("window", [None, 4])
def test_sdpa_documents_equal_separate_runs(window):
    q, k, v = rand_qkv()
    doc = masks.doc_ids_from_positions(POS)
    out = attention.attend(q, k, v, window=window, doc_ids=doc, backend="sdpa")
    for b in range(2):
        starts = (POS[b] == 0).nonzero().flatten().tolist() + [24]
        for s, e in zip(starts[:-1], starts[1:]):
            alone = attention.attend(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e], window=window,
                                     doc_ids=None, backend="sdpa")
            torch.testing.assert_close(out[b:b + 1, :, s:e], alone, atol=1e-6, rtol=1e-5)


def test_sdpa_window_equals_explicit_loop():
    q, k, v = rand_qkv(B=1, H=2, KVH=2, T=12)
    out = attention.attend(q, k, v, window=3, doc_ids=None, backend="sdpa")
    scale = q.shape[-1] ** -0.5
    for t in range(12):
        lo = max(0, t - 2)
        w = (q[:, :, t:t + 1] @ k[:, :, lo:t + 1].transpose(-1, -2) * scale).softmax(-1)
        torch.testing.assert_close(out[:, :, t:t + 1], w @ v[:, :, lo:t + 1], atol=1e-6, rtol=1e-5)


def test_backend_resolution():
    assert attention.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    with pytest.raises(RuntimeError, match="CUDA"):
        attention.resolve_backend("flex", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.attend(*rand_qkv(), window=None, doc_ids=None, backend="nope")


# ---- FlexAttention on CPU ----------------------------------------------------------------------------------------
# FlexAttention exists from torch 2.5 and compiles for CPUs from 2.6; moxin needs torch 2.11+, so these tests skip
# only on a torch older than that (an error inside flex is a failure, not a skip).
FLEX_CPU = attention.HAS_FLEX and torch.torch_version.TorchVersion(torch.__version__) >= (2, 6)
flex_cpu = pytest.mark.skipif(not FLEX_CPU, reason=f"torch {torch.__version__} has no FlexAttention for CPUs (2.6+)")


@flex_cpu
@pytest.mark.parametrize("window", [None, 5])
def test_flex_eager_cpu_matches_sdpa(window):
    """FlexAttention (eager, CPU) driven by the same mask functions agrees with the SDPA reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T = POS.shape
    doc = masks.doc_ids_from_positions(POS)
    q, k, v = rand_qkv(T=T)  # forward only: FlexAttention has no backward on CPU
    bm = create_block_mask(masks.training_mask(window, doc), B, None, T, T, device="cpu", BLOCK_SIZE=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    ref = attention.sdpa_reference(q, k, v, window, doc)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@flex_cpu
@pytest.mark.parametrize("window", [None, 5])
def test_flex_block_mask_is_the_training_mask(window):
    """The block mask the flex backend builds (per batch with documents, cached per shape without) allows exactly
    what the definition allows: the window, the documents and causality, on the unpadded part."""
    B, T = POS.shape
    Tp = T + (-T) % attention.FLEX_BLOCK
    one_doc = torch.arange(T).expand(B, T)
    for positions, doc in ((POS, masks.doc_ids_from_positions(POS)), (one_doc, None)):
        bm = attention.flex_block_mask(window, doc, B, T, "cpu")
        assert bm.shape[-2:] == (Tp, Tp)
        got = masks.dense_mask(bm.mask_mod, B, Tp, Tp, "cpu")[..., :T, :T]
        assert torch.equal(got, brute_mask(positions, window)), (window, doc is not None)


@flex_cpu
def test_flex_compiled_cpu_matches_sdpa():
    """The flex backend itself (padding to whole blocks, compiled FlexAttention, the backend's block masks) against
    the SDPA reference, with and without documents, at a window that bites (5 < T)."""
    doc = masks.doc_ids_from_positions(POS)
    q, k, v = rand_qkv()
    B, H, T, D = q.shape
    for d in (doc, None):
        bm = attention.flex_block_mask(5, d, B, T, "cpu")
        torch.testing.assert_close(attention.flex(q, k, v, bm), attention.sdpa_reference(q, k, v, 5, d),
                                   atol=1e-5, rtol=1e-5)


def test_mask_hands_plain_causal_to_sdpa():
    """Window covering the row and one document per row: backend flex takes SDPA's dense causal kernel (no flex
    compile, no padding); a biting window or a second document still goes to flex (dense for small heads)."""
    build = attention.AttentionMask.build
    one_doc = torch.ones(2, 40, dtype=torch.long)
    for window in (None, 40, 4096):
        for doc in (None, one_doc):
            assert build("flex", window, doc, 2, 40, 32, "cpu").kernel == "causal"
            assert build("sdpa", window, doc, 2, 40, 32, "cpu").kernel == "causal"
    two_docs = masks.doc_ids_from_positions(torch.cat([torch.arange(10), torch.arange(30)]).expand(2, 40))
    assert build("sdpa", 8, None, 2, 40, 32, "cpu").kernel == "dense"
    assert build("sdpa", None, two_docs, 2, 40, 32, "cpu").kernel == "dense"
    assert build("flex", None, two_docs, 2, 40, 16, "cpu").kernel == "dense"  # head too small for flex
    q, k, v = rand_qkv(B=2, H=4, KVH=2, T=40, D=32)
    for window, doc in ((None, None), (40, one_doc), (8, None), (None, two_docs), (8, two_docs)):
        torch.testing.assert_close(attention.attend(q, k, v, window=window, doc_ids=doc, backend="sdpa"),
                                   attention.sdpa_reference(q, k, v, window if window != 40 else None,
                                                            None if doc is one_doc else doc))



# ---- FlashAttention dispatch and glue on the CPU (the kernels themselves: GPU tests below) ---------------------------
def _fake_flash4(calls):
    """FlashAttention-4's two entry points computed by the SDPA reference, with FlashAttention's layouts and
    window convention, (B, T, H, D) batched and (N, H, D) varlen, returning (out, lse) as some releases do."""

    def window_of(window_size):
        return None if window_size[0] is None else window_size[0] + 1

    def dense(q, k, v, *, causal, window_size):
        assert causal and q.dim() == 4
        calls.append("dense")
        ref = attention.sdpa_reference(*(t.transpose(1, 2) for t in (q, k, v)), window_of(window_size), None)
        return ref.transpose(1, 2), None

    def varlen(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size):
        assert causal and q.dim() == 3 and torch.equal(cu_seqlens_q, cu_seqlens_k) and max_seqlen_q == max_seqlen_k
        calls.append("varlen")
        cu = cu_seqlens_q.tolist()
        assert max(b - a for a, b in zip(cu, cu[1:])) == max_seqlen_q
        outs = [attention.sdpa_reference(*(t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v)),
                                         window_of(window_size), None)[0].transpose(0, 1)
                for a, b in zip(cu, cu[1:])]
        return torch.cat(outs), None

    return dense, varlen


def test_flash4_glue_matches_reference(monkeypatch):
    """The `flash` backend with FlashAttention-4 (faked by the reference): batched kernel for one document a row,
    varlen over the documents otherwise, same numbers as the reference; `auto` picks it on such a GPU; SDPA's
    causal kernel where nothing is masked; an fp32 forward falls back to flex / the dense reference."""
    calls = []
    monkeypatch.setattr(attention, "_flash4", lambda: _fake_flash4(calls))
    monkeypatch.setattr(attention, "flash_version", lambda device: 4)
    assert attention.resolve_backend("auto", torch.device("cuda")) == "flash"
    assert attention.resolve_backend("auto", torch.device("cpu")) == "sdpa"
    pos = packed_positions([[10, 7, 23], [40]])
    two_docs = masks.doc_ids_from_positions(pos)
    build = attention.AttentionMask.build
    assert build("flash", None, None, 2, 40, 16, "cpu").kernel == "causal"
    q, k, v = rand_qkv(B=2, H=4, KVH=2, T=40, D=16, dtype=torch.bfloat16)
    for window, doc, path in ((8, None, "dense"), (None, two_docs, "varlen"), (8, two_docs, "varlen")):
        calls.clear()
        m = build("flash", window, doc, 2, 40, 16, "cpu")
        assert m.kernel == "flash" and (m.cu_seqlens is None) == (doc is None)
        out = m.apply(q, k, v)
        assert calls == [path]
        assert out.shape == q.shape
        # bf16: per-document runs round differently from one batched run; a layout slip would be off by O(1)
        torch.testing.assert_close(out, attention.sdpa_reference(q, k, v, window, doc), atol=1e-2, rtol=1e-2)
        calls.clear()
        q32, k32, v32 = (t.float() for t in (q, k, v))
        torch.testing.assert_close(m.apply(q32, k32, v32), attention.sdpa_reference(q32, k32, v32, window, doc))
        assert calls == [] and m.fallback is not None  # fp32: no FlashAttention call


def test_flash_without_a_usable_kernel_says_so(monkeypatch):
    monkeypatch.setattr(attention, "flash_version", lambda device: None)
    with pytest.raises(RuntimeError, match="Hopper"):
        attention.AttentionMask.build("flash", 8, None, 1, 40, 16, "cpu")
    monkeypatch.setattr(attention, "HAS_FLASH", False)
    with pytest.raises(RuntimeError, match="flash-attn-4"):
        attention.resolve_backend("flash", torch.device("cuda"))

def test_model_builds_one_mask_per_forward(monkeypatch):
    """The mask is built once per forward and shared by every layer, not rebuilt per layer."""
    from moxin.config import ModelConfig
    from moxin.model import Transformer

    built = []
    real = attention.AttentionMask.build.__func__
    monkeypatch.setattr(attention.AttentionMask, "build",
                        classmethod(lambda cls, *a, **kw: built.append(a) or real(cls, *a, **kw)))
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=6, max_seq_len=64)
    model = Transformer(cfg)
    pos = torch.cat([torch.arange(7), torch.arange(9)]).unsqueeze(0)
    model(torch.randint(0, 64, (1, 16)), pos)
    assert len(built) == 1


def _random_packed_positions(g, B, T, max_docs):
    rows = []
    for _ in range(B):
        n = int(torch.randint(1, max_docs + 1, (), generator=g))
        cuts = sorted(torch.randperm(T - 1, generator=g)[:n - 1].add(1).tolist())
        rows.append([b - a for a, b in zip([0] + cuts, cuts + [T])])
    return packed_positions(rows)


def test_doc_bounds_from_the_host_equal_what_the_forward_reads_from_the_device(monkeypatch):
    """`DocBounds.from_positions` gives the kernel choice, sequence bounds and longest document that the mask
    build otherwise reads from the device, on random packings (one document per row, several, a mix), and the
    build that takes them reads no tensor value at all (on a GPU: no device sync)."""
    version = {"v": 4}
    monkeypatch.setattr(attention, "flash_version", lambda device: version["v"])
    build = attention.AttentionMask.build
    g = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(40):
        B, T = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(8, 64, (), generator=g))
        pos = _random_packed_positions(g, B, T, max_docs=[1, 2, 5][trial % 3])
        doc_ids = masks.doc_ids_from_positions(pos)
        bounds = attention.DocBounds.from_positions(pos)
        single = bool((doc_ids[:, -1] == doc_ids[:, 0]).all())
        seen.add(single)
        assert bounds.one_doc_per_row == single and (bounds.batch, bounds.seq_len) == (B, T)
        if not single:
            cu, max_len = attention.flash_seqlens(doc_ids, B, T, "cpu")
            assert torch.equal(bounds.cu_seqlens, cu) and bounds.max_len == max_len
        for backend, version["v"] in (("sdpa", 4), ("flash", 4), ("flash", 2)):  # 2: flash-attn 2, varlen always
            for window in (None, 4, 1000):
                plain = build(backend, window, doc_ids, B, T, 16, "cpu")
                with HostReads() as mode:
                    fast = build(backend, window, doc_ids, B, T, 16, "cpu", bounds=bounds)
                assert mode.reads == [], (backend, window, mode.reads)
                assert fast.kernel == plain.kernel and fast.window == plain.window
                assert (fast.doc_ids is None) == (plain.doc_ids is None) and fast.max_len == plain.max_len
                if plain.cu_seqlens is not None:
                    assert torch.equal(fast.cu_seqlens, plain.cu_seqlens)
                if backend == "sdpa" and plain.dense is not None:
                    assert torch.equal(fast.dense, plain.dense)
    assert seen == {True, False}
    cu, max_len = attention.flash_seqlens(None, 3, 5, "cpu")  # one document a row: no read either
    assert cu.tolist() == [0, 5, 10, 15] and cu.dtype == torch.int32 and max_len == 5
    with HostReads() as mode:  # the test would see the reads that bounds avoid
        build("flash", 4, doc_ids, B, T, 16, "cpu")
    assert mode.reads


def test_doc_bounds_of_other_rows_are_refused_and_a_forward_with_them_is_unchanged():
    from moxin.config import ModelConfig
    from moxin.model import RollingKVCache, Transformer

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=6, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 64, (2, 16))
    for pos in (packed_positions([[7, 9], [16]]), packed_positions([[16], [16]])):
        bounds = attention.DocBounds.from_positions(pos)
        with HostReads() as mode:
            out = model(tokens, pos, doc_bounds=bounds, return_hidden=True)
        assert mode.reads == []
        assert torch.equal(out, model(tokens, pos, return_hidden=True))
    with pytest.raises(ValueError, match=r"\(1, 16\) but the forward has \(2, 16\)"):
        model(tokens, pos, doc_bounds=attention.DocBounds.from_positions(pos[:1]))
    with pytest.raises(ValueError, match="not with a generation cache"):
        model(tokens, pos, doc_bounds=bounds, cache=RollingKVCache(cfg, 2, 16))
    with pytest.raises(ValueError, match="with those rows' positions"):
        model(tokens, doc_bounds=bounds)


class _KernelLike(torch.autograd.Function):
    """A FlashAttention-4 entry point computed by the reference, with the kernel's autograd contract: it takes
    its own layout and its backward returns contiguous gradients (autograd through transposes would not)."""

    @staticmethod
    def forward(ctx, fn, q, k, v):
        ctx.fn = fn
        ctx.save_for_backward(q, k, v)
        with torch.no_grad():
            return fn(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.enable_grad():
            qkv = [t.detach().requires_grad_() for t in ctx.saved_tensors]
            grads = torch.autograd.grad(ctx.fn(*qkv), qkv, grad_out)
        return (None, *(g.contiguous() for g in grads))


def _kernel_like_flash4(seen):
    fake_dense, fake_varlen = _fake_flash4([])

    def dense(q, k, v, **kw):
        seen.append([t.is_contiguous() for t in (q, k, v)])
        return _KernelLike.apply(lambda *t: fake_dense(*t, **kw)[0], q, k, v)

    def varlen(q, k, v, **kw):
        seen.append([t.is_contiguous() for t in (q, k, v)])
        return _KernelLike.apply(lambda *t: fake_varlen(*t, **kw)[0], q, k, v)

    return dense, varlen


@pytest.mark.parametrize("docs", [True, False])
def test_compiled_block_hands_flashattention_its_layout_and_takes_its_gradients_without_copies(docs, monkeypatch):
    """The compiled block computes q, k, v in FlashAttention's (B, T, heads, hd) layout, contiguous, so neither
    they nor the contiguous gradients its backward returns are copied: AOT autograd makes an incoming gradient
    contiguous (or the strides of the output) before the block's backward, and (B, heads, T, hd) views were
    copied there, three a block (1.4 ms of a 185 ms Moxin-7B x 8 step on an H200). Outputs and gradients are
    as close to the fp32 result as the bf16 reference kernel's (packed documents or one a row, a window)."""
    import torch._dynamo  # noqa: F401  (runtime_wrappers imports it first)
    from torch._functorch import config as functorch_config
    from torch._functorch._aot_autograd import runtime_wrappers as rw

    from moxin.config import ModelConfig
    from moxin.model import Transformer, transformer

    seen, coerced = [], []
    monkeypatch.setattr(attention, "_flash4", lambda: _kernel_like_flash4(seen))
    monkeypatch.setattr(attention, "flash_version", lambda device: 4)
    monkeypatch.setattr(transformer, "resolve_backend", lambda backend, device: backend)  # flash on the CPU
    real = rw.coerce_to_expected_memory_format
    monkeypatch.setattr(rw, "coerce_to_expected_memory_format", functools.partial(_spy, real, coerced))
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128,
                      sliding_window=8, max_seq_len=64, attn_backend="flash")
    pos = packed_positions([[6, 10], [16]]) if docs else torch.arange(16).expand(2, 16)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    grads = {}
    for name, backend, dtype in (("exact", "sdpa", torch.float32), ("reference", "sdpa", torch.bfloat16),
                                 ("flash", "flash", torch.bfloat16)):
        torch.manual_seed(0)
        model = Transformer(cfg.replace(attn_backend=backend)).to(torch.bfloat16).to(dtype)  # the same bf16 weights
        if backend == "flash":
            for block in model.layers:
                block.compile(backend="aot_eager")
        for guess in (False, True):  # the incoming gradient's expected layout: contiguous, or the output's strides
            torch._dynamo.reset()
            model.zero_grad()
            coerced.clear()
            with functorch_config.patch(guess_tangent_strides_as_outputs=guess):
                h = model(tokens, pos, return_hidden=True)
                h.float().square().sum().backward()
            grads[name, guess] = [h.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]
            if backend == "flash":
                assert coerced == [], (guess, coerced)
    assert seen and all(all(c) for c in seen)  # q, k, v reached the kernel contiguous: no copy on the way in
    for guess in (False, True):
        got, ref, exact = grads["flash", guess], grads["reference", guess], grads["exact", guess]
        assert len(got) == len(ref) == len(exact) == len(list(model.parameters()))  # hidden states; no output grad
        # bf16: per-document kernels round differently from the dense reference, so each is held to the fp32 result
        # of the same weights: the flash path's error at most 1.25x the bf16 reference's (plus a little; seen: 1.04x)
        for a, b, x in zip(got, ref, exact):
            err, ref_err = (a.float() - x).norm(), (b.float() - x).norm()
            assert err <= 1.25 * ref_err + 1e-3 * x.norm(), (err / x.norm(), ref_err / x.norm())


def _spy(real, coerced, x, fmt):
    y = real(x, fmt)
    if y is not x:
        coerced.append(tuple(x.stride()))
    return y


# ---- CUDA kernels against the reference (bf16) ---------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check_backend_bf16(backend: str, window: int | None, with_docs: bool):
    B, H, KVH, T, D = 2, 8, 2, 512, 64
    pos = packed_positions([[100, 37, 300, 75], [512]]).cuda()
    doc = masks.doc_ids_from_positions(pos) if with_docs else None
    q, k, v = rand_qkv(B, H, KVH, T, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    # reference in fp32 from the same bf16 inputs; the kernel must be about as close as bf16 SDPA itself
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention.sdpa_reference(q32, k32, v32, window, doc)
    ref16 = attention.sdpa_reference(q, k, v, window, doc)
    out = attention.attend(q, k, v, window=window, doc_ids=doc, backend=backend)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g.bfloat16())
    grads16 = torch.autograd.grad(ref16, (q, k, v), g.bfloat16())
    grads32 = torch.autograd.grad(ref, (q32, k32, v32), g)
    err = lambda a, b: (a.float() - b.float()).abs().max().item()  # noqa: E731
    assert err(out, ref) <= 2 * err(ref16, ref) + 1e-2, (err(out, ref), err(ref16, ref))
    for a, b16, b32, name in zip(grads, grads16, grads32, "qkv"):
        assert err(a, b32) <= 2 * err(b16, b32) + 2e-2, (name, err(a, b32), err(b16, b32))
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("window,with_docs", [(None, True), (128, False), (128, True)])
def test_flex_cuda_matches_reference(window, with_docs):
    _check_backend_bf16("flex", window, with_docs)


@pytest.mark.gpu
@cuda
@pytest.mark.skipif(not attention.HAS_FLASH, reason="flash-attn not installed")
@pytest.mark.parametrize("window,with_docs", [(None, True), (128, False), (128, True)])
def test_flash_cuda_matches_reference(window, with_docs):
    _check_backend_bf16("flash", window, with_docs)


# ---- a compiled block on the flex path: one graph ----------------------------------------------------------------
def _flex_block_inputs(device="cpu", B=2, T=40, docs=((10, 30), (25, 15))):
    """A Block of FlexAttention's head size (>= FLEX_MIN_HEAD_DIM) and its inputs over rows with documents."""
    from moxin.config import ModelConfig
    from moxin.model.transformer import Block, rope_cos_sin

    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=attention.FLEX_MIN_HEAD_DIM,
                      hidden_dim=128, sliding_window=None, max_seq_len=T)
    torch.manual_seed(0)
    block = Block(cfg).to(device)
    pos = packed_positions([list(r) for r in docs[:B]]).to(device)
    mask = attention.AttentionMask.build("flex", None, masks.doc_ids_from_positions(pos), B, T, cfg.head_dim, device)
    assert mask.kernel == "flex"
    x = torch.randn(B, T, cfg.dim, device=device)
    cos, sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, x.dtype)
    return block, (x, cos, sin, mask)


@flex_cpu
def test_compiled_block_on_the_flex_path_is_one_graph(monkeypatch):
    """A compiled block on the flex path (documents in the rows) is one graph with no break, FlexAttention traced
    into it. It called the separately compiled wrapper that eager forwards call, and with Lightning imported (every
    run) `torch.compile` is Lightning's wrapper, which Dynamo cannot trace: a break before and after attention in
    every block, forward and backward. The graph gives the reference's output and
    gradients (the block with the dense SDPA mask). On CPUs torch refuses FlexAttention's backward up front
    (`_validate_device`); the traced graph's backward is FlexAttention's own math, so the check is lifted here to
    test the gradients of the graph (Inductor's kernels: the GPU test below)."""
    import lightning  # noqa: F401  (every run imports it: it wraps torch.compile, which Dynamo cannot trace)
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *tensors: None)
    block, (x, cos, sin, mask) = _flex_block_inputs()
    x.requires_grad_(True)
    # sizes as GRPO's varying rows give them (dynamic): calling the compiled wrapper there was the break
    attention.mark_varying(x, 0, 1), attention.mark_varying(cos, 0, 2), attention.mark_varying(sin, 0, 2)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(x, cos, sin, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)  # fullgraph: a break would raise
    out = compiled(x, cos, sin, mask)
    dense = attention.AttentionMask.build("sdpa", None, mask.doc_ids, *x.shape[:2], 32, "cpu")  # the reference
    ref = block(x, cos, sin, dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    wrt = [x, *block.parameters()]
    for a, b in zip(torch.autograd.grad(out, wrt, g), torch.autograd.grad(ref, wrt, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@cuda
def test_compiled_block_on_the_flex_path_equals_eager_with_gradients():
    """The same block compiled by Inductor in one graph (fullgraph) on a GPU: output and gradients of the input and
    every weight equal the eager block's (which runs the compiled FlexAttention wrapper)."""
    block, (x, cos, sin, mask) = _flex_block_inputs("cuda")
    x.requires_grad_(True)
    out = block(x, cos, sin, mask)
    g = torch.randn_like(out)
    ref = torch.autograd.grad(out, [x, *block.parameters()], g)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got_out = compiled(x, cos, sin, mask)
    got = torch.autograd.grad(got_out, [x, *block.parameters()], g)
    torch.testing.assert_close(got_out, out, atol=1e-4, rtol=1e-4)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # 13-30 s on 2 shared cores: five traces of a block
@flex_cpu
def test_compiled_blocks_take_varying_rows_in_one_graph(monkeypatch):
    """GRPO's micro-batches change shape every call (rows of many lengths, a window that bites in some and not in
    others). With `varying_shapes` a compiled block takes them all in two traces: the first with the block mask's
    length (a Python int of torch's BlockMask, which cannot be marked dynamic) as a constant, the second for any
    length; batch and length of the tensors are dynamic from the start, and the document mask has one structure
    whether the window bites or not (it had two: a recompile each). Without it, each dimension that changes
    recompiles the block once more; past torch's limit of 8 variants (kernels x grad modes x these) a block runs
    eagerly. Forward, no gradients (FlexAttention has no backward on CPUs)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from moxin.config import ModelConfig
    from moxin.model import Transformer, transformer

    monkeypatch.setattr(transformer, "resolve_backend", lambda backend, device: backend)  # flex on the CPU
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=attention.FLEX_MIN_HEAD_DIM,
                      hidden_dim=128, sliding_window=160, max_seq_len=512, attn_backend="flex")
    torch.manual_seed(0)
    model = Transformer(cfg).requires_grad_(False)
    ref = Transformer(cfg.replace(attn_backend="sdpa")).requires_grad_(False)
    ref.load_state_dict(model.state_dict())
    model.layers[0].compile(backend="aot_eager")
    # lengths 140, 300 and 200 (the window bites); 2 or 3 rows; two or more blocks of 128 (one block, a size of
    # 1, is a variant of its own)
    rows = [[[60, 80], [100, 40]], [[150, 50, 100], [200, 100]], [[70, 130], [120, 80], [50, 150]]]
    entries = {}
    for varying in (True, False):
        torch._dynamo.reset()
        for docs in rows:
            pos = packed_positions(docs)
            tokens = torch.randint(0, 64, pos.shape, generator=torch.Generator().manual_seed(len(docs)))
            out = model(tokens, pos, varying_shapes=varying)
            torch.testing.assert_close(out, ref(tokens, pos), atol=1e-5, rtol=1e-5)
        entries[varying] = len(_debug_get_cache_entry_list(transformer.Block.forward.__code__))
    assert entries[True] == 2 and entries[False] > 2, entries
