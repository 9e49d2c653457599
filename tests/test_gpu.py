"""End-to-end checks on a CUDA GPU (marked gpu: `pytest -m gpu`; skipped without CUDA).

- FlexAttention (and flash-attn when installed) against the SDPA dense-mask reference, window biting, packed docs.
- The fast decode paths (static, CUDA graph) against the eager reference: same greedy tokens, logits (log-probs)
  within bf16 tolerance, sampling with a seed identical.
- A few steps of PretrainStage on the GPU with bf16-mixed and compiled blocks: loss finite and falling on a
  repeated batch.
"""

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from moxin.config import ModelConfig  # noqa: E402
from moxin.model import Transformer, generate  # noqa: E402
from moxin.model import attention as A  # noqa: E402
from moxin.presets import load_preset  # noqa: E402

DEV = "cuda"


@pytest.mark.parametrize("backend", ["flex", "flash"])
@pytest.mark.parametrize("docs", [False, True])
def test_kernels_match_reference(backend, docs):
    if backend == "flash" and not A.HAS_FLASH:
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    B, H, KV, T, D, W = 2, 8, 2, 1024, 64, 256
    q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    doc_ids = None
    if docs:
        pos = torch.cat([torch.arange(300), torch.arange(T - 300)]).to(DEV).expand(B, T)
        doc_ids = (pos == 0).cumsum(1)
    ref = A.attend(q.float(), k.float(), v.float(), window=W, doc_ids=doc_ids, backend="sdpa")
    out = A.attend(q, k, v, window=W, doc_ids=doc_ids, backend=backend)
    assert (out.float() - ref).abs().max() < 2e-2
    go = torch.randn_like(out)
    out.backward(go)
    g_out = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    A.attend(qf, kf, vf, window=W, doc_ids=doc_ids, backend="sdpa").backward(go.float())
    for g, r in zip(g_out, (qf.grad, kf.grad, vf.grad)):
        assert ((g.float() - r).norm() / r.norm()) < 2e-2


