"""Held-out reward for GRPO: greedy completions of a fixed prompt set that RL never trains on, scored by the
stage's verifier, every ``stage.grpo.heldout_every`` rollout steps.

Why: ``grpo/reward_mean`` comes from the prompts being trained on, with sampling, and rises when the policy
memorises a small pool as much as when it learns the task; a fixed held-out set decoded greedily is a curve of
generalisation. Where the prompts come from: docs/modules.md, "eval/heldout.py".
"""

from __future__ import annotations

from moxin.data.arithmetic import ArithmeticTask
from moxin.distributed import all_reduce_values, is_sharded, rank_and_world
from moxin.eval.generation import generate_all, score_generations
from moxin.eval.tasks import load_records

__all__ = ["heldout_records", "heldout_reward"]

#: First ArithmeticTask index of the held-out problems (RL uses 0.., the SFT warm-up 10**7..).
HELDOUT_START = 2 * 10**7


def heldout_records(dm, n: int, source: str | None = None) -> list[dict]:
    """``n`` prompt records ``{"prompt_ids", "answer", ...}`` rendered by the prompt data module ``dm``."""
    if n < 1:
        raise ValueError(f"stage.grpo.heldout_prompts={n} must be >= 1")
    out = []
    if source:
        for i, r in enumerate(load_records(source, split=getattr(dm, "split", "test"), name="grpo held-out")):
            prob = next((r[f] for f in dm.prompt_fields if f in r), None)
            ans = r.get(dm.answer_field)
            if not isinstance(prob, str) or ans is None:
                raise ValueError(f"stage.grpo.heldout_source={source!r}: record {i + 1} lacks a prompt field "
                                 f"{list(dm.prompt_fields)} or the answer field {dm.answer_field!r}")
            rec = dm.render({"problem": prob, "answer": str(ans).strip()})
            if rec is not None:
                out.append(rec)
            if len(out) == n:
                break
        return out
    if dm.source != "arithmetic":
        raise ValueError(f"stage.grpo.heldout_every is set but data.source={dm.source!r} has no built-in held-out "
                         "split: set stage.grpo.heldout_source to a jsonl/parquet file (or hub dataset) of held-out "
                         "problems with the same fields")
    kw = dict(dm.task_kwargs)
    pool = kw.pop("pool", None)
    kw.pop("solution", None)
    task = ArithmeticTask(seed=dm.seed, **kw)
    trained = {task.problem(i)["prompt"] for i in range(pool)} if pool else set()
    i = HELDOUT_START
    while len(out) < n:
        p = task.problem(i)
        i += 1
        if p["prompt"] in trained:
            continue
        trained.add(p["prompt"])  # distinct problems
        out.append(dm.render({"problem": p["prompt"], "answer": p["answer"]}))
        if i - HELDOUT_START > 1000 * n:
            raise ValueError(f"stage.grpo.heldout_prompts={n}: the arithmetic task has too few problems outside the "
                             "RL pool; lower heldout_prompts")
    return out


def heldout_reward(stage, records: list[dict]) -> dict[str, float]:
    """Greedy mean reward of ``records`` under ``stage.model``; ranks split the prompts, sums are all-reduced."""
    c = stage.cfg
    tok = stage.tokenizer
    rank, world = rank_and_world()
    mine = records[rank::world]
    sharded = stage._trainer is not None and is_sharded(stage.trainer.strategy)
    gens = generate_all(stage.model, [r["prompt_ids"] for r in mine], max_new_tokens=c.max_new_tokens,
                        temperature=0.0, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id,
                        batch_size=c.gen_batch_size or 64, lockstep=sharded)
    _, results = score_generations(tok, gens, [r["answer"] for r in mine], c.verifier, c.verifier_kwargs,
                                   c.verifier_timeout_s, c.verifier_workers)
    s, na, n = all_reduce_values([sum(r.score for r in results), sum(r.outcome == "no_answer" for r in results),
                                   float(len(results))], stage.device)
    return {"grpo/heldout_reward": s / max(n, 1.0), "grpo/heldout_no_answer_frac": na / max(n, 1.0)}


def maybe_heldout(stage, rl_step: int, after_update: bool) -> dict[str, float]:
    """The GRPO stage's hook: before rollout step ``rl_step`` when ``rl_step % heldout_every == 0`` (so step 0
    measures the policy RL starts from), and after the last step's update (``*_final`` keys). Greedy decoding
    draws no random numbers, so enabling it leaves the training run itself unchanged."""
    c = stage.cfg
    if not c.heldout_every or stage._trainer is None:
        return {}
    dm = stage.trainer.datamodule
    if after_update:
        if rl_step != int(dm.total_steps) - 1:
            return {}
        updates = rl_step + 1
    elif rl_step % c.heldout_every:
        return {}
    else:
        updates = rl_step
    recs = getattr(stage, "_heldout_records", None)
    if recs is None:
        recs = heldout_records(dm, c.heldout_prompts, c.heldout_source)
        object.__setattr__(stage, "_heldout_records", recs)
    m = heldout_reward(stage, recs)
    hist = getattr(stage, "heldout_history", None)
    if hist is None:
        hist = []
        object.__setattr__(stage, "heldout_history", hist)
    hist.append({"rl_updates": updates, **m})
    if stage.trainer_is_zero():
        print(f"[grpo held-out] after {updates} rollout steps: reward {m['grpo/heldout_reward']:.3f} "
              f"(greedy, {len(recs)} prompts)", flush=True)
    return {f"{k}_final": v for k, v in m.items()} if after_update else m
