"""Two CPU processes (gloo DDP / FSDP2 / tensor parallelism through torchrun, Lightning's launcher path) give the
same losses, weights and gradients as one process with the same global batch, for pretraining, DPO and GRPO: the
loss is normalised by the step's target tokens (pairs) across accumulation and ranks. The one-process micro-batches
straddle the ranks' rows with unequal counts and clipping is off, so a per-micro-batch mean or a missing
world-size factor shows in the gradients, which are compared directly (and with the first step's gradients written
out by hand)."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from moxin.config import ConfigError, ModelConfig, ParallelConfig, check_tensor_parallel
from moxin.presets import load_preset
from tests.conftest import torchrun
from tests.helpers.process_equivalence import check_dpo_fsdp_matches_one, check_same_training

HELPER = Path(__file__).parent / "helpers" / "ddp_equivalence.py"


def _run(world: int, out: Path, strategy: str = "ddp", dtype: str = "float32", lr: str = "1e-2") -> dict:
    torchrun(HELPER, out, strategy, dtype, lr, nproc=world)
    return (json.loads(out.read_text()) | torch.load(f"{out}.grads.pt", weights_only=True)
            | {"weights": torch.load(f"{out}.weights.pt", weights_only=True)})


RECIPE_LR = "3e-4"  # Moxin-7B's Adam lr (conf/experiment/pretrain_moxin_7b.yaml)


def _check_weights(one: dict, other: dict, atol: float) -> None:
    assert sorted(other["weights"]) == sorted(one["weights"])
    for name, w in one["weights"].items():
        torch.testing.assert_close(other["weights"][name], w, rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _check_hsdp(one: dict, hsdp: dict, world: int, atol: float = 1e-5) -> None:
    """HSDP trains as one process: gradients, losses (1e-4) and every weight (`atol`: see `_check_layout`) after the
    steps; its parameters really are (Replicate, Shard(0)) DTensors of the 2-D mesh."""
    assert hsdp["placements"] == ["(Replicate(), Shard(dim=0))"]
    check_same_training(one, hsdp, 4, f"HSDP 2 x {world // 2}", loss_rel=1e-4)
    _check_weights(one, hsdp, atol)


def _check_layout(tmp_path, one: dict, one_f64: dict | None, world: int, strategy: str, check) -> None:
    """`strategy` on `world` processes trains as one process, weights within 1e-5 in fp32 at the recipe's lr and,
    with `one_f64`, within 1e-10 in float64 at lr 1e-2. Why both (docs/performance.md, "Tensor parallelism and
    HSDP against one process"): in float64 the layouts' weights equal one process's to 2e-13 after the steps (the
    math is exact); in fp32 the reductions' order rounds the gradients differently by ~1e-8, and Adam's step
    lr x m / sqrt(v) moves a weight by up to lr whatever its gradient's size, so where gradients are near zero that
    rounding becomes a difference of up to 2.4e-5 at lr 1e-2 (TP=2 x DP=2; 1.6e-5 HSDP 2 x 2) but 7.3e-7 at 3e-4."""
    check(one, _run(world, tmp_path / f"{strategy}.json", strategy, "float32", RECIPE_LR), world)
    if one_f64 is not None:
        check(one_f64, _run(world, tmp_path / f"{strategy}64.json", strategy, "float64"), world, atol=1e-10)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    """The single-process pretraining run both the DDP and the FSDP2 runs are held to (launched once)."""
    return _run(1, tmp_path_factory.mktemp("one") / "one.json")


@pytest.fixture(scope="module")
def one_process_recipe_lr(tmp_path_factory) -> dict:
    """The single-process run at the recipe's lr, fp32 (the HSDP and tensor-parallel weights are held to it)."""
    return _run(1, tmp_path_factory.mktemp("one") / "one_lr.json", "ddp", "float32", RECIPE_LR)


@pytest.fixture(scope="module")
def one_process_f64(tmp_path_factory) -> dict:
    """The single-process run in float64 at lr 1e-2 (tests/helpers/ddp_equivalence.py's float64 mode)."""
    return _run(1, tmp_path_factory.mktemp("one") / "one64.json", "ddp", "float64")


def test_two_processes_match_one(tmp_path, one_process):
    two = _run(2, tmp_path / "two.json")
    check_same_training(one_process, two, 4, "2 DDP processes")
    # the runs really trained: the weights moved away from the (seeded, identical) initialisation
    assert abs(one_process["checksum"] - one_process["init_checksum"]) > 1e-3


