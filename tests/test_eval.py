"""moxin/eval: lm-eval's request construction and scoring rules, batching that changes nothing, few-shot
contexts, generation + verifier metrics, config errors, local/hub loading, the eval experiment and GRPO's
held-out reward."""

import json
import random

import pytest
import torch

from moxin.config import DataError, EvalConfig, EvalConfigError, TaskConfig
from moxin.data.sample import sample_path
from moxin.eval import build_mc_items, encode_pair, eval_config, evaluate, load_records, loglikelihoods, pass_at_k
from moxin.eval.loglik import encode_pairs
from moxin.model import Transformer
from moxin.presets import load_preset
from tests.helpers.forward_shapes import forward_shapes


@pytest.fixture(scope="module")
def model():
    """A small model over the real 32000-entry vocabulary (the sample tasks are tokenized with it)."""
    torch.manual_seed(0)
    cfg = load_preset("tiny", vocab_size=32000, attn_backend="sdpa", max_seq_len=512, sliding_window=None)
    return Transformer(cfg).eval()


MC = {"name": "mc", "path": str(sample_path("eval_mc")), "text": "Question: {question}\nAnswer:"}


@pytest.mark.parametrize("bos", [True, False])
def test_encode_pairs_batched_equals_encoding_one_by_one(tok, bos):
    """The scorer's batched, once-per-text tokenization gives every request the ids of tokenizing it alone: random
    contexts (empty ones, trailing spaces and newlines, CJK) shared by several options and repeated."""
    rng = random.Random(0)
    words = ["the", "cat", " sat", "Question:", "Answer:", "日本語", "  ", "\n", "x", "42", "é"]
    pairs = []
    for _ in range(60):
        context = "".join(rng.choice(words) + rng.choice(["", " ", "  "]) for _ in range(rng.randint(0, 8)))
        pairs += [(context, "".join(rng.choice(words) for _ in range(rng.randint(1, 4)))) for _ in range(4)]
    pairs += pairs[:50]
    assert any(c == "" for c, _ in pairs) and any(c.endswith(" ") for c, _ in pairs)

    def reference(context, continuation):  # lm-eval's _encode_pair, one text at a time
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        if not context:
            return [tok.bos_id], tok.encode(continuation)
        ctx = tok.encode(context, bos=bos)
        return ctx, tok.encode(context + continuation, bos=bos)[len(ctx):]

    assert encode_pairs(tok, pairs, bos=bos) == [reference(c, x) for c, x in pairs]


def test_encode_pair_moves_trailing_space_and_splits_the_whole_encoding(tok):
    """lm-eval's _encode_pair: the continuation's ids are the whole string's ids after the context's, and a trailing
    space of the context moves to the continuation (" Paris" is one piece after "is", not "▁" + "Paris")."""
    ctx, cont = encode_pair(tok, "The capital of France is ", "Paris", bos=True)
    assert ctx == tok.encode("The capital of France is", bos=True)
    assert ctx + cont == tok.encode("The capital of France is Paris", bos=True)
    assert cont == encode_pair(tok, "The capital of France is", " Paris")[1]
    assert tok.decode(cont) == "Paris" and len(cont) == 1
    assert encode_pair(tok, "", "Paris")[0] == [tok.bos_id]  # empty context: the prefix token alone
    assert encode_pair(tok, "x", " y", bos=False)[0] == tok.encode("x")


def _reference_loglik(model, ctx, cont):
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids[:, :-1]).float().log_softmax(-1)[0]
    n = len(ctx) - 1
    lp = logp[n:, :].gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)
    return float(lp.sum()), bool((logp[n:].argmax(-1) == torch.tensor(cont)).all())


