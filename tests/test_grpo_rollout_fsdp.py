"""GRPO under FSDP2 (2 gloo processes, one run shared by the first tests): ranks with different kept counts stay
in step; the gathered copy decodes, rank by rank, the tokens of the unsharded one-process rollout from the same
weights and generators, and the tokens of the lockstep path through the sharded model; its refresh is logged and
its memory freed after the rollout. The copy's storage freeing, the
kept copy on one device, the auto choice and the memory figures it uses are checked in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import moxin.rewards as rewards_pkg
import moxin.stages.grpo as grpo_mod
from moxin.config import GRPOConfig
from moxin.config.grpo import ShardedRollout
from moxin.data.grpo_data import PromptDataModule
from moxin.presets import load_preset
from moxin.stages.grpo import (GRPOStage, allocate_storage, free_storage, gather_fits, kv_cache_bytes,
                               rollout_copy_bytes)
from tests.conftest import torchrun
from tests.helpers.tiny_grpo import FSDP_GRPO, ParityVerifier, tiny_grpo_stage


@pytest.fixture(autouse=True)
def _verifier(monkeypatch):
    monkeypatch.setitem(rewards_pkg.VERIFIERS, "parity", ParityVerifier)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """tests/helpers/grpo_fsdp.py's run (2 FSDP2 gloo processes, 2 rollout steps): its JSON and output path."""
    out = tmp_path_factory.mktemp("grpo_fsdp") / "grpo.json"
    torchrun(Path(__file__).parent / "helpers" / "grpo_fsdp.py", out, timeout=400)
    return json.loads(out.read_text()), out


def test_fsdp2_ranks_with_different_kept_counts_stay_in_step(fsdp_run):
    """Two FSDP2 processes, one of which filters every group: off-policy updates with a sharded KL reference run
    to the end (every collective forward matched by the other rank), and the rank with data still updates."""
    res, _ = fsdp_run
    assert res["ref_sharded"]
    assert len(res["history"]) == 2
    assert any(h["grpo/skipped_update"] == 0.0 for h in res["history"])
    assert res["steps"] > 0


def test_gathered_rollout_equals_the_unsharded_one_and_lockstep_token_for_token(fsdp_run):
    """Each rank's rollout through the gathered copy (decoding alone) = the same prompts decoded in one unsharded
    process from the same weights with that rank's generator = the lockstep rollout through the sharded model,
    at both steps (the second after an update: the copy was gathered again); the copy is freed after each
    rollout and grpo/refresh_s logged."""
    res, out = fsdp_run
    stage, tok = tiny_grpo_stage("parity", **(FSDP_GRPO | {"kl_coef": 0.0}))  # the same generation settings
    stage.configure_model()
    for step, ranks in enumerate(res["rollouts"]):
        stage.model.load_state_dict(torch.load(f"{out}.step{step}.pt"))  # the policy as that rollout saw it
        for rank, rec in enumerate(ranks):
            gathered, lockstep = rec["gather"], rec["lockstep"]
            assert gathered["policy"] == [False] and gathered["lockstep"] == [False]  # the copy, alone
            assert lockstep["policy"] == [True] and lockstep["lockstep"] == [True]
            assert gathered["refresh_s"] > 0 and rec["copy_freed"]
            batch = [{"prompt_ids": p, "answer": "0"} for p in rec["prompts"]]
            stage.generator_for = lambda s, r=rank, block=0: GRPOStage.generator_for(stage, s, r, block)  # rank r's
            ref = stage.rollout(batch, step)  # no trainer: unsharded, the policy itself
            assert ref.input_ids.tolist() == gathered["input_ids"] == lockstep["input_ids"], (step, rank)
            assert ref.lengths.tolist() == gathered["lengths"] == lockstep["lengths"]
    assert len(res["rollouts"]) == 2 and all(h["grpo/refresh_s"] > 0 for h in res["history"])
    w0, w1 = (torch.load(f"{out}.step{s}.pt") for s in (0, 1))
    assert any(not torch.equal(w0[n], w1[n]) for n in w0)  # the second rollout's weights were updated ones