def test_fsdp2_two_processes_match_one(tmp_path, one_process):
    """The same check through per-block FSDP2 sharding (Lightning's ModelParallelStrategy, gloo on CPU)."""
    two = _run(2, tmp_path / "fsdp.json", "fsdp2")
    check_same_training(one_process, two, 4, "2 FSDP2 processes")


def test_hsdp_two_replicas_of_one_shard_match_one(tmp_path, one_process_recipe_lr):
    """hardware.parallel.replicate=2 on 2 processes: the (replicate 2, shard 1) mesh, a fast check of the HSDP path."""
    _check_layout(tmp_path, one_process_recipe_lr, None, 2, "hsdp", _check_hsdp)


@pytest.mark.slow
def test_hsdp_two_replicas_of_two_shards_match_one(tmp_path, one_process_recipe_lr, one_process_f64):
    """HSDP R=2 x 2 on 4 gloo processes: sharded within a pair, replicated across the pairs, as one process (fp32
    and float64, `_check_layout`)."""
    _check_layout(tmp_path, one_process_recipe_lr, one_process_f64, 4, "hsdp", _check_hsdp)


GRAD_SYNC = Path(__file__).parent / "helpers" / "grad_sync.py"
ACCUM = 4  # micro-batches an optimizer step in the gradient-sync runs (tests/helpers/grad_sync.py)
STEPS_OF_HELPER = 4  # their optimizer steps (tests/helpers/ddp_equivalence.py's STEPS)
F64, F32 = "float64:1e-2", "float32:3e-4"  # the model's dtype and Adam's lr: exact math, and the recipe's lr


def _grad_sync_runs(tmp_path, layout: str, world: int, settings: list[str], accum: int = ACCUM) -> dict:
    """tests/helpers/grad_sync.py: `layout` on `world` processes, once per setting (GRADIENT_SYNC:REDUCE_DTYPE:
    DTYPE:LR); {setting: {losses, weights, calls, accum}}, the gradients' calls counted as
    {(op, mesh dimension, dtype): n}."""
    out = tmp_path / f"{layout}{world}.pt"
    torchrun(GRAD_SYNC, out, layout, accum, *settings, nproc=world)
    runs = torch.load(out, weights_only=False)
    for setting, r in runs.items():
        r["counts"] = Counter((op, dim, dt) for op, dim, dt, _ in r["calls"] if dt != "torch.int64")
        r["accum"] = int(setting.split(":")[4]) if setting.count(":") == 4 else accum
    return runs


def _per_backward(ref: dict, key: tuple) -> int:
    """Collectives of `key` one backward issues (one per FSDP2 unit: each block and the root), from a run that
    syncs every micro-step."""
    n, backwards = ref["counts"][key], STEPS_OF_HELPER * ref["accum"]
    assert n > 0 and n % backwards == 0, ref["counts"]
    return n // backwards


def _check_same_weights(ref: dict, other: dict, atol: float, what: str) -> None:
    assert other["losses"] == pytest.approx(ref["losses"], rel=1e-6), what
    for name, w in ref["weights"].items():
        torch.testing.assert_close(other["weights"][name], w, rtol=0, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}")


def _check_replica_all_reduce_once_per_step(runs: dict, world: int) -> None:
    """gradient_sync=auto (the default) under HSDP trains as micro_step does (float64 within 1e-10, fp32 at the
    recipe's lr within 1e-6) with one replica all-reduce an optimizer step, not one a micro-batch, and the same
    reduce-scatters (none with shards of 1)."""
    for tail, atol in ((F64, 1e-10), (F32, 1e-6)):
        ref, auto = runs[f"micro_step:float32:{tail}"], runs[f"auto:float32:{tail}"]
        dtype = "torch." + tail.split(":")[0]
        ar = ("all_reduce", "replicate", dtype)
        per = _per_backward(ref, ar)
        assert auto["counts"][ar] == per * STEPS_OF_HELPER  # accum times fewer
        assert auto["counts"][("reduce_scatter", "shard", dtype)] == ref["counts"][("reduce_scatter", "shard", dtype)]
        assert (world > 2) == (auto["counts"][("reduce_scatter", "shard", dtype)] > 0)
        _check_same_weights(ref, auto, atol, f"HSDP 2 x {world // 2}, gradient_sync=auto vs micro_step, {tail}")