def _model(dtype, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = load_preset("tiny", **kw)
    return Transformer(cfg).to(DEV, dtype).eval()


def _prompts(lens, vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fast_decode_equals_eager_greedy(dtype, side):
    model = _model(dtype, sliding_window=8)  # window 8 < prompt + new: the rolling cache wraps
    ps = _prompts([3, 12, 7, 20])
    ref = generate(model, ps, 24, temperature=0, pad_side=side, decode="eager", return_logprobs=True)
    for path in ("static", "graph", "compiled"):
        got = generate(model, ps, 24, temperature=0, pad_side=side, decode=path, return_logprobs=True)
        assert got.tokens == ref.tokens, path
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for a, b in zip(got.logprobs, ref.logprobs):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0), path


@pytest.mark.parametrize("dtype,new", [(torch.float32, 100), (torch.bfloat16, 16)])
def test_compiled_decode_with_flex_attention_and_fused_projections_equals_eager(dtype, new, monkeypatch):
    """On CUDA the compiled decode takes FlexAttention's decoding kernel where it applies (heads of 32, a cache of
    whole 128-slot blocks: window 128, so the cache wraps); with and without fused projections its greedy tokens
    and log-probs equal the eager reference's."""
    import copy
    import importlib

    G = importlib.import_module("moxin.model.generate")  # (moxin.model.generate is also the function)

    caches = []

    class Spy(G.RollingKVCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            caches.append(self)

    monkeypatch.setattr(G, "RollingKVCache", Spy)
    model = _model(dtype, head_dim=32, sliding_window=128, max_seq_len=512).requires_grad_(False)
    fused = copy.deepcopy(model).fuse_projections()
    ps = _prompts([3, 40, 17, 120], seed=4)  # the longest row runs past the 128 slots
    ref = generate(model, ps, new, temperature=0, decode="eager", return_logprobs=True)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for m in (model, fused):
        got = generate(m, ps, new, temperature=0, decode="compiled", return_logprobs=True)
        assert caches[-1].decode_kernel == "flex" and caches[-1].capacity == 128
        assert got.tokens == ref.tokens
        for a, b in zip(got.logprobs, ref.logprobs):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0)


def test_fast_decode_sampling_and_stops_match_eager():
    model = _model(torch.bfloat16)
    ps = _prompts([5, 9, 16, 2], seed=3)
    kw = dict(temperature=1.0, top_k=40, stop_tokens=(7, 11, 13), sync_every=4)
    outs = {}
    for path in ("eager", "static", "graph", "compiled"):
        g = torch.Generator(device=DEV).manual_seed(11)
        outs[path] = generate(model, ps, 40, generator=g, decode=path, **kw)
    for path in ("static", "graph", "compiled"):
        assert outs[path].tokens == outs["eager"].tokens
        assert outs[path].finished == outs["eager"].finished


def test_fast_decode_logits_match_eager_step():
    """One decode step's logits: static path (captured in a graph) vs the eager path, bf16 tolerance."""
    from moxin.model.cache import RollingKVCache

    model = _model(torch.bfloat16, sliding_window=8)
    B, P = 3, 10
    toks = torch.randint(3, 512, (B, P), device=DEV)
    pos = torch.arange(P, device=DEV).expand(B, P).clone()
    pos[1, :4] = -1  # a left-padded row
    caches = [RollingKVCache(model.cfg, B, P + 4, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(toks, pos, cache=c)
        nxt = torch.randint(3, 512, (B, 1), device=DEV)
        npos = torch.tensor([[P], [P - 4], [-1]], device=DEV)
        ref = model(nxt, npos, cache=caches[0])[:, -1].float()
        caches[1].static_decode = True
        tb, pb = nxt.clone(), npos.clone()
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(tb, pb, cache=caches[1])[:, -1]
        g.replay()
        torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=2e-2)
        assert torch.equal(caches[0].pos, caches[1].pos)
        torch.testing.assert_close(torch.stack(caches[1].k).float(), torch.stack(caches[0].k).float(), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("compiled", [False, True])
def test_linear_under_autocast_returns_the_fp32_weight_gradient_of_the_product(compiled):
    """moxin's Linear on CUDA under bf16 autocast: output and input gradient bit for bit nn.Linear's (the same
    products), the weight gradient (accumulated over two passes) within fp32 rounding of the exact product of the
    bf16 operands, where nn.Linear's is rounded to bf16; eager and in a compiled block (mm with out_dtype there)."""
    from moxin.model.transformer import Linear

    torch.manual_seed(0)
    ref = torch.nn.Linear(512, 384, bias=False, device=DEV)
    ours = Linear(512, 384, bias=False, device=DEV)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 256, 512, device=DEV)
    gos = [torch.randn(4, 256, 384, device=DEV, dtype=torch.bfloat16) for _ in range(2)]
    res = {}
    for name, lin in (("ref", ref), ("ours", ours)):
        fwd = torch.compile(lin) if compiled else lin
        xi = x.clone().requires_grad_(True)
        for go in gos:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = fwd(xi)
            y.backward(go)
        res[name] = (y, xi.grad, lin.weight.grad)
    (y0, gx0, gw0), (y1, gx1, gw1) = res["ref"], res["ours"]
    assert y1.dtype == torch.bfloat16 and gw1.dtype == torch.float32
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    xb = x.bfloat16().double().reshape(-1, 512)
    exact = sum(go.double().reshape(-1, 384).t() @ xb for go in gos)
    err = lambda g: ((g.double() - exact).norm() / exact.norm()).item()  # noqa: E731
    assert err(gw1) < 1e-5 < err(gw0), (err(gw1), err(gw0))


@pytest.mark.parametrize("t", [1.0, 0.6])
def test_compiled_loss_head_matches_eager(t, monkeypatch):
    """The loss head's CUDA path (compiled per-chunk kernels, the logits gradient kept from the forward, fp32
    accumulation of the weight gradient) against the eager head (COMPILE_HEAD off: recomputed logits), both
    under bf16 autocast over fp32 weights, with ragged chunks (two row counts) and ignored labels: each is held
    to fp32 autograd on the same bf16-rounded inputs, and the CUDA path's errors are no larger than the eager
    path's (values and both gradients)."""
    from moxin import losses as L

    torch.manual_seed(0)
    h = torch.randn(3, 700, 256, device=DEV)
    w = (torch.randn(32000, 256, device=DEV) / 16)
    labels = torch.randint(0, 32000, (3, 700), device=DEV)
    labels[0, :50] = -100
    up = torch.randn(3, 700, device=DEV)
    res = {}
    for compiled in (False, True):
        monkeypatch.setattr(L, "COMPILE_HEAD", compiled)
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            lp = L.token_logprobs(hh, ww, labels, chunk_size=512, temperature=t)
        (lp * up).sum().backward()
        res[compiled] = (lp, hh.grad, ww.grad)
    hh = h.bfloat16().float().requires_grad_()
    ww = w.bfloat16().float().requires_grad_()
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        lp_ref = torch.log_softmax((hh @ ww.T) / t, -1).gather(
            -1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
        (lp_ref * up).sum().backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    for name, fast, eager, ref in zip(("log-probs", "hidden grad", "weight grad"), res[True], res[False],
                                      (lp_ref, hh.grad, ww.grad)):
        torch.testing.assert_close(fast, ref, rtol=5e-2, atol=5e-2)
        e_fast, e_eager = (fast - ref).abs(), (eager - ref).abs()
        assert e_fast.mean() <= 1.25 * e_eager.mean() + 1e-6, (name, float(e_fast.mean()), float(e_eager.mean()))
        assert e_fast.max() <= 2.0 * e_eager.max() + 1e-5, (name, float(e_fast.max()), float(e_eager.max()))


def test_pretrain_stage_bf16_compile_loss_falls():
    import lightning as L

    from moxin.config import OptimConfig, ParallelConfig
    from moxin.stages.pretrain import PretrainStage

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                      sliding_window=64, max_seq_len=256, attn_backend="flex")
    T = 256
    ids = torch.randint(0, 512, (2, T + 1))
    pos = torch.cat([torch.arange(100), torch.arange(T - 100)]).expand(2, T).clone()
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "positions": pos}
    loader = torch.utils.data.DataLoader([batch] * 12, batch_size=None)
    stage = PretrainStage(model=cfg, optim=OptimConfig(lr=3e-3, warmup_steps=0, schedule="constant"),
                          parallel=ParallelConfig(compile=True), total_steps=12)
    losses = []

    class Rec(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=12, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Rec()], num_sanity_val_steps=0)
    trainer.fit(stage, train_dataloaders=loader)
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.5, losses
    assert next(stage.model.parameters()).dtype == torch.float32  # fp32 master weights


