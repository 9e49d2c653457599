"""Held-out reward for GRPO: completions of a fixed prompt set that RL never trains on, scored by the stage's
verifier: greedy every ``stage.grpo.heldout_every`` rollout steps (``grpo/heldout_reward``), and the published
recipe's validation (``stage.grpo.val_*``: AIME, ``n_val`` samples a problem, ``val/reward_mean``).

Why: ``grpo/reward_mean`` comes from the prompts being trained on, with sampling, and rises when the policy
memorises a small pool as much as when it learns the task; a fixed held-out set is a curve of generalisation.
Where the prompts come from: docs/modules.md, "eval/heldout.py".
"""

from __future__ import annotations

import torch

from moxin.data.arithmetic import ArithmeticTask
from moxin.eval.generation import generate_all, score_generations
from moxin.eval.tasks import load_records
from moxin.tensor_parallel import data_rank_and_world, gather_rows, tensor_parallel_group

__all__ = ["heldout_records", "heldout_reward", "maybe_heldout", "maybe_validate", "sampled_completions",
           "sampled_reward"]

#: First ArithmeticTask index of the held-out problems (RL uses 0.., the SFT warm-up 10**7..).
HELDOUT_START = 2 * 10**7


def heldout_records(dm, n: int | None, source: str | None = None, split: str | None = None,
                    what: str = "stage.grpo.heldout_prompts") -> list[dict]:
    """``n`` prompt records ``{"prompt_ids", "answer", ...}`` rendered by the prompt data module ``dm`` (from
    ``source``, split ``split`` or the data's, when given; n None: all of the source's)."""
    if n is None and not source:
        raise ValueError(f"{what}=null (all records) needs a source file or hub dataset")
    if n is not None and n < 1:
        raise ValueError(f"{what}={n} must be >= 1")
    out = []
    if source:
        split = split or getattr(dm, "split", "test")
        for i, r in enumerate(load_records(source, split=split, name="grpo held-out")):
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
    if not task.heldout and not pool:
        raise ValueError("stage.grpo.heldout_every is set but the arithmetic task has neither a reserved held-out part "
                         "nor a fixed RL pool, so its held-out prompts would be drawn from the very stream RL trains "
                         "on: set data.task.heldout to a fraction (e.g. 0.2; problems neither RL nor the warm-up sees) "
                         "or data.task.pool")
    if task.heldout:  # the reserved part: no training draw (RL or warm-up) can return these
        probs = task.heldout_problems(n)
        if not probs:
            raise ValueError(f"data.task.heldout={task.heldout}: the arithmetic task's held-out part is empty; raise it")
        return [dm.render({"problem": p["prompt"], "answer": p["answer"]}) for p in probs]
    # the problems outside the RL pool (the warm-up may still have trained on them)
    trained = {task.problem(i)["prompt"] for i in range(pool)}
    i = HELDOUT_START
    while len(out) < n:
        if i - HELDOUT_START >= 1000 * n:
            raise ValueError(f"stage.grpo.heldout_prompts={n}: the arithmetic task has too few problems outside the "
                             "RL pool; lower heldout_prompts")
        p = task.problem(i)
        i += 1
        if p["prompt"] in trained:
            continue
        trained.add(p["prompt"])  # distinct problems
        out.append(dm.render({"problem": p["prompt"], "answer": p["answer"]}))
    return out