def test_hsdp_all_reduces_across_replicas_once_per_optimizer_step(tmp_path):
    """HSDP 2 x 1, accumulation 4: the replica all-reduce runs once a step (`_check_replica_all_reduce_once_per_step`);
    reduce_dtype=bfloat16 hands the all-reduce bf16 gradients and trains as fp32 does (losses within 1e-5).
    Accumulation 3 over the epoch's 16 micro-batches: the loop steps after micro-batches 3, 6, ..., 15 and 16 (the
    epoch's last, a window of one); auto all-reduces at each of those 6 and nowhere else, and trains as micro_step
    (float64, 1e-10): a last micro-batch taken for an accumulating one would leave its window's sums unreduced."""
    partial = [f"micro_step:float32:{F64}:3", f"auto:float32:{F64}:3"]
    runs = _grad_sync_runs(tmp_path, "hsdp", 2, [f"micro_step:float32:{F64}", f"auto:float32:{F64}",
                                                  f"micro_step:float32:{F32}", f"auto:float32:{F32}",
                                                  f"auto:bfloat16:{F32}", *partial])
    _check_replica_all_reduce_once_per_step(runs, 2)
    ref, auto = (runs[k] for k in partial)
    ar, units = ("all_reduce", "replicate", "torch.float64"), load_preset("tiny").n_layers + 1
    assert (ref["counts"][ar], auto["counts"][ar]) == (units * 16, units * 6)
    _check_same_weights(ref, auto, 1e-10, "HSDP 2 x 1, accumulation 3, auto vs micro_step")
    bf16, fp32 = runs[f"auto:bfloat16:{F32}"], runs[f"micro_step:float32:{F32}"]
    assert set(bf16["counts"]) == {("all_reduce", "replicate", "torch.bfloat16")}
    assert bf16["counts"][("all_reduce", "replicate", "torch.bfloat16")] == _per_backward(
        fp32, ("all_reduce", "replicate", "torch.float32")) * STEPS_OF_HELPER
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=1e-5)
    assert bf16["losses"] != fp32["losses"]  # the reduction really was rounded


@pytest.mark.slow
def test_hsdp_two_by_two_all_reduces_across_replicas_once_per_optimizer_step(tmp_path):
    """HSDP 2 x 2 on 4 gloo processes, accumulation 2 (a reduce-scatter within each pair every micro-step, the
    all-reduce across the pairs once a step): `_check_replica_all_reduce_once_per_step`."""
    runs = _grad_sync_runs(tmp_path, "hsdp", 4, [f"{s}:float32:{t}" for t in (F64, F32) for s in ("micro_step", "auto")],
                           accum=2)
    _check_replica_all_reduce_once_per_step(runs, 4)


def test_fsdp2_gradient_sync_step_reduce_scatters_once_per_optimizer_step(tmp_path):
    """Plain FSDP2 on 2 processes, accumulation 4: gradient_sync=step reduce-scatters once a step (the unsharded
    gradients accumulate in between) and trains as micro_step does (float64 within 1e-10; fp32 at the recipe's lr
    within 1e-6); auto is micro_step there (nothing to defer without holding unsharded gradients); bfloat16 reduces
    in bf16 (losses within 1e-5 of fp32's)."""
    runs = _grad_sync_runs(tmp_path, "fsdp2", 2, [f"{s}:float32:{t}" for t in (F64, F32) for s in ("micro_step", "step")]
                           + [f"auto:float32:{F32}", f"step:bfloat16:{F32}"])
    for tail, atol in ((F64, 1e-10), (F32, 1e-6)):
        ref, step = runs[f"micro_step:float32:{tail}"], runs[f"step:float32:{tail}"]
        rs = ("reduce_scatter", "data_parallel", "torch." + tail.split(":")[0])
        assert step["counts"][rs] == _per_backward(ref, rs) * STEPS_OF_HELPER
        assert set(step["counts"]) == {rs}  # no all-reduce without replicas
        _check_same_weights(ref, step, atol, f"FSDP2, gradient_sync=step vs micro_step, {tail}")
    fp32 = runs[f"micro_step:float32:{F32}"]
    assert runs[f"auto:float32:{F32}"]["counts"] == fp32["counts"]
    bf16 = runs[f"step:bfloat16:{F32}"]
    assert set(bf16["counts"]) == {("reduce_scatter", "data_parallel", "torch.bfloat16")}
    assert bf16["losses"] == pytest.approx(fp32["losses"], rel=1e-5)