def _loss_recorder():
    """A callback that keeps the logged train/loss and train/grad_norm of every optimizer step."""
    import lightning as L

    class LossRecorder(L.Callback):
        def __init__(self):
            self.losses, self.norms = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if len(self.losses) < trainer.global_step:
                self.losses.append(float(trainer.callback_metrics["train/loss"]))
                self.norms.append(float(trainer.callback_metrics["train/grad_norm"]))

    return LossRecorder()


def _lightning_fit(stage, batches, callbacks=(), accumulate=1):
    import lightning as L

    from moxin.callbacks import Throughput

    loader = torch.utils.data.DataLoader(batches, batch_size=None, pin_memory=True)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=len(batches) // accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Throughput(peak_tflops=989.0), *callbacks],
                        num_sanity_val_steps=0, accumulate_grad_batches=accumulate)
    trainer.fit(stage, train_dataloaders=loader)
    return trainer


def test_lightning_training_steps_make_no_device_sync_before_the_optimizer_step():
    """Through the Trainer (pinned batches, document bounds and label rows from the host, compiled bf16, gradient
    accumulation, fused AdamW with clipping, the throughput callback), training steps after the warm-up make no
    synchronising CUDA call: the step's values reach the host by an event the host waits on once the optimizer
    step is queued. From one initialisation, the losses and weights equal those of the path that reads the values
    before the step and multiplies the gradients, and of the head that finds its labels on the device. Also: the
    stage's reduction keeps the order of mixed host and device numbers."""
    import lightning as L

    from moxin.config import OptimConfig, ParallelConfig
    from moxin.distributed import all_reduce_tensor
    from moxin.stages.pretrain import PretrainStage

    got = all_reduce_tensor([1.0, torch.tensor(2.0, device=DEV), 3, torch.tensor(4.0), True], DEV)
    assert got.device.type == "cuda" and got.tolist() == [1.0, 2.0, 3.0, 4.0, 1.0]
    cfg = ModelConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256,
                      sliding_window=64, max_seq_len=256, attn_backend="flash" if A.HAS_FLASH else "flex")
    g = torch.Generator().manual_seed(0)
    T, batches = 256, []
    for i in range(12):
        ids = torch.randint(0, 512, (2, T + 1), generator=g)
        labels = ids[:, 1:].clone()
        labels[:, : 10 * (i % 3)] = -100  # prompts of a few lengths
        pos = torch.cat([torch.arange(100), torch.arange(T - 100)]).expand(2, T).clone()
        batches.append({"input_ids": ids[:, :-1].clone(), "labels": labels, "positions": pos})

    class NoSync(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= 2:  # after the compile and the first steps' allocations
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= trainer.max_steps:  # not the end of fit (the model goes back to the CPU)
                torch.cuda.set_sync_debug_mode("default")

    weights, losses = [], []
    for variant in ("sync-free", "values read before the step", "labels found on the device"):
        torch.manual_seed(0)
        stage = PretrainStage(model=cfg, optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant",
                                                           grad_clip=0.5), parallel=ParallelConfig(compile=True))
        stage.configure_model()  # the same initial weights for every variant (compiled at fit)
        if variant == "values read before the step":
            stage.optim_step.allow_fused = False
        elif variant == "labels found on the device":
            stage.label_rows = lambda batch: None
        rec = _loss_recorder()
        try:
            trainer = _lightning_fit(stage, batches, [rec] + ([NoSync()] if variant == "sync-free" else []),
                                     accumulate=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert trainer.global_step == 6 and stage.tokens_seen == sum(int((b["labels"] != -100).sum()) for b in batches)
        assert len(rec.losses) == 6 and max(rec.norms) > 0.5  # the clip bit
        weights.append([p.detach().float() for p in stage.model.parameters()])
        losses.append(rec.losses)
    for other, other_losses in zip(weights[1:], losses[1:]):
        assert losses[0] == pytest.approx(other_losses, rel=2e-3), (losses[0], other_losses)
        for a, b in zip(weights[0], other):
            assert (a - b).norm() <= 1e-3 * b.norm() + 1e-6, (a - b).norm() / b.norm()


@pytest.mark.parametrize("backend", ["flex", "flash"])
@pytest.mark.parametrize("docs", [False, True])
def test_training_step_with_host_document_bounds_never_syncs(backend, docs):
    """With `DocBounds` from the host, a compiled bf16 training forward and backward (FlashAttention-4 varlen or
    FlexAttention, packed documents or one a row) make no synchronising CUDA call, and give the same hidden
    states and gradients as the forward that reads the bounds from the device."""
    if backend == "flash" and not A.HAS_FLASH:
        pytest.skip("flash-attn not installed")
    from moxin.distributed import apply_compile

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
                      sliding_window=64, max_seq_len=256, attn_backend=backend)
    model = Transformer(cfg).to(DEV)
    apply_compile(model)
    T = 256
    pos = (torch.cat([torch.arange(100), torch.arange(T - 100)]) if docs else torch.arange(T)).expand(2, T).clone()
    ids = torch.randint(0, 512, (2, T))
    bounds = A.DocBounds.from_positions(pos).to(DEV, non_blocking=True)
    assert bounds.one_doc_per_row != docs
    ids, pos = ids.pin_memory().to(DEV, non_blocking=True), pos.pin_memory().to(DEV, non_blocking=True)

    def step(doc_bounds):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(ids, pos, doc_bounds=doc_bounds, return_hidden=True)
        h.float().square().mean().backward()
        return h.detach(), [p.grad for p in model.parameters() if p.grad is not None]  # not the unused output

    ref = step(None)  # also compiles and loads the kernels
    step(bounds)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step(bounds)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got[0], ref[0]) and len(got[1]) == len(ref[1]) == len(list(model.parameters())) - 1
    for a, b in zip(got[1], ref[1]):  # FlashAttention's backward accumulates dq with atomics: not bitwise
        assert (a - b).norm() <= 1e-3 * b.norm(), (a - b).norm() / b.norm()


