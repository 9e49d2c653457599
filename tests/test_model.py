"""Transformer and ModelConfig: presets, parameter counts, packed documents, validation."""

import pytest
import torch

from moxin.model import Transformer
from moxin.presets import load_preset
from tests.conftest import tiny_model


def test_moxin_7b_preset_exact():
    c = load_preset("moxin-7b")
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.hidden_dim, c.vocab_size) == \
        (36, 4096, 32, 8, 128, 14336, 32000)
    assert c.rope_theta == 1e4 and c.sliding_window == 4096 and c.max_seq_len == 32768
    assert c.norm_eps == 1e-5 and c.tie_embeddings is False
    assert load_preset("mistral-7b").n_layers == 32
    with pytest.raises(KeyError, match="unknown model preset"):
        load_preset("moxin-70b")


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_matches_real_model(tie):
    m = tiny_model(tie_embeddings=tie)
    assert m.cfg.num_params() == sum(p.numel() for p in m.parameters())
    emb = m.cfg.vocab_size * m.cfg.dim
    assert m.cfg.num_params(include_embeddings=False) == m.cfg.num_params() - emb


def test_moxin_7b_param_count_on_meta():
    cfg = load_preset("moxin-7b")
    with torch.device("meta"):
        m = Transformer(cfg)
    n = sum(p.numel() for p in m.parameters())
    assert n == cfg.num_params()
    assert abs(n - 8.11e9) < 0.01e9, n
    block = sum(p.numel() for p in m.layers[0].parameters())
    assert abs(block - 218.1e6) < 0.1e6 and m.tok_embeddings.weight.numel() == 131_072_000


def test_positions_none_equals_arange(tiny):
    x = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(tiny(x), tiny(x, torch.arange(40).expand(2, 40)))
        h = tiny(x, return_hidden=True)
        assert h.shape == (2, 40, 64)
        torch.testing.assert_close(tiny.output(h), tiny(x))


def test_packed_documents_equal_separate_runs():
    model = tiny_model()  # window 16: the 30-token document also exercises the window
    lengths = [[7, 30, 11], [1, 47]]
    x = torch.randint(0, 512, (2, 48))
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    with torch.no_grad():
        packed = model(x, pos)
        for b, row in enumerate(lengths):
            s = 0
            for n in row:
                alone = model(x[b:b + 1, s:s + n])
                torch.testing.assert_close(packed[b:b + 1, s:s + n], alone, atol=1e-5, rtol=1e-5)
                s += n
        # and the documents really are separated: without positions the second document sees the first
        assert (model(x)[0, 7:37] - packed[0, 7:37]).abs().max() > 1e-3


def test_right_padding_does_not_disturb_real_tokens():
    model = tiny_model()
    x = torch.randint(0, 512, (1, 20))
    pos = torch.cat([torch.arange(14), torch.arange(14, 20)]).unsqueeze(0)  # pad continues the document
    xp = x.clone()
    xp[0, 14:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(xp, pos)[:, :14], model(x[:, :14]), atol=1e-5, rtol=1e-5)


def test_sliding_window_hides_tokens_further_back_than_the_window():
    """Changing a token more than W positions back changes nothing; inside the window it does (1 layer)."""
    model = tiny_model(n_layers=1, sliding_window=4)
    x = torch.randint(0, 512, (1, 12))
    y = x.clone()
    y[0, 3] = (x[0, 3] + 1) % 512
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[0, 7:], b[0, 7:])  # q - 3 >= 4: out of window
    assert (a[0, 3:7] - b[0, 3:7]).abs().amax(-1).min() > 1e-4


def test_every_parameter_gets_a_finite_nonzero_gradient(tiny):
    x = torch.randint(0, 512, (2, 24))
    tiny.train()
    tiny(x).float().logsumexp(-1).mean().backward()
    for n, p in tiny.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("bad", [dict(n_heads=4, n_kv_heads=3), dict(head_dim=15), dict(sliding_window=0),
                                 dict(attn_backend="xformers"), dict(dim=0), dict(vocab_size=-1),
                                 dict(n_kv_heads=0)])
def test_invalid_configs_raise(bad):
    with pytest.raises(ValueError, match="invalid ModelConfig"):
        load_preset("tiny", **bad)


def test_too_long_sequence_raises(tiny):
    with pytest.raises(ValueError, match="max_seq_len=256"):
        tiny(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="positions shape"):
        tiny(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 7, dtype=torch.long))


def test_flops_and_kv_figures():
    c = load_preset("moxin-7b")
    assert c.kv_cache_bytes_per_token() == 144 * 1024
    assert c.flops_per_token(2048) > 6 * c.num_params(include_embeddings=False)


def test_presets_are_the_conf_model_files():
    """One source for presets: load_preset(name) is conf/model/<name>.yaml, what `model=<name>` picks."""
    from moxin.presets import preset_names

    assert {"moxin-7b", "mistral-7b", "tiny", "tiny-cpu"} <= set(preset_names())
    from hydra.utils import instantiate

    from tests.helpers.compose import compose_config

    for name in preset_names():
        assert load_preset(name) == instantiate(compose_config([f"model={name}"]).model), name