def sampled_completions(stage, records: list[dict], samples: int = 1, temperature: float = 0.0,
                        seed: int | None = None) -> tuple[list[int], list[str], list]:
    """(rows, completions, RewardResults) of ``samples`` completions of each of this data rank's ``records``
    (the data-parallel ranks split them, `data_rank_and_world`) under ``stage.model``, a record's samples
    contiguous. Decodes with what the rollouts decode with (`GRPOStage.decoding_model`: under FSDP2 the gathered
    copy, or lockstep) in batches of ``stage.grpo.gen_batch_size``, batch b sampled from a generator seeded by
    ``seed`` and b. With the gathered copy under tensor parallelism the T ranks of a tensor group split every batch
    as the rollouts do (`generate_all`'s split) and one `gather_rows` gives each rank all of them: the same
    completions one process decodes, at 1/T of the decoding a rank."""
    c = stage.cfg
    tok = stage.tokenizer
    rank, world, _ = data_rank_and_world(stage.model)  # a tensor-parallel group takes the same prompts
    mine = records[rank::world]
    prompts = [r["prompt_ids"] for r in mine for _ in range(samples)]
    answers = [r["answer"] for r in mine for _ in range(samples)]
    t_rank, T, t_group = tensor_parallel_group(getattr(stage._trainer, "strategy", None))
    bs = c.gen_batch_size or 64

    def generator_of(b: int) -> torch.Generator | None:
        if seed is None or temperature == 0:
            return None
        g = torch.Generator(device=stage.device)
        return g.manual_seed((seed + b * 1_000_000_007) % (2**63 - 1))

    call_rows = -(-min(bs, max(len(prompts), 1)) // T)  # a tensor group's rank decodes its share of a batch
    with stage.decoding_model(call_rows, max(map(len, prompts), default=1)) as (model, lockstep):
        split = (t_rank, T) if T > 1 and not lockstep else None
        gens = generate_all(model, prompts, max_new_tokens=c.max_new_tokens, temperature=temperature,
                            top_p=c.top_p if temperature > 0 else 1.0, stop_tokens=(tok.eos_id,), pad_id=tok.pad_id,
                            batch_size=bs, generator_of=generator_of, lockstep=lockstep, split=split)
    own = [i for i, g in enumerate(gens) if g is not None]
    texts, results = score_generations(tok, [gens[i] for i in own], [answers[i] for i in own], c.verifier,
                                       c.verifier_kwargs, c.verifier_timeout_s, c.verifier_workers)
    if split is None:
        return own, texts, results
    cols, _ = gather_rows(own, {"texts": texts, "results": results}, len(prompts), t_group)
    return list(range(len(prompts))), cols["texts"], cols["results"]


def sampled_reward(stage, records: list[dict], samples: int = 1, temperature: float = 0.0,
                   seed: int | None = None) -> tuple[float, float]:
    """(mean reward, fraction with no answer) over ``samples`` completions of each of ``records`` under
    ``stage.model`` (`sampled_completions`): pass@1 averaged over the samples, as DeepScaleR's validation averages
    the rewards of its ``n_val`` samples. Greedy at temperature 0; the sums are added over the data-parallel ranks
    (`GRPOStage.row_sums`: a tensor group's rows once)."""
    _, _, results = sampled_completions(stage, records, samples, temperature, seed)
    s, na, n = stage.row_sums([sum(r.score for r in results), sum(r.outcome == "no_answer" for r in results),
                               float(len(results))])
    return s / max(n, 1.0), na / max(n, 1.0)


def heldout_reward(stage, records: list[dict], samples: int = 0, seed: int = 0) -> dict[str, float]:
    """Greedy mean reward of ``records`` under ``stage.model`` (:func:`sampled_reward`, one greedy sample); with
    ``samples`` > 0 also ``grpo/heldout_reward_sampled``: pass@1 averaged over that many samples a prompt at the
    rollout temperature, drawn from a generator of its own seeded by ``seed`` (the rollouts' stay unchanged)."""
    r, na = sampled_reward(stage, records)
    out = {"grpo/heldout_reward": r, "grpo/heldout_no_answer_frac": na}
    if samples:
        out["grpo/heldout_reward_sampled"] = sampled_reward(stage, records, samples=samples,
                                                            temperature=stage.cfg.temperature, seed=seed)[0]
    return out


def _record(stage, attr: str, updates: int, m: dict[str, float]) -> None:
    """Append ``m`` to the stage's history list ``attr`` (created on first use; not a module attribute)."""
    hist = getattr(stage, attr, None)
    if hist is None:
        hist = []
        object.__setattr__(stage, attr, hist)
    hist.append({"rl_updates": updates, **m})


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
    seed = stage.seed * 1_000_003 + updates * 7_919 + data_rank_and_world(stage.model)[0] * 101 + 29
    m = heldout_reward(stage, recs, c.heldout_samples, seed)
    _record(stage, "heldout_history", updates, m)
    if stage.trainer_is_zero():
        sampled = (f"; {m['grpo/heldout_reward_sampled']:.3f} sampled ({c.heldout_samples} a prompt at temperature "
                   f"{c.temperature:g})" if c.heldout_samples else "")
        print(f"[grpo held-out] after {updates} rollout steps: reward {m['grpo/heldout_reward']:.3f} "
              f"(greedy, {len(recs)} prompts){sampled}", flush=True)
    return {f"{k}_final": v for k, v in m.items()} if after_update else m


def maybe_validate(stage, rl_step: int, after_update: bool) -> dict[str, float]:
    """The published recipe's validation (verl's ``_validate``), the GRPO stage's hook: ``n_val`` samples at
    ``val_temperature`` of every problem of ``stage.grpo.val_source``, logged as ``val/reward_mean`` (the mean
    reward over all samples: pass@1 averaged over n) and ``val/no_answer_frac``. When: before rollout step 0 with
    ``val_before_train``; before rollout step ``rl_step`` when it is a positive multiple of ``val_every_n_steps``
    (after that many updates, as verl's ``test_freq``); and after the last step's update when
    ``val_every_n_steps`` > 0 (``*_final`` keys). Sampling uses its own generator, seeded from the stage's seed
    and the step, so validating leaves the training rollouts unchanged."""
    c = stage.cfg
    if not c.val_source or stage._trainer is None:
        return {}
    every = c.val_every_n_steps
    dm = stage.trainer.datamodule
    if after_update:
        if not every or rl_step != int(dm.total_steps) - 1:
            return {}
        updates = rl_step + 1
    elif (rl_step == 0 and c.val_before_train) or (rl_step > 0 and every and rl_step % every == 0):
        updates = rl_step
    else:
        return {}
    recs = getattr(stage, "_val_records", None)
    if recs is None:
        recs = heldout_records(dm, c.val_prompts, c.val_source, c.val_split, what="stage.grpo.val_prompts")
        if not recs:
            raise ValueError(f"stage.grpo.val_source={c.val_source!r} (split {c.val_split!r}): no problem fits "
                             f"data.max_prompt_tokens={dm.max_prompt_tokens}; raise it or pick another set")
        object.__setattr__(stage, "_val_records", recs)
    rank = data_rank_and_world(stage.model)[0]  # a tensor-parallel group samples alike
    seed = stage.seed * 1_000_003 + updates * 7_919 + rank * 101 + 23
    r, na = sampled_reward(stage, recs, samples=c.n_val, temperature=c.val_temperature, seed=seed)
    m = {"val/reward_mean": r, "val/no_answer_frac": na}
    _record(stage, "val_history", updates, m)
    if stage.trainer_is_zero():
        print(f"[grpo validation] after {updates} rollout steps: reward {r:.3f} ({len(recs)} problems x "
              f"{c.n_val} samples at temperature {c.val_temperature:g})", flush=True)
    return {f"{k}_final": v for k, v in m.items()} if after_update else m