def test_grpo_micro_batch_loop_all_reduces_across_replicas_once_per_optimizer_step(tmp_path):
    """GRPO's own micro-batch loop under HSDP 2 x 1: gradient_sync=auto all-reduces across the replicas once per
    optimizer step (2 steps of 3 micro-batches) and trains as micro_step does (fp32 at the recipe's lr, 1e-6)."""
    out = tmp_path / "grpo.pt"
    torchrun(Path(__file__).parent / "helpers" / "grpo_grad_sync.py", out, "micro_step", "auto", nproc=2)
    runs = torch.load(out, weights_only=False)
    counts = {k: Counter((op, dim) for op, dim, dt, _ in r["calls"] if dt != "torch.int64") for k, r in runs.items()}
    units = load_preset("tiny").n_layers + 1  # FSDP2 units: the blocks and the root
    assert counts["auto"] == {("all_reduce", "replicate"): units * 2}
    assert counts["micro_step"] == {("all_reduce", "replicate"): units * 2 * 3}
    assert runs["auto"]["loss"] == pytest.approx(runs["micro_step"]["loss"], rel=1e-5)
    for name, w in runs["micro_step"]["weights"].items():
        torch.testing.assert_close(runs["auto"]["weights"][name], w, rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _check_tensor_parallel(one: dict, tp: dict, world: int, atol: float = 1e-5) -> None:
    """Tensor parallelism trains as one process: gradients, losses (1e-4) and every weight (`atol`: see
    `_check_layout`); its parameters really are sharded on the data and the tensor dimension."""
    assert tp["placements"][0].count("Shard(dim=0") == 2  # the embedding: FSDP2 rows (strided) of its vocabulary shard
    check_same_training(one, tp, 4, f"TP 2 on {world} processes", loss_rel=1e-4)
    _check_weights(one, tp, atol)


def test_tensor_parallel_two_ranks_match_one(tmp_path, one_process_recipe_lr):
    """hardware.tensor_parallel_size=2 on 2 processes (one data-parallel rank): the plan of moxin/tensor_parallel.py
    (sequence-parallel norms, GQA heads split 2 + 1 a rank, the loss head on gathered states) as one process."""
    _check_layout(tmp_path, one_process_recipe_lr, None, 2, "tp", _check_tensor_parallel)


@pytest.mark.slow
def test_tensor_parallel_two_by_two_data_parallel_match_one(tmp_path, one_process_recipe_lr, one_process_f64):
    """TP=2 x DP=2 on 4 gloo processes (FSDP2 over the data dimension of Lightning's 2-D mesh) as one process (fp32
    and float64, `_check_layout`)."""
    _check_layout(tmp_path, one_process_recipe_lr, one_process_f64, 4, "tp", _check_tensor_parallel)


@pytest.mark.slow
def test_tensor_parallel_compiled_blocks_give_the_eager_gradients(tmp_path):
    """TP=2 with compiled blocks under every recomputation policy (full: compiled, then checkpointed), and eager
    with full recomputation, gives the unsharded eager model's loss and gradients, the embedding's included (seen: all zero through compiled blocks
    when the residual stream was a plain tensor between them)."""
    out = tmp_path / "compile.json"
    torchrun(Path(__file__).parent / "helpers" / "tp_compile.py", out, timeout=600)
    for policy, (loss_err, grad_err) in json.loads(out.read_text()).items():
        assert loss_err < 1e-4 and grad_err < 1e-5, policy


@pytest.mark.slow
def test_tensor_parallel_with_hsdp_matches_one(tmp_path, one_process_recipe_lr, one_process_f64):
    """TP=2 under HSDP R=2 on 4 gloo processes (one 3-D (replicate, shard, tensor_parallel) mesh) as one process (fp32
    and float64, `_check_layout`)."""

    def check(one, tp, world, atol=1e-5):
        assert tp["placements"][0].startswith("(Replicate(), ")
        _check_tensor_parallel(one, tp, world, atol)

    _check_layout(tmp_path, one_process_recipe_lr, one_process_f64, 4, "tp_hsdp", check)


TP_MODEL = ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=6, n_kv_heads=2, head_dim=8, hidden_dim=48,
                       max_seq_len=16)


@pytest.mark.parametrize("tp, world, model, strategy, replicate, why", [
    (4, 8, TP_MODEL, "fsdp2", 1, "does not divide model.n_heads=6, model.n_kv_heads=2.*Values that fit: \\[1, 2\\]"),
    (2, 3, TP_MODEL, "fsdp2", 1, "does not divide world size .*=3"),
    (3, 6, TP_MODEL, "fsdp2", 1, "model.n_kv_heads=2"),
    (2, 4, TP_MODEL, "ddp_cpu", 1, "ModelParallelStrategy.*hardware=fsdp"),
    (2, 8, TP_MODEL, "fsdp2", 3, "Use replicate in \\[1, 2, 4\\]"),
    (0, 4, TP_MODEL, "fsdp2", 1, "an integer >= 1"),
])
def test_tensor_parallel_shapes_it_cannot_split_are_refused_with_the_fix(tp, world, model, strategy, replicate, why):
    with pytest.raises(ConfigError, match=f"hardware.tensor_parallel_size={tp}.*{why}"):
        check_tensor_parallel(tp, world, model, strategy, replicate)
    check_tensor_parallel(2, 4, TP_MODEL)  # heads, hidden and vocabulary it divides, under fsdp2: accepted