def test_fused_projections_give_the_same_outputs_in_the_same_memory():
    """fuse_projections: one q/k/v and one gate/up product a block. Same logits and generated tokens as the separate
    products, no new memory (the separate weights become views of the fused ones), and in-place weight updates
    (what GRPO's rollout copy gets every step) reach the fused products."""
    from moxin.model import generate

    ref = tiny_model(sliding_window=8).requires_grad_(False)
    model = tiny_model(sliding_window=8).requires_grad_(False)
    x = torch.randint(3, 512, (3, 20))
    storages = lambda m: {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in m.parameters()}
    before = sum(storages(model).values())
    assert model.fuse_projections() is model
    assert sum(storages(model).values()) == before  # fewer storages, same bytes
    assert all(b.attention._views_fused() and b.feed_forward._views_fused() for b in model.layers)
    separate = []  # the fused model must not run the separate q/k/v and gate/up products
    for b in model.layers:
        for lin in (b.attention.wq, b.attention.wk, b.attention.wv, b.feed_forward.w1, b.feed_forward.w3):
            lin.register_forward_hook(lambda m, a, o: separate.append(m))
    torch.testing.assert_close(model(x), ref(x), atol=1e-6, rtol=1e-6)
    assert not separate
    prompts = [[5, 9, 11], [7] * 12]
    for decode in ("eager", "static"):
        assert generate(model, prompts, 12, temperature=0, decode=decode).tokens == \
            generate(ref, prompts, 12, temperature=0, decode=decode).tokens
    new = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    ref.load_state_dict(new)
    model.load_state_dict(new)  # in place: the fused weights follow
    assert model.layers[0].attention._views_fused()
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for m in (ref, model):
            m.layers[1].feed_forward.w3.weight.mul_(-2.0)
            m.layers[0].attention.wv.weight.add_(0.5)
    torch.testing.assert_close(model(x), ref(x), atol=1e-5, rtol=1e-5)


def test_fusion_refuses_trainable_weights_and_never_goes_stale():
    """A fused product would give the separate weights no gradient: fusing refuses trainable weights, and a fused
    model made trainable again takes the separate products (gradients reach wq..w3). Whatever replaces the
    parameters (.to, deepcopy, load_state_dict(assign=True)) drops the fusion instead of computing with old
    weights."""
    import copy

    with pytest.raises(ValueError, match="requires_grad_"):
        tiny_model().fuse_projections()
    ref = tiny_model(sliding_window=8).requires_grad_(False)
    x = torch.randint(3, 512, (2, 16))
    fused = lambda: copy.deepcopy(ref).fuse_projections()
    m = fused()
    assert copy.deepcopy(m).layers[0].attention.fused_weight is None
    m64 = fused().to(torch.float64)
    assert m64.layers[0].feed_forward.fused_weight is None
    torch.testing.assert_close(m64(x).float(), ref(x), atol=1e-5, rtol=1e-5)
    new = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    m = fused()
    m.load_state_dict(new, assign=True)
    assert m.layers[1].attention.fused_weight is None
    ref2 = copy.deepcopy(ref)
    ref2.load_state_dict(new)
    torch.testing.assert_close(m(x), ref2(x), atol=1e-5, rtol=1e-5)
    m = fused().requires_grad_(True)
    separate = []
    m.layers[0].attention.wq.register_forward_hook(lambda mod, a, o: separate.append(mod))
    m(x).float().logsumexp(-1).mean().backward()
    assert separate  # trainable again: the separate products run
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def _linear_pair(bias=False):
    from moxin.model.transformer import Linear
    torch.manual_seed(0)
    ref = torch.nn.Linear(48, 40, bias=bias)
    ours = Linear(48, 40, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_linear_under_autocast_gives_autocasts_outputs_and_fp32_gradients_bitwise_on_the_cpu():
    # the CPU keeps autocast's rounding of the weight gradient (CUDA computes it in fp32: tests/test_gpu.py); outputs,
    # input gradients and weight gradients (accumulated over two backward passes) equal nn.Linear's bit for bit
    ref, ours = _linear_pair()
    x = torch.randn(3, 5, 48)
    outs, xgrads = [], []
    for lin in (ref, ours):
        xi = x.clone().requires_grad_(True)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = lin(xi)
            (y.float() * torch.linspace(-1, 1, 40)).sum().backward()
        outs.append(y)
        xgrads.append(xi.grad)
    assert outs[1].dtype == torch.bfloat16 and ours.weight.grad.dtype == torch.float32
    assert torch.equal(outs[0], outs[1]) and torch.equal(xgrads[0], xgrads[1])
    assert torch.equal(ref.weight.grad, ours.weight.grad)


@pytest.mark.parametrize("case", ["no-autocast", "no-grad", "bias", "bf16-weights"])
def test_linear_outside_its_case_is_nn_linear(case):
    ref, ours = _linear_pair(bias=case == "bias")
    if case == "bf16-weights":
        ref, ours = ref.bfloat16(), ours.bfloat16()
    x = torch.randn(4, 48, dtype=ref.weight.dtype)
    ctx = torch.no_grad() if case == "no-grad" else torch.enable_grad()
    with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no-autocast"):
        a, b = ref(x), ours(x)
    assert torch.equal(a, b)
    if case != "no-grad":
        a.float().sum().backward(), b.float().sum().backward()
        assert torch.equal(ref.weight.grad, ours.weight.grad)