@pytest.mark.parametrize("T", [40, 64, 100, 128, 200])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("D", [16, 32])
def test_flex_ragged_lengths_match_reference(T, docs, D):
    """Lengths that are not a multiple of FlexAttention's block (DPO pairs, GRPO rollouts, short validation rows;
    head_dim 32 as the tiny-cpu model) lower, and equal the dense reference forward and backward."""
    torch.manual_seed(T)
    B, H, KV, W = 3, 8, 2, 24
    q = torch.randn(B, H, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, KV, T, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    doc_ids = None
    if docs:
        cut = T // 3
        pos = torch.cat([torch.arange(cut), torch.arange(T - cut)]).to(DEV).expand(B, T)
        doc_ids = (pos == 0).cumsum(1)
    out = A.attend(q, k, v, window=W, doc_ids=doc_ids, backend="flex")
    assert out.shape == (B, H, T, D)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = A.attend(qf, kf, vf, window=W, doc_ids=doc_ids, backend="sdpa")
    assert (out.float() - ref).abs().max() < 2e-2
    go = torch.randn_like(ref)
    out.backward(go.to(out.dtype))
    ref.backward(go)
    for g, r in zip((q.grad, k.grad, v.grad), (qf.grad, kf.grad, vf.grad)):
        assert ((g.float() - r).norm() / r.norm()) < 2e-2


def _run_experiment(tmp_path, name, *extra):
    from tests.helpers.compose import compose_config
    from tests.helpers.tiny_overrides import TINY_MODEL
    from moxin import run as R

    cfg = compose_config([f"+experiment={name}", "hardware=gpu", "hardware.num_workers=0", f"out_dir={tmp_path / name}",
                    f"run_name={name}", "trainer.progress_bar=none", *TINY_MODEL, *extra])
    return R.train(cfg)


def test_dpo_and_grpo_run_on_gpu_compiled(tmp_path):
    """The two stages that crashed in FlexAttention's lowering on a GPU (padded pairs, rollouts of any length):
    a few bf16 compiled steps each, finite metrics, DPO's frozen reference and GRPO's KL reference included."""
    import math

    dpo = _run_experiment(tmp_path, "dpo", "trainer.max_steps=4", "stage.reference=frozen",
                          "trainer.val_every_n_steps=2", "export_hf=false")
    assert dpo["optimizer_steps"] == 4
    assert math.isfinite(dpo["metrics"]["train/loss"]) and math.isfinite(dpo["metrics"]["val/dpo_loss"])
    from moxin.data.sample import sample_path

    grpo = _run_experiment(tmp_path, "grpo", "data.steps=3", "warmup.steps=2",
                           "stage.grpo.kl_coef=0.01", "stage.grpo.max_new_tokens=12",
                           "stage.grpo.entropy_coef=0.001", f"stage.grpo.val_source={sample_path('eval_math')}",
                           "stage.grpo.val_prompts=4", "stage.grpo.n_val=2", "stage.grpo.val_every_n_steps=2")
    # a random tiny model rarely scores, so every group may have zero reward spread and no update may run;
    # what must hold is that rollouts, scoring and the (possibly empty) update ran on the GPU with finite values
    assert math.isfinite(grpo["metrics"]["grpo/reward_mean"]) and math.isfinite(grpo["metrics"]["grpo/kl"])
    assert grpo["metrics"]["grpo/completion_len_mean"] > 0
    assert 0.0 <= grpo["metrics"]["val/reward_mean"] <= 1.0  # the recipe's validation: sampled on the GPU


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_dpo_fsdp2_two_gpus_match_one(tmp_path):
    """DPO with a sharded frozen reference on 2 GPUs (NCCL) = one GPU on the same global batch."""
    from tests.helpers.process_equivalence import check_dpo_fsdp_matches_one

    check_dpo_fsdp_matches_one(tmp_path, "gpu")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_grpo_fsdp2_gathered_rollouts_equal_lockstep_on_two_gpus(tmp_path):
    """GRPO under FSDP2 on 2 GPUs (NCCL): each rank's rollout through the gathered copy (compiled decode, alone)
    samples the tokens of the eager lockstep rollout through the sharded model, before and after an update; the
    copy is freed after each rollout (tests/test_grpo_rollout_fsdp.py checks the same on 2 CPU processes, and
    against the unsharded rollout)."""
    import json
    from pathlib import Path

    from tests.conftest import torchrun

    out = tmp_path / "grpo.json"
    torchrun(Path(__file__).parent / "helpers" / "grpo_fsdp.py", out, "gpu", timeout=600)
    res = json.loads(out.read_text())
    assert len(res["rollouts"]) == 2 and res["steps"] > 0
    for step, ranks in enumerate(res["rollouts"]):
        for rank, rec in enumerate(ranks):
            gathered, lockstep = rec["gather"], rec["lockstep"]
            assert gathered["decode"] == ["compiled"] and gathered["policy"] == [False] and rec["copy_freed"]
            assert lockstep["decode"] == ["eager"] and lockstep["lockstep"] == [True]
            assert gathered["input_ids"] == lockstep["input_ids"], (step, rank)