def test_tensor_parallel_forward_loss_head_and_generation_match_the_unsharded_model(tmp_path):
    """Under TP=2: logits and hidden states equal the unsharded model's, on rows of even and of odd length (padded
    inside the forward), so do a loss head's value and gradients on odd rows; greedy generation through the
    rolling cache gives the same tokens (each rank caching its own key/value head); a fused inference copy is
    refused with the fix."""
    out = tmp_path / "tp.json"
    torchrun(Path(__file__).parent / "helpers" / "tp_forward.py", out)
    r = json.loads(out.read_text())
    assert r["heads"] == [2, 1]  # local query / key-value heads of 4 / 2
    assert r["frozen_stays_frozen"]  # parallelize_module's new parameters keep a reference model's requires_grad
    assert all(r[k] for k in ("logits_8", "hidden_8", "logits_7", "hidden_7"))
    assert r["loss_7"] < 1e-4 and r["grad_err_7"] < 1e-5
    assert r["generated"] == r["generated_plain"] and len(r["generated"][0]) == 6
    assert "not supported under tensor parallelism" in r["fused"]


@pytest.mark.slow
def test_tensor_parallel_run_through_moxin_run_matches_one_process(tmp_path):
    """`python -m moxin.run hardware=fsdp_cpu hardware.tensor_parallel_size=2` on 2 processes (one data-parallel
    reader) against `hardware=cpu` on one: the same logged losses and target tokens, the same final weights, the
    same greedy sample; validation, the distributed checkpoint and the HF export run under TP."""
    from tests.helpers.compose import logged_train_losses
    from tests.helpers.tiny_overrides import TINY_MODEL

    root = Path(__file__).resolve().parents[1]
    common = TINY_MODEL + [
        "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256", "trainer.val_every_n_steps=3",
        "schedule.phases=[{name: a, seq_len: 64, tokens: 3072, mixture: {prose: 1, code: 1, cjk: 1}}]",
        "trainer.checkpoint_every_n_steps=3", "samples.prompts=[The history of]", "samples.max_new_tokens=6",
        "trainer.progress_bar=none", "data.val_tokens=1024", "hardware.num_workers=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    tp = torchrun("-m", "moxin.run", "hardware=fsdp_cpu", "hardware.tensor_parallel_size=2", *common,
                  f"out_dir={tmp_path / 'tp'}", "run_name=tp", cwd=root, env=env, timeout=600)
    one = subprocess.run([sys.executable, "-m", "moxin.run", "hardware=cpu", *common, f"out_dir={tmp_path / 'one'}",
                          "run_name=one"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = {k: logged_train_losses(tmp_path / k) for k in ("tp", "one")}
    assert len(losses["one"]) == 6 and losses["tp"] == pytest.approx(losses["one"], rel=1e-4)
    summaries = {k: json.loads((tmp_path / k / "summary.json").read_text()) for k in ("tp", "one")}
    assert summaries["tp"]["weights_checksum"] == pytest.approx(summaries["one"]["weights_checksum"], rel=1e-5)
    samples = [[ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("[sample")] for r in (tp, one)]
    assert samples[0] == samples[1] and len(samples[0]) == 1
    assert (tmp_path / "tp" / "hf" / "config.json").is_file()


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_under_tp_and_under_fsdp2(tmp_path):
    """A TP=2 run's distributed checkpoint (2-D DTensors, one data reader) resumes under TP=2 and under plain FSDP2
    on 2 processes (the model resharded, the reader's stream redistributed over two): both continue with the same
    losses."""
    from tests.helpers.compose import logged_train_losses
    from tests.helpers.tiny_overrides import TINY_MODEL

    root = Path(__file__).resolve().parents[1]
    common = TINY_MODEL + [
        "schedule.tokens_per_step=512", "schedule.micro_batch_tokens=256", "trainer.val_every_n_steps=3",
        "schedule.phases=[{name: a, seq_len: 64, tokens: 3072, mixture: {prose: 1, code: 1, cjk: 1}}]",
        "trainer.checkpoint_every_n_steps=3", "samples.prompts=[]", "trainer.progress_bar=none",
        "export_hf=false", "data.val_tokens=1024", "hardware.num_workers=0", "run_name=r"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    tp, fsdp = tmp_path / "tp", tmp_path / "fsdp"
    torchrun("-m", "moxin.run", "hardware=fsdp_cpu", "hardware.tensor_parallel_size=2", *common, "trainer.max_steps=3",
             f"out_dir={tp}", cwd=root, env=env, timeout=600)
    shutil.copytree(tp, fsdp)
    for out, size in ((tp, 2), (fsdp, 1)):
        torchrun("-m", "moxin.run", "hardware=fsdp_cpu", f"hardware.tensor_parallel_size={size}", *common,
                 "resume=auto", f"out_dir={out}", cwd=root, env=env, timeout=600)
    losses = {k: logged_train_losses(k) for k in (tp, fsdp)}
    assert sorted(losses[tp]) == list(range(6))
    assert losses[fsdp] == pytest.approx(losses[tp], rel=1e-4)


@pytest.mark.parametrize("tp, overrides, why", [
    (2, ["stage.lora.rank=4", "init_from=somewhere"], "does not support LoRA"),
    (2, ["hardware.parallel.float8=tensorwise"], "with hardware.parallel.float8=tensorwise on the CPU: .*gloo.*"
                                                 "float8=rowwise"),
    (4, ["model=moxin-7b", "hardware.devices=6"], "does not divide world size .*=6: .*Values that fit: \\[1, 2\\]"),
])
def test_tensor_parallel_runs_it_cannot_hold_are_refused_before_any_work(tp, overrides, why):
    from hydra.utils import instantiate

    from moxin.assemble import check_tensor_parallel_run
    from tests.helpers.compose import compose_config

    cfg = compose_config(["hardware=fsdp_cpu", f"hardware.tensor_parallel_size={tp}", *overrides])
    with pytest.raises(ConfigError, match=f"hardware.tensor_parallel_size={tp} {why}"):
        check_tensor_parallel_run(cfg, instantiate(cfg.model))
    for accepted in ([], ["stage=grpo", "data=grpo_arithmetic"],  # the sample run and GRPO's, float8 too
                     ["hardware.parallel.float8=rowwise", "hardware.parallel.float8_emulate=true"]):
        cfg = compose_config(["hardware=fsdp_cpu", "hardware.tensor_parallel_size=2", *accepted])
        check_tensor_parallel_run(cfg, instantiate(cfg.model))


@pytest.mark.parametrize("lockstep", ["1", "0"])
def test_generate_lockstep_keeps_ranks_in_step(tmp_path, lockstep):
    helper = Path(__file__).parent / "helpers" / "lockstep_generate.py"
    out = tmp_path / "gen.json"
    torchrun(helper, out, lockstep)
    r0, r1 = json.loads(out.read_text())
    assert r0["finished"] and len(r0["tokens"]) == 1  # rank 0's row still stops at its stop token
    assert not r1["finished"] and len(r1["tokens"]) == 12
    if lockstep == "1":
        assert r0["forwards"] == r1["forwards"]  # but it keeps running forwards with its ranks
    else:
        assert r0["forwards"] < r1["forwards"]  # what would hang FSDP2: ranks fall out of step


def test_fsdp2_validation_metrics_reduced_and_samples_generated(tmp_path):
    """Two FSDP2 processes, each holding half of the held-out rows, log the single-process val/loss (on both
    ranks: torchmetrics reduces the sums), and phase-end sample generations run sharded, in lockstep, with the
    same greedy text as one process."""
    helper = Path(__file__).parent / "helpers" / "fsdp_val_samples.py"
    res = {}
    for world in (1, 2):
        out = tmp_path / f"w{world}"
        torchrun(helper, out, nproc=world)
        res[world] = [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(world)]
    one, (r0, r1) = res[1][0], res[2]
    assert r0["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert r1["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert len(one["samples"]) == 2 and r0["samples"] == one["samples"]
    assert r1["samples"] == []  # rank 1 takes part in the decode but does not print


def test_dpo_fsdp2_two_processes_match_one(tmp_path):
    """DPO with a frozen reference under FSDP2 (2 gloo processes): the same gradients, losses and weights as one
    process on the same global batch of pairs in micro-batches of other sizes (pairs normalised across
    accumulation and ranks), and the first step's gradients those of the loss written out by hand."""
    check_dpo_fsdp_matches_one(tmp_path, "cpu")


@pytest.mark.slow
def test_dpo_tensor_parallel_pair_matches_one(tmp_path):
    """DPO with a frozen reference under TP=2 (both models planned over the pair, the reference kept frozen): the
    one-process gradients, losses and weights."""
    check_dpo_fsdp_matches_one(tmp_path, "cpu", "tp")


def test_grpo_two_processes_match_one(tmp_path):
    """GRPO's update on one fixed rollout, 2 DDP processes (one of which keeps fewer sequences) vs one: the same
    gradients in both PPO epochs, the first the on-policy loss's written out by hand, and the same weights and
    logged loss (which was logged divided by the world size), with micro-batches of 3 drawn from each rank's kept
    sequences."""
    helper = Path(__file__).parent / "helpers" / "grpo_equivalence.py"
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"grpo{world}.json"
        torchrun(helper, out, nproc=world)
        runs[world] = json.loads(out.read_text()) | torch.load(f"{out}.grads.pt", weights_only=True)
    one, two = runs[1], runs[2]
    assert (one["kept"], two["kept"]) == (12, 4)  # rank 0 of 2 keeps one group of its two
    check_same_training(one, two, 2, "2 DDP processes")
    assert one["loss_tokens"] == two["loss_tokens"] > 0


def test_fsdp2_checksum_after_forward_counts_the_fp32_shards(tmp_path):
    """A forward without a backward leaves FSDP2's root and last block gathered in bf16 (the summary's checksum
    runs after the last validation); weights_checksum must still sum the fp32 shards. On 2 H200s it summed the
    bf16 copies and the FSDP chain's hand-off check failed (17895.456 vs 17895.486)."""
    out = tmp_path / "sum.json"
    torchrun(Path(__file__).parent / "helpers" / "fsdp_checksum.py", out)
    r = json.loads(out.read_text())
    assert r["gathered_after_forward"]  # the situation is real: some parameters are plain (gathered) tensors
    assert r["before"] == pytest.approx(r["state_dict"], rel=1e-12)
    assert r["after"] == pytest.approx(r["state_dict"], rel=1e-12)


@pytest.mark.parametrize("policy", ["full", "mlp", "attention", True])
def test_recompute_policies_give_the_same_loss_gradients_and_names(policy):
    """Every recomputation policy gives the plain model's loss and gradients, and keeps the parameter names of
    the state dict (checkpoints and HF exports do not depend on the policy); unknown names are refused."""
    import torch

    from moxin.config import ModelConfig, ParallelConfig, Recompute
    from moxin.distributed import parallelize
    from moxin.model import Transformer

    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64,
                      sliding_window=6, max_seq_len=32)
    torch.manual_seed(0)
    plain, wrapped = Transformer(cfg), Transformer(cfg)
    wrapped.load_state_dict(plain.state_dict())
    parallelize(wrapped, ParallelConfig(activation_checkpointing=policy))
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    tokens = torch.randint(0, 64, (2, 12))
    pos = torch.cat([torch.arange(5), torch.arange(7)]).expand(2, 12)
    losses = [m(tokens, pos).float().logsumexp(-1).mean() for m in (plain, wrapped)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = {k: p.grad for k, p in plain.named_parameters()}
    for k, p in wrapped.named_parameters():
        torch.testing.assert_close(p.grad, grads[k.replace("_checkpoint_wrapped_module.", "")])
    assert ParallelConfig(activation_checkpointing=False).activation_checkpointing == Recompute.NONE
    with pytest.raises(ValueError, match="activation_checkpointing='some'.*none, mlp, attention, full"):
        ParallelConfig(activation_checkpointing="some")


def test_all_reduce_values_sum_max_min_over_two_ranks(tmp_path):
    """The one helper every stage and the evaluation reduce their counters with: mixed numbers, 0-d tensors and
    bools in one float64 collective; every rank gets the same result."""
    out = tmp_path / "reduce.json"
    torchrun(Path(__file__).parent / "helpers" / "reduce_values.py", out)
    r0, r1 = json.loads(out.read_text())
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["sum"] == r1["sum"] == [3.0, 30.0, 0.5, 1.0]
    assert r0["max"] == r1["max"] == [2.0, 20.0, 0.5, 1.0]
    assert r0["min"] == r1["min"] == [1.0, 10.0, 0.0, 0.0]


def test_all_reduce_values_without_a_process_group():
    import torch

    from moxin.distributed import all_reduce_values, rank_and_world

    assert rank_and_world() == (0, 1)
    assert all_reduce_values([1, torch.tensor(2.5), True], "cpu", "max") == [1.0, 2.5, 1.0]


def test_all_reduce_values_of_host_numbers_on_one_rank_never_touch_the_device(monkeypatch):
    """One rank, host numbers (a GPU stage's counts): the floats come straight back, with no copy to the device
    and back (on a GPU that read waits for all queued work); a device number still goes the device's way."""
    import torch

    import moxin.distributed as D

    def no_device(values, device, op="sum", group=None):
        raise AssertionError("went through the device")

    monkeypatch.setattr(D, "all_reduce_tensor", no_device)
    assert D.all_reduce_values([3, torch.tensor(0.1, dtype=torch.float32), False], "cuda") == [
        3.0, float(torch.tensor(0.1, dtype=torch.float32)), 0.0]
    with pytest.raises(AssertionError, match="through the device"):
        D.all_reduce_values([1.0, torch.zeros((), device="meta")], "cuda")


def test_torchrun_launches_again_only_after_a_teardown_abort(tmp_path):
    """The test launcher's retry: a launch whose only failure is a rank's teardown abort runs again, after
    before_retry (which clears what a non-idempotent launch wrote), at most TEARDOWN_LAUNCHES launches in all; a
    launch whose rank raised is not retried."""
    from tests.conftest import TEARDOWN_ABORT, TEARDOWN_LAUNCHES

    script = tmp_path / "flaky.py"
    script.write_text(
        "import os, sys\n"
        "from pathlib import Path\n"
        "mark = Path(sys.argv[1]) / f\"ran.{os.environ['RANK']}\"\n"
        "first = not mark.exists()\n"
        "mark.write_text('x')\n"
        "if sys.argv[2] == 'raise':\n"
        "    raise RuntimeError('a real failure')\n"
        "if (first or sys.argv[2] == 'always') and os.environ['RANK'] == '1':\n"
        f"    sys.stderr.write({TEARDOWN_ABORT!r} + '\\n'); sys.stderr.flush(); os._exit(134)\n")
    cleared = []
    with pytest.warns(UserWarning, match="aborted at teardown"):
        torchrun(script, tmp_path, "abort", before_retry=lambda: cleared.append(True))
    assert cleared == [True]
    with pytest.raises(AssertionError, match="a real failure"):
        torchrun(script, tmp_path, "raise", before_retry=lambda: cleared.append(True))
    assert cleared == [True]
    with pytest.warns(UserWarning, match="aborted at teardown"), pytest.raises(AssertionError, match="terminate"):
        torchrun(script, tmp_path, "always", before_retry=lambda: cleared.append(True))
    assert len(cleared) == 1 + TEARDOWN_LAUNCHES - 1  # every launch aborted: retried, then the test fails


@pytest.mark.parametrize("replicate, world, strategy, why", [
    (3, 4, "fsdp2", "does not divide the world size 4.*one of \\[1, 2, 4\\]"),
    (2, 2, "ddp_cpu", "shards with FSDP2.*hardware=fsdp"),
])
def test_hsdp_layouts_that_cannot_work_are_refused_with_the_fix(replicate, world, strategy, why):
    with pytest.raises(ConfigError, match=f"hardware.parallel.replicate={replicate}.*{why}"):
        ParallelConfig(replicate=replicate).check_world(world, strategy)
    ParallelConfig(replicate=replicate).check_world(replicate * 2)  # a world it divides, under fsdp2: accepted


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_hsdp_replicate_must_be_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="hardware.parallel.replicate"):
        ParallelConfig(replicate=bad)


@pytest.mark.parametrize("override", [{"reduce_dtype": "bfloat16"}, {"gradient_sync": "step"},
                                      {"gradient_sync": "micro_step"}])
def test_fsdp2_gradient_settings_under_another_strategy_are_refused_with_the_fix(override):
    (key, value), = override.items()
    with pytest.raises(ConfigError, match=f"hardware.parallel.{key}={value}.*'ddp_cpu'.*use hardware=fsdp"):
        ParallelConfig(**override).check_world(2, "ddp_cpu")
    ParallelConfig(**override).check_world(2, "fsdp2")
    ParallelConfig().check_world(2, "ddp_cpu")  # the defaults: nothing to refuse


@pytest.mark.parametrize("key, bad", [("reduce_dtype", "float16"), ("gradient_sync", "never")])
def test_fsdp2_gradient_settings_name_the_key_and_the_choices(key, bad):
    with pytest.raises(ValueError, match=f"hardware.parallel.{key}='{bad}': choose one of"):
        ParallelConfig(**{key: bad})

