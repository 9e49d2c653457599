"""Tensor parallelism (moxin/tensor_parallel.py) beyond training's forward and backward: the rolling-cache decode
that sample generations, evaluation and GRPO's rollouts call, on 2 gloo processes against the unsharded model.
The training equivalences (TP=2, TP=2 x DP=2, TP=2 x HSDP) are in tests/test_distributed.py."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun

HELPERS = Path(__file__).parent / "helpers"


def test_tensor_parallel_decode_gives_the_unsharded_tokens_past_the_window(tmp_path):
    """Under TP=2 `generate` gives the unsharded model's tokens, token for token, and its log-probs within 1e-5:
    greedy and sampled (the same seeded generator), left and right padding, chunked prefill, the eager and static
    paths, rows ending on stop tokens at different steps, every row running past the window so the rolling buffer
    wraps; the gathered copy GRPO's rollouts decode from (the DTensors' full_tensor()) gives them too, whole and
    split over the pair as the rollouts split it (2 rows a rank, `rows_of`, then `gather_rows`)."""
    out = tmp_path / "decode.json"
    torchrun(HELPERS / "tp_decode.py", out)
    r = json.loads(out.read_text())
    assert min(r["prompt_lens"]) + r["new"] > r["window"]  # every row wraps the ring buffer
    for case in ("greedy_left", "greedy_right_chunked", "sampled", "sampled_static", "greedy_stops"):
        plain = r[case]["plain"]
        for other in ("tp", "copy", "split"):
            got = r[case][other]
            assert got["tokens"] == plain["tokens"], f"{case}: {other}"
            assert got["finished"] == plain["finished"], f"{case}: {other}"
            for a, b in zip(got["logprobs"], plain["logprobs"]):
                assert a == pytest.approx(b, abs=1e-5), f"{case}: {other}"
    lens = [len(t) for t in r["greedy_stops"]["plain"]["tokens"]]
    assert min(lens) < r["new"] and max(lens) == r["new"]  # the stops end some rows early, not all
    assert r["sampled"]["plain"]["tokens"] != r["greedy_left"]["plain"]["tokens"]  # the sampled cases sampled


def test_generate_rows_of_a_split_batch_give_the_whole_batch_tokens():
    """`generate(rows_of=(first, total))`: a batch of 7 prompts decoded as 3 shares (3, 2 and 2 rows, each from
    the generator in the same state) gives the whole batch's tokens and stop flags, and its log-probs within 1e-5:
    greedy and sampled (temperature; top-k and top-p), the eager and static paths, stop tokens ending rows at
    different steps (a share whose rows all stopped ends its loop early). A share outside the batch is refused."""
    from moxin.model import Transformer, generate, sample_next
    from moxin.presets import load_preset

    cfg = load_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 6, 20, 9, 12, 5, 7)]
    shares = ((0, 3), (3, 5), (5, 7))
    cases = [dict(temperature=0.0), dict(temperature=1.0, decode="static"),
             dict(temperature=0.9, top_k=50, top_p=0.95)]
    for case in cases:
        kw = dict(decode="eager", return_logprobs=True) | case
        whole = generate(model, prompts, 12, generator=torch.Generator().manual_seed(5), **kw)
        stops = (whole.tokens[0][3], whole.tokens[4][7])  # tokens the batch emits mid-way: rows end apart
        whole = generate(model, prompts, 12, generator=torch.Generator().manual_seed(5), stop_tokens=stops, **kw)
        parts = [generate(model, prompts[a:b], 12, generator=torch.Generator().manual_seed(5), stop_tokens=stops,
                          rows_of=(a, len(prompts)), **kw) for a, b in shares]
        assert [t for p in parts for t in p.tokens] == whole.tokens, case
        assert [f for p in parts for f in p.finished] == whole.finished, case
        got = [x for p in parts for row in p.logprobs for x in row]
        assert got == pytest.approx([x for row in whole.logprobs for x in row], abs=1e-5), case
        lens = [len(t) for t in whole.tokens]
        assert min(lens) < 12 == max(lens), case
    assert whole.tokens != generate(model, prompts, 12, temperature=0.0).tokens  # the sampled cases sampled
    with pytest.raises(ValueError, match=r"rows_of=\(6, 7\)\): 2 rows from row 6 do not lie within 7 rows"):
        sample_next(torch.zeros(2, 5), 1.0, rows_of=(6, 7))


def test_generate_all_split_over_ranks_gives_the_whole_batches():
    """`generate_all(split=(rank, size))`, as the held-out and validation decodes use it under tensor parallelism:
    the shares of 2 and of 3 ranks (each batch of 4 split, a rank empty in the last batch of 1 when there are 3)
    together give the completions one call gives, greedy and sampled (one generator a batch, `generator_of`, so a
    share whose rows stop early leaves the next batch's draws alone), stop tokens ending rows at different steps,
    every row from exactly one rank. Refused: with lockstep, and sampled without generator_of."""
    from moxin.eval.generation import generate_all
    from moxin.model import Transformer
    from moxin.presets import load_preset

    cfg = load_preset("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (4, 9, 6, 3, 12, 5, 7, 8, 5)]
    for temperature in (0.0, 1.0):
        kw = dict(max_new_tokens=8, temperature=temperature, stop_tokens=(-1,), pad_id=0, batch_size=4,
                  generator_of=lambda b: torch.Generator().manual_seed(100 + b))
        whole = generate_all(model, prompts, **kw)
        kw["stop_tokens"] = (whole[0].tokens[2], whole[5].tokens[4])  # tokens emitted mid-way: rows end apart
        whole = generate_all(model, prompts, **kw)
        assert min(len(r.tokens) for r in whole) < 8 == max(len(r.tokens) for r in whole)
        for size in (2, 3):
            parts = [generate_all(model, prompts, split=(r, size), **kw) for r in range(size)]
            assert all(sum(p[i] is not None for p in parts) == 1 for i in range(len(prompts)))
            assert [next(p[i] for p in parts if p[i] is not None) for i in range(len(prompts))] == whole, (
                temperature, size)
    assert whole != generate_all(model, prompts, **(kw | {"temperature": 0.0}))  # the sampled case sampled
    with pytest.raises(ValueError, match="split .* cannot decode in lockstep"):
        generate_all(model, prompts, split=(0, 2), lockstep=True, **kw)
    with pytest.raises(ValueError, match="a sampled split needs generator_of"):
        generate_all(model, prompts, split=(0, 2), **(kw | {"generator_of": None}))


def test_row_share_splits_rows_into_contiguous_shares_a_row_apart():
    """row_share: contiguous shares that cover the rows once, the first n % T ranks a row more, empty ones when
    the rows are fewer than the ranks."""
    from moxin.tensor_parallel import row_share

    assert [row_share(9, r, 2) for r in range(2)] == [(0, 5), (5, 9)]
    assert [row_share(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [row_share(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    for n in range(12):
        for t in (1, 2, 3, 4):
            spans = [row_share(n, r, t) for r in range(t)]
            assert [i for a, b in spans for i in range(a, b)] == list(range(n))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_grpo_rollout_split_over_the_tensor_group_equals_one_process(tmp_path, world):
    """Under TP=2 (and TP=2 x DP=2 on 4 processes) the gathered copy's rollout splits each data rank's rows over its
    tensor pair (tests/helpers/tp_rollout.py): each rank decodes its share (5 and 4 of 9 rows, also in blocks of 4,
    4 and 1 where tensor rank 1 decodes nothing of the last), and both ranks of the pair then hold the rollout one
    process decodes alone from the same weights with that data rank's generator, token for token: sampled and
    greedy, the same completions, rewards, lengths and generated-token counts. `row_sums` adds one rank of each
    tensor pair: the data-parallel ranks'. The held-out and validation decode (`sampled_completions`, greedy and
    3 samples a record in batches of 4) splits each batch over the pair the same way: each rank decodes its
    share, both hold the completions and scores one process gives that data rank's records, and the reward is the
    mean over the data ranks' rows, each counted once."""
    import moxin.rewards as rewards_pkg
    from moxin.eval.heldout import sampled_completions
    from moxin.stages.grpo import GRPOStage
    from moxin.tensor_parallel import row_share
    from tests.helpers.tiny_grpo import ParityVerifier, tiny_grpo_stage

    out = tmp_path / "rollout.json"
    torchrun(HELPERS / "tp_rollout.py", out, nproc=world)
    r = json.loads(out.read_text())
    rewards_pkg.VERIFIERS["parity"] = ParityVerifier
    stage, _ = tiny_grpo_stage("parity", **r["stage"])
    stage.configure_model()
    stage.model.load_state_dict(torch.load(f"{out}.weights.pt", weights_only=True))
    ranks = r["ranks"]
    assert [(x["data_rank"], x["tensor_rank"]) for x in ranks] == [(d, t) for d in range(world // 2) for t in (0, 1)]
    for rank, x in enumerate(ranks):  # over the ranks of tensor rank t: 1 each, and their global ranks
        t = x["tensor_rank"]
        assert x["row_sums"] == [world // 2, sum(2 * d + t for d in range(world // 2))], rank
    for name, case in r["settings"].items():
        for k, v in (r["stage"] | {"gen_batch_size": None} | case).items():
            setattr(stage.cfg, k, v)
        inputs = []
        for d in range(world // 2):
            stage.generator_for = lambda s, rank=d, block=0: GRPOStage.generator_for(stage, s, rank, block)
            ro = stage.rollout(r["batch"], step=1)
            assert ro.stats["decoded_rows"] == 9
            pair = [x["cases"][name] for x in ranks if x["data_rank"] == d]
            assert [x["decoded_rows"] for x in pair] == [5, 4], name
            for got in pair:
                assert got["input_ids"] == ro.input_ids.tolist(), (name, d)
                assert got["completions"] == ro.completions, (name, d)
                assert (got["lengths"], got["rewards"], got["truncated"], got["gen_tokens"]) == (
                    ro.lengths.tolist(), ro.rewards.tolist(), ro.truncated.tolist(), ro.stats["gen_tokens"]), name
            inputs.append(ro.input_ids.tolist())
        if world == 4 and case["temperature"] > 0:
            assert inputs[0] != inputs[1], name  # the data ranks sampled with their own generators
    sampled, greedy = (ranks[0]["cases"][k]["input_ids"] for k in ("sampled", "greedy"))
    assert sampled != greedy and len(set(map(tuple, sampled))) > 3  # the sampled rows differ within a group
    # held-out / validation (sampled_completions): each data rank's records split over its pair in batches of 4
    stage.cfg.gen_batch_size = r["heldout"]["batch_size"]
    dp = world // 2
    for name, (samples, temperature, seed) in r["heldout"]["cases"].items():
        scores = []
        for d in range(dp):
            recs = r["batch"][d::dp]
            rows, texts, results = sampled_completions(stage, recs, samples, temperature, seed)
            n = len(recs) * samples
            assert rows == list(range(n)), name
            pair = [x["heldout"][name] for x in ranks if x["data_rank"] == d]
            for got in pair:
                assert (got["rows"], got["texts"]) == (rows, texts), (name, d)
                assert got["scores"] == [x.score for x in results], (name, d)
            share = [sum(-a + b for s in range(0, n, 4) for a, b in [row_share(min(4, n - s), t, 2)]) for t in (0, 1)]
            assert [x["decoded_rows"] for x in pair] == share and sum(share) == n, (name, d)
            scores += [x.score for x in results]
        for x in ranks:  # the mean over every data rank's rows, each row counted once
            assert x["heldout"][name]["reward"][0] == pytest.approx(sum(scores) / len(scores), abs=1e-12), name
    texts = {name: ranks[0]["heldout"][name]["texts"] for name in r["heldout"]["cases"]}
    assert len(set(texts["sampled"][:3])) > 1 and texts["sampled"][0] != texts["greedy"][0]  # sampling sampled


@pytest.mark.slow
def test_grpo_under_tensor_parallel_matches_one_process(tmp_path):
    """GRPO with TP=2 (tests/helpers/grpo_tp.py: a rollout step, off-policy updates against a KL reference, the
    held-out reward before and after) as one process: the same completions from the sharded policy in lockstep and from the gathered
    copy (a tensor group's ranks share the data-parallel rank's generator), the same rewards and held-out rewards,
    losses within 1e-4 (relative; the update counts a group's rows once), and the final weights within 1e-4: four
    Adam steps at lr 1e-2 turn the reductions' rounding into up to 3.1e-5 on weights of ~0.1 (measured; Adam's
    normalised step lr x m / sqrt(v) moves a weight whose gradient is near zero by up to lr whatever its size, so
    the summation order shows), where a missing or doubled row count would move them by the lr itself."""
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"grpo{world}.json"
        torchrun(HELPERS / "grpo_tp.py", out, nproc=world)
        runs[world] = json.loads(out.read_text()) | {"weights": torch.load(f"{out}.weights.pt", weights_only=True)}
    one, tp = runs[1], runs[2]
    assert tp["placements"][0].count("Shard(dim=0") == 2  # really sharded on the data and the tensor dimension
    assert one["steps"] == tp["steps"] == 4  # 2 epochs x 2 minibatches
    for r1, r2 in zip(one["rollouts"], tp["rollouts"], strict=True):
        assert r2["lockstep"] == r2["gather"] == r1["one"]
    for h1, h2 in zip(one["history"], tp["history"], strict=True):
        for key in ("grpo/reward_mean", "grpo/heldout_reward", "grpo/heldout_reward_final", "grpo/loss_tokens",
                    "grpo/completion_len_mean"):
            assert h2[key] == h1[key], key
        for key in ("train/loss", "grpo/pg_loss", "grpo/kl", "grpo/entropy", "grpo/clip_frac"):
            assert h2[key] == pytest.approx(h1[key], rel=1e-4, abs=1e-6), key
    assert one["history"][0]["grpo/skipped_update"] == 0.0  # the rewards varied: the update ran
    assert sorted(tp["weights"]) == sorted(one["weights"])
    for name, w in one["weights"].items():
        torch.testing.assert_close(tp["weights"][name], w, rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_evaluation_under_tensor_parallel_matches_one_process(tmp_path):
    """`moxin.eval.evaluate` in lockstep on a TP=2 model (tests/helpers/tp_eval.py) takes each item once on the tensor
    pair (both ranks feed the collective forward the same rows) and gives one process's per-item log-likelihoods
    (1e-4), greedy completions and samples (the data-parallel rank's generator) and metrics."""
    from moxin.eval import evaluate
    from moxin.tokenizer import load_tokenizer
    from tests.helpers.tp_eval import eval_cfg, model

    out = tmp_path / "eval.json"
    torchrun(HELPERS / "tp_eval.py", out)
    tp = json.loads(out.read_text())
    one = evaluate(model(), load_tokenizer("mistral"), eval_cfg())
    mc1, mc2 = one["tasks"]["mc"], tp["tasks"]["mc"]
    assert [i["index"] for i in mc2["items"]] == [i["index"] for i in mc1["items"]] == list(range(4))
    assert [x for i in mc2["items"] for x in i["loglik"]] == pytest.approx(
        [x for i in mc1["items"] for x in i["loglik"]], abs=1e-4)
    g1, g2 = one["tasks"]["math"], tp["tasks"]["math"]
    assert [i["index"] for i in g2["items"]] == list(range(3))
    assert [(i["greedy"], i["samples"]) for i in g2["items"]] == [(i["greedy"], i["samples"]) for i in g1["items"]]
    assert mc2["metrics"] == pytest.approx(mc1["metrics"], nan_ok=True)
    assert g2["metrics"] == pytest.approx(g1["metrics"], nan_ok=True)


def test_comm_projection_arithmetic_on_a_tiny_case_by_hand(tmp_path):
    """scripts/bench/comm_projection.py on a 236-parameter model, 2 nodes x 2 GPUs, 16 tokens a step in micro-steps
    of 4 tokens, against the bytes worked out by hand (ring collectives: (n - 1) / n of the size a rank, twice for
    an all-reduce; a ring over 2 nodes of 2 ranks puts half its bytes on the network)."""
    import sys

    from moxin.config import ModelConfig

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
    try:
        from comm_projection import Cluster, Layout, main, step_traffic
    finally:
        sys.path.pop(0)
    cfg = ModelConfig(vocab_size=8, dim=4, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=2, hidden_dim=8,
                      max_seq_len=16)
    assert cfg.num_params() == 236  # block 64 + 96 + 8, final norm 4, embedding and output 32 each
    cluster = Cluster(nodes=2, gpus_per_node=2)

    def sent(tp, replicate):
        r = step_traffic(cfg, Layout("x", tp, replicate), cluster, tokens_per_step=16, micro_batch_tokens=4)
        return r["accum"], r["nvlink_bytes"], r["network_bytes"]

    # FSDP2 over 4: all-gathers 3/4 x 2 bytes x (2 x 236 - 168) = 456, reduce-scatter 3/4 x 4 x 236 = 708; half out
    assert sent(1, 1) == (1, pytest.approx(582), pytest.approx(582))
    # HSDP 2 x 2: in-node 1/2 x 2 x 304 + 1/2 x 4 x 236 = 776; the all-reduce 2 x 1/2 x 4 x 118 = 472 between nodes
    assert sent(1, 2) == (1, pytest.approx(776), pytest.approx(472))
    # TP 2 in a node, FSDP2 over the 2 nodes, 2 micro-steps: FSDP 1/2 x 2 x (236 - 84) + 1/2 x 4 x 118 = 388 out;
    # TP 12 x 16 (blocks, recomputed) + 2 x 16 (embedding) + 16 + 1/2 x 64 (head) = 272 over NVLink, a micro-step
    assert sent(2, 1) == (2, pytest.approx(544), pytest.approx(776))
    with pytest.raises(ValueError, match="not a whole number of micro-steps"):
        step_traffic(cfg, Layout("x", 1, 1), cluster, tokens_per_step=10, micro_batch_tokens=4)

    def hsdp2(sync, reduce="float32"):  # HSDP 2 x 2 in micro-steps of 2 tokens: 2 a step
        r = step_traffic(cfg, Layout("x", 1, 2, sync, reduce), cluster, tokens_per_step=16, micro_batch_tokens=2)
        return r["accum"], r["nvlink_bytes"], r["network_bytes"]

    # gradient_sync: micro_step twice the one-micro-step HSDP above; auto the all-reduce once; step the
    # reduce-scatter once too (2 x 304 + 472); bf16: reduce-scatter 1/2 x 2 x 236, all-reduce 2 x 1/2 x 2 x 118
    assert hsdp2("micro_step") == (2, pytest.approx(1552), pytest.approx(944))
    assert hsdp2("auto") == (2, pytest.approx(1552), pytest.approx(472))
    assert hsdp2("step") == (2, pytest.approx(1080), pytest.approx(472))
    assert hsdp2("auto", "bfloat16") == (2, pytest.approx(1080), pytest.approx(236))
    res = main(["--nodes", "64", "--out", str(tmp_path / "p.json")])  # the recipe's table: it runs and adds up
    fsdp, hsdp = res["rows"][:2]
    assert res["world"] == 512 and fsdp["accum"] == hsdp["accum"] == 1
    assert hsdp["network_bytes"] < fsdp["network_bytes"] < 1.1 * hsdp["network_bytes"]
    # TP=8 + HSDP: 8 micro-steps, shards of one rank; the network carries only the replica all-reduce, 8x as often
    # when every micro-step syncs
    tp_hsdp, tp_hsdp_every = res["rows"][3], res["rows"][-1]
    assert (tp_hsdp["accum"], tp_hsdp_every["gradient_sync"]) == (8, "micro_step")
    assert tp_hsdp_every["network_bytes"] == pytest.approx(8 * tp_hsdp["network_bytes"])