def test_freed_copy_comes_back_with_its_fusion_and_refreshed_values():
    """free_storage releases every distinct storage (fused projections share one); allocate_storage brings the
    same tensors back, views and fusion intact, and a refresh fills them."""
    from moxin.model import Transformer

    torch.manual_seed(0)
    cfg = load_preset("tiny")
    policy = Transformer(cfg)
    copy = Transformer(cfg).requires_grad_(False).fuse_projections()
    before = [p for p in copy.parameters()]
    free_storage(copy)
    assert all(p.untyped_storage().nbytes() == 0 for p in copy.parameters())
    allocate_storage(copy)
    with torch.no_grad():
        for (n, p), (_, q) in zip(copy.named_parameters(), policy.named_parameters()):
            p.copy_(q)
    assert all(a is b for a, b in zip(before, copy.parameters()))
    assert all(b.attention._views_fused() and b.feed_forward._views_fused() for b in copy.layers)
    x = torch.randint(0, cfg.vocab_size, (2, 5))
    torch.testing.assert_close(copy(x), policy(x))


def test_one_device_keeps_the_copy_unless_told_and_logs_its_refresh():
    """On one device the copy's memory stays between rollouts by default (rollout_copy_keep: null), is freed
    after each with rollout_copy_keep: false (and comes back for the next), and refresh_s is reported."""
    stage, tok = tiny_grpo_stage("parity", max_new_tokens=3, rollout_copy=True)
    stage.configure_model()
    batch = PromptDataModule(source="arithmetic", prompts_per_step=1, steps=1, tokenizer=tok, seed=0,
                             max_prompt_tokens=64).rank_batches(0)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ro = stage.rollout(batch, step=0)
        assert ro.stats["refresh_s"] > 0 and grpo_mod.copy_allocated(stage._rollout_copy)
        stage.cfg.rollout_copy_keep = False
        first = stage.rollout(batch, step=0)
        assert not grpo_mod.copy_allocated(stage._rollout_copy)
        again = stage.rollout(batch, step=0)
    assert first.input_ids.tolist() == again.input_ids.tolist() == ro.input_ids.tolist()


def test_sharded_rollout_option_and_memory_figures():
    """stage.grpo.sharded_rollout names gather, lockstep or auto (a bad value names the key); the copy of
    Moxin-7B in bf16 and its cache have the sizes docs/performance.md accounts with, and auto's rule gathers on
    8 80 GB GPUs (about 46 GiB free at the rollout) but not on 2 with the KL reference (about 2 GiB)."""
    with pytest.raises(ValueError, match="stage.grpo.sharded_rollout='all': choose one of auto, gather, lockstep"):
        GRPOConfig(sharded_rollout="all")
    assert GRPOConfig(sharded_rollout="gather").sharded_rollout is ShardedRollout.GATHER
    cfg = load_preset("moxin-7b")
    assert rollout_copy_bytes(cfg, torch.bfloat16) == 2 * 8_114_180_096
    # 36 layers x k and v x 8 kv heads x 128 x 2 bytes = 144 KiB a slot; the 4096-slot window caps it
    assert kv_cache_bytes(cfg, 1, 3072, 2) == 3072 * 147_456
    assert kv_cache_bytes(cfg, 64, 17_408, 2) == 64 * 4096 * 147_456
    gib = 2**30
    assert gather_fits(cfg, torch.bfloat16, 64, 17_408, 76 * gib - 15 * gib)  # 8 GPUs: state + reference 15 GiB
    assert not gather_fits(cfg, torch.bfloat16, 64, 17_408, 76 * gib - 61 * gib)  # 2 GPUs: 61 GiB
    assert not gather_fits(cfg, torch.bfloat16, 16, 3072, 76 * gib - 61 * gib)
    assert gather_fits(cfg, torch.bfloat16, 16, 3072, 76 * gib - 61 * gib, copy_held=True)  # the cache alone