def test_loglikelihoods_match_one_request_at_a_time_whatever_the_batching(model, tok):
    reqs = [encode_pair(tok, c, x) for c, x in [("Question: Why is the sky blue?\nAnswer:", " Rayleigh scattering"),
                                                ("Hi", " there"), ("A much longer context " * 5, " end"),
                                                ("Numbers:", " 1 2 3 4 5 6")]]
    ref = [_reference_loglik(model, c, x) for c, x in reqs]
    for budget, rows in [(16384, 64), (40, 2), (1, 1)]:  # one batch, small batches, one row each
        got = loglikelihoods(model, reqs, batch_tokens=budget, max_batch=rows)
        assert [r.logprob for r in got] == pytest.approx([r[0] for r in ref], abs=2e-4)
        assert [r.is_greedy for r in got] == [r[1] for r in ref]
        assert [r.n_tokens for r in got] == [len(x) for _, x in reqs]
    # a continuation made of the model's own greedy tokens is greedy
    ctx = tok.encode("Once upon a time", bos=True)
    greedy = model(torch.tensor([ctx])).argmax(-1)[0, -1].item()
    assert loglikelihoods(model, [(ctx, [greedy])])[0].is_greedy


@pytest.mark.parametrize("share_prefixes", [False, True])
def test_loglikelihoods_share_one_row_per_distinct_input(model, tok, share_prefixes):
    """Repeated requests and single-token options after one context are scored from one model input each (as
    lm-eval's Collator does), and every request still gets its own answer, in order. Packed as prefix trees, the
    context is read once for all options: one row holding ctx + " a deep"."""
    ctx = tok.encode("The colour of the sky is", bos=True)
    opts = [[tok.encode("blue")[0]], [tok.encode("green")[0]], tok.encode(" a deep blue")]
    reqs = [(ctx, o) for o in opts] * 3  # two options share an input (ctx); everything is repeated 3 times
    ref = [_reference_loglik(model, c, x) for c, x in reqs]
    with forward_shapes(model) as shapes:
        got = loglikelihoods(model, reqs, share_prefixes=share_prefixes)
    assert [r.logprob for r in got] == pytest.approx([r[0] for r in ref], abs=2e-4)
    assert [r.is_greedy for r in got] == [r[1] for r in ref]
    longer = len(ctx) + len(opts[2]) - 1  # ctx + " a deep"
    assert shapes == ([(1, -(-longer // 16) * 16)] if share_prefixes else [(2, longer)])  # packed: padded to 16


def test_loglikelihoods_truncate_from_the_left_like_lm_eval(model, tok):
    ctx, cont = list(range(3, 40)), [7, 8, 9]
    got = loglikelihoods(model, [(ctx, cont)], max_len=16)[0]
    full = (ctx + cont)[-17:]
    assert got.logprob == pytest.approx(_reference_loglik(model, full[:-3], cont)[0], abs=2e-4)


def test_acc_and_acc_norm_follow_lm_eval_rules(model, tok):
    res = evaluate(model, tok, {"tasks": [MC], "verifier_workers": 0})["tasks"]["mc"]
    recs = load_records(MC["path"])
    assert res["n"] == len(recs) == 24
    for it, rec in zip(res["items"], recs):
        lls = it["loglik"]
        lens = [len(c) for c in rec["choices"]]
        assert it["pred"] == max(range(4), key=lambda j: (lls[j], -j))  # np.argmax: first maximum
        assert it["pred_norm"] == max(range(4), key=lambda j: (lls[j] / lens[j], -j))  # chars of the option text
        assert it["acc"] == float(it["pred"] == rec["gold"]) and it["acc_norm"] == float(it["pred_norm"] == rec["gold"])
    assert res["metrics"]["acc"] == pytest.approx(sum(i["acc"] for i in res["items"]) / 24)
    # the (context, continuation) of option j is (text, " " + option): scoring it alone gives the same number
    it0 = res["items"][0]
    ctx, cont = encode_pair(tok, f"Question: {recs[0]['question']}\nAnswer:", " " + recs[0]["choices"][2])
    assert it0["loglik"][2] == pytest.approx(_reference_loglik(model, ctx, cont)[0], abs=2e-4)


def test_fewshot_contexts_are_seeded_exclude_the_item_and_use_lm_eval_layout():
    task = TaskConfig(**MC, num_fewshot=3)
    recs = load_records(MC["path"])
    a, b = build_mc_items(task, recs), build_mc_items(task, recs)
    assert [i.contexts for i in a] == [i.contexts for i in b]  # fixed seed
    other = build_mc_items(TaskConfig(**MC, num_fewshot=3, fewshot_seed=7), recs)
    assert [i.contexts for i in a] != [i.contexts for i in other]
    for it, rec in zip(a, recs):
        shots = it.contexts[0].split("\n\n")
        assert len(shots) == 4 and shots[-1] == f"Question: {rec['question']}\nAnswer:"
        for s in shots[:3]:
            q = next(r for r in recs if s.startswith(f"Question: {r['question']}\nAnswer: "))
            assert q is not rec and s == f"Question: {q['question']}\nAnswer: {q['choices'][q['gold']]}"
        assert it.continuations == [" " + c for c in rec["choices"]]
    # lm-eval's draw: one Random(seed) for the task, n + 1 per item in item order, the item itself dropped
    import random

    rnd = random.Random(1234)
    for it, rec in zip(a, recs):
        drawn = [recs[j] for j in rnd.sample(range(len(recs)), 4) if recs[j] != rec][:3]
        assert it.contexts[0].startswith(f"Question: {drawn[0]['question']}\nAnswer: ")
    first = build_mc_items(TaskConfig(**MC, num_fewshot=2, fewshot_sampler="first_n"), recs)
    assert first[0].contexts[0].startswith(f"Question: {recs[1]['question']}")  # item 0 itself is skipped
    assert first[5].contexts[0].startswith(f"Question: {recs[0]['question']}")


def test_winogrande_preset_scores_one_continuation_after_each_filled_context():
    rec = {"sentence": "The trophy did not fit in the suitcase because the _ was too big.", "option1": "trophy",
           "option2": "suitcase", "answer": "1"}
    it = build_mc_items(TaskConfig(name="w", preset="winogrande"), [rec])[0]
    assert it.contexts == ["The trophy did not fit in the suitcase because the trophy",
                           "The trophy did not fit in the suitcase because the suitcase"]
    assert it.continuations == [" was too big."] * 2 and it.gold == 0
    hs = {"activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he", "endings": ["x [title] y", "z"],
          "label": "1"}
    it = build_mc_items(TaskConfig(name="h", preset="hellaswag"), [hs])[0]
    assert it.contexts[0] == "Baking: A man mixes flour. He" and it.continuations == [" x. y", " z"] and it.gold == 1


def test_parquet_and_jsonl_give_the_same_items(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = load_records(MC["path"])
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "mc.parquet")
    a = build_mc_items(TaskConfig(**MC), recs)
    b = build_mc_items(TaskConfig(**{**MC, "path": str(tmp_path / "mc.parquet")}), load_records(str(tmp_path / "mc.parquet")))
    assert [(i.contexts, i.continuations, i.gold) for i in a] == [(i.contexts, i.continuations, i.gold) for i in b]


def test_hub_task_that_cannot_be_reached_names_the_dataset():
    from tests.conftest import run_hub_offline

    out = run_hub_offline(
        "from moxin.config import DataError\nfrom moxin.eval import load_records\n"
        "try:\n    load_records('allenai/ai2_arc', split='test', hub_config='ARC-Easy', name='arc_easy')\n"
        "except DataError as e:\n    print(e)\n")
    assert "'arc_easy'" in out and "allenai/ai2_arc" in out and "local jsonl / parquet" in out


def test_config_errors_name_the_task_and_the_fix():
    with pytest.raises(EvalConfigError, match="kind='mcq'.*multiple_choice"):
        TaskConfig(name="t", path="x", kind="mcq")
    with pytest.raises(EvalConfigError, match="every k in \\[1, 8\\].*samples=4"):
        TaskConfig(name="t", path="x", kind="generation", samples=4, k=[1, 8])
    with pytest.raises(EvalConfigError, match="unknown key\\(s\\) \\['choice'\\]"):
        EvalConfig(tasks=[{"name": "t", "path": "x", "choice": "a"}])
    with pytest.raises(EvalConfigError, match="unknown preset 'arc'"):
        TaskConfig(name="t", preset="arc")
    with pytest.raises(EvalConfigError, match="eval.after='epoch'"):
        EvalConfig(tasks=[MC], after="epoch")
    with pytest.raises(EvalConfigError, match="verifier='maths'"):
        eval_config({"tasks": [{"name": "t", "path": "x", "kind": "generation", "verifier": "maths"}]})
    with pytest.raises(DataError, match="text template .* needs field 'prompt'"):
        build_mc_items(TaskConfig(name="t", path="x", text="{prompt}"), load_records(MC["path"]))


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - (3 * 2) / (5 * 4))


def test_generation_task_scores_completions_with_the_verifier(model, tok, monkeypatch):
    """pass@1 from greedy, pass@k from samples: the engine's completions are scored against the answers."""
    import moxin.eval.runner as runner
    from moxin.eval.generation import GenRecord

    recs = load_records(str(sample_path("eval_math")))[:6]
    seen = {}

    def fake_generate_all(model_, prompts, *, temperature, **kw):  # right on even problems, wrong on odd ones
        seen[temperature] = prompts
        per = len(prompts) // 6
        return [GenRecord(tok.encode(f"Answer: {recs[i // per]['answer'] if (i // per) % 2 == 0 or (per > 1 and i % per == 0) else 99}")
                          + [tok.eos_id], True) for i in range(len(prompts))]

    monkeypatch.setattr(runner, "generate_all", fake_generate_all)
    task = {"name": "math", "kind": "generation", "path": str(sample_path("eval_math")), "verifier": "exact",
            "limit": 6, "samples": 4, "k": [1, 4], "temperature": 1.0}
    res = evaluate(model, tok, {"tasks": [task], "verifier_workers": 0})["tasks"]["math"]
    m = res["metrics"]
    assert m["pass@1"] == pytest.approx(0.5) and m["no_answer"] == 0.0
    assert m["pass@1_sampled"] == pytest.approx((3 * 1.0 + 3 * 0.25) / 6) and m["pass@4_sampled"] == 1.0
    assert len(seen[0.0]) == 6 and len(seen[1.0]) == 24
    # prompts are the GRPO data module's rendering: chat template + the exact verifier's instruction
    from moxin.data.grpo_data import PromptDataModule

    dm = PromptDataModule(source="arithmetic", steps=1, tokenizer=tok)
    assert seen[0.0][0] == dm.render({"problem": recs[0]["problem"], "answer": recs[0]["answer"]})["prompt_ids"]


def test_generation_through_the_engine_matches_generate(model, tok):
    from moxin.model.generate import generate

    task = {"name": "math", "kind": "generation", "path": str(sample_path("eval_math")), "verifier": "exact",
            "limit": 3, "max_new_tokens": 5, "chat": False}
    res = evaluate(model, tok, {"tasks": [task], "verifier_workers": 0})["tasks"]["math"]
    recs = load_records(task["path"])[:3]
    prompts = [tok.encode(f"{r['problem']}\n\nEnd with 'Answer: N'.", bos=True) for r in recs]
    out = generate(model, prompts, 5, temperature=0.0, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id)
    assert [i["greedy"] for i in res["items"]] == [tok.decode(t) for t in out.tokens]
    assert res["metrics"]["pass@1"] == 0.0 and res["metrics"]["truncated"] == 1.0  # random weights: no answer


def test_eval_experiment_writes_eval_json_and_logs(tmp_path, model, tok):
    """python -m moxin.run +experiment=eval init_from=<HF folder>: composed by Hydra, model config from config.json."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from moxin.model.hf import save_hf
    from moxin.run import CONF_DIR, evaluate_only

    save_hf(model, tmp_path / "hf")
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=eval", f"init_from={tmp_path / 'hf'}",
                                                       f"out_dir={tmp_path / 'out'}", "run_name=t",
                                                       "eval.verifier_workers=0"])
    with open_dict(cfg):
        cfg.eval.tasks[0].limit = 4
        cfg.eval.tasks[1].limit = 2
        cfg.eval.tasks[1].samples = 2
        cfg.eval.tasks[1].k = [1, 2]
        cfg.eval.tasks[1].max_new_tokens = 3
    value = evaluate_only(cfg)
    res = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert res["tasks"]["sample_mc"]["n"] == 4 and res["tasks"]["sample_math"]["n"] == 2
    direct = evaluate(model, tok, {"tasks": [{**MC, "limit": 4}], "verifier_workers": 0})["tasks"]["mc"]
    assert [x for i in res["tasks"]["sample_mc"]["items"] for x in i["loglik"]] == pytest.approx(
        [x for i in direct["items"] for x in i["loglik"]], abs=1e-4)
    assert value == res["tasks"]["sample_mc"]["metrics"]["acc"]
    csv = next((tmp_path / "out" / "logs").rglob("metrics.csv")).read_text()
    assert "eval/sample_mc/acc_norm" in csv and "eval/sample_math/pass@2_sampled" in csv


def test_eval_experiment_without_init_from_says_what_to_give():
    from hydra import compose, initialize_config_dir

    from moxin.run import CONF_DIR, evaluate_only

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=eval"])
    with pytest.raises(ValueError, match="needs init_from=<a Hugging Face model folder"):
        evaluate_only(cfg)


def test_grpo_heldout_prompts_are_outside_the_rl_pool_and_scored_greedily(tok):
    from moxin.config import GRPOConfig
    from moxin.data.grpo_data import PromptDataModule
    from moxin.eval.heldout import heldout_records, heldout_reward
    from moxin.stages.grpo import GRPOStage

    dm = PromptDataModule(source="arithmetic", steps=4, prompts_per_step=4, tokenizer=tok, seed=3,
                          task={"ops": ["+"], "pool": 16, "solution": "answer"})
    recs = heldout_records(dm, 20)
    pool = {tuple(r["prompt_ids"]) for s in range(4) for r in dm._global_batch(s)}
    assert len(recs) == 20 and not pool & {tuple(r["prompt_ids"]) for r in recs}
    assert heldout_records(dm, 20) == recs  # fixed
    # a reserved part (data.task.heldout): the RL stream, unbounded, and the warm-up's solutions never hold one
    free = PromptDataModule(source="arithmetic", steps=40, prompts_per_step=8, tokenizer=tok, seed=3,
                            task={"ops": ["+"], "max_digits": 1, "heldout": 0.25, "solution": "answer"})
    held = heldout_records(free, 64)  # the whole part: about 25 sums
    seen = {r["messages"][-1]["content"] for s in range(40) for r in free._global_batch(s)}
    warm = {c["messages"][-2]["content"] for c in free.solution_conversations(400)}
    assert 10 <= len(held) <= 40 and len(seen) > 50 and len(warm) > 50
    assert not {r["messages"][-1]["content"] for r in held} & (seen | warm)
    with pytest.raises(ValueError, match="data.task.heldout"):  # an unbounded stream and no reserved part
        heldout_records(PromptDataModule(source="arithmetic", steps=2, prompts_per_step=4, tokenizer=tok, seed=3,
                                         task={"ops": ["+"]}), 4)
    stage = GRPOStage(load_preset("tiny", vocab_size=32000, attn_backend="sdpa"), tokenizer=tok,
                      grpo=GRPOConfig(max_new_tokens=4, verifier_workers=0, heldout_every=2))
    stage.configure_model()
    m = heldout_reward(stage, recs[:4])
    assert m == {"grpo/heldout_reward": 0.0, "grpo/heldout_no_answer_frac": 1.0}  # random weights answer nothing
    with pytest.raises(ValueError, match="heldout_source"):
        heldout_records(PromptDataModule(source=str(sample_path("eval_math")), prompts_per_step=4, tokenizer=tok), 4)
    from_file = heldout_records(PromptDataModule(source=str(sample_path("eval_math")), prompts_per_step=4,
                                                 tokenizer=tok), 4, source=str(sample_path("eval_math")))
    assert [r["answer"] for r in from_file] == [r["answer"] for r in load_records(str(sample_path("eval_math")))[:4]]


def test_training_run_with_eval_after_stage_gets_the_callback_and_it_logs(tmp_path, model, tok):
    """+eval=sample eval.after=stage adds EvalCallback to the trainer; at the end of fit it evaluates the stage's
    model, logs eval/<task>/<metric> at the current step and writes every evaluation to eval.json."""
    from types import SimpleNamespace

    from hydra import compose, initialize_config_dir
    from lightning.pytorch.loggers import CSVLogger

    from moxin.callbacks.evaluation import EvalCallback
    from moxin.assemble import assemble
    from moxin.run import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["+experiment=sft", "+eval=sample", "eval.after=stage",
                                                       f"out_dir={tmp_path / 'run'}", "run_name=t"])
    trainer = assemble(cfg).trainer
    cbs = [c for c in trainer.callbacks if isinstance(c, EvalCallback)]
    assert len(cbs) == 1 and cbs[0].cfg.after == "stage" and [t.name for t in cbs[0].cfg.tasks] == ["sample_mc", "sample_math"]

    cb = EvalCallback({"tasks": [{**MC, "limit": 3}], "after": "stage", "verifier_workers": 0}, tok, str(tmp_path))
    logger = CSVLogger(str(tmp_path), name="logs")
    fake = SimpleNamespace(strategy=object(), world_size=1, is_global_zero=True, global_step=7, logger=logger,
                           current_epoch=0)
    cb.on_train_epoch_end(fake, SimpleNamespace(model=model))  # after=stage: not at phase ends
    assert cb.history == []
    cb.on_train_end(fake, SimpleNamespace(model=model))
    logger.save()
    saved = json.loads((tmp_path / "eval.json").read_text())["evaluations"]
    assert len(saved) == 1 and saved[0]["step"] == 7 and saved[0]["tasks"]["mc"]["n"] == 3
    md = (tmp_path / "eval.md").read_text()  # the table of each evaluation, under its moment
    assert md.startswith("## end of stage, step 7\n\n| task | lm-eval task |") and "| mc | mc | 0 | acc |" in md
    import csv

    rows = list(csv.DictReader((tmp_path / "logs" / "version_0" / "metrics.csv").open()))
    assert [(r["step"], float(r["eval/mc/acc"])) for r in rows] == [("7", saved[0]["tasks"]["mc"]["metrics"]["acc"])]


def test_a_resumed_run_keeps_the_recorded_evaluations_up_to_its_step_and_refuses_an_unreadable_record(tmp_path, tok):
    from types import SimpleNamespace

    from moxin.callbacks.evaluation import EvalCallback
    from moxin.config import MoxinUserError

    cb = EvalCallback({"tasks": [{**MC, "limit": 3}], "after": "phase", "verifier_workers": 0}, tok, str(tmp_path))
    (tmp_path / "eval.json").write_text(json.dumps({"evaluations": [{"step": 6}, {"step": 8}, {"step": 9}]}))
    cb.on_train_start(SimpleNamespace(global_step=8), None)  # resumed at step 8: the one at 9 is made again
    assert cb.history == [{"step": 6}, {"step": 8}]
    cb.on_train_start(SimpleNamespace(global_step=0), None)  # a run from the start keeps none
    assert cb.history == []
    (tmp_path / "eval.json").write_text("{half")
    with pytest.raises(MoxinUserError, match="eval.json: cannot read the run's earlier evaluations.*move the file away"):
        cb.on_train_start(SimpleNamespace(global_step=8), None)
