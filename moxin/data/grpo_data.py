"""Prompts with reference answers for GRPO: the built-in arithmetic task, local jsonl/parquet files, or a Hugging
Face hub dataset (DeepScaleR form: ``problem``, ``answer``, ``solution``).

Every record becomes ``{"prompt_ids", "user", "answer", "solution"}``, the prompt rendered through the one chat
template, so the policy is prompted as SFT data and generation are. Bad records are counted and stop the run
past the limits. A rollout step is ``prompts_per_step`` prompts split over ranks, in a seeded order, resumable.
Details: docs/modules.md, "data/grpo_data.py".
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from moxin.config import DataError, SourceConfig
from moxin.data.arithmetic import ArithmeticTask, solution_text
from moxin.data.base import MoxinDataModule, loader_generator
from moxin.data.extract import extract_all, prompt_from_record
from moxin.tokenizer.chat import render_chat

__all__ = ["PromptDataModule", "DEFAULT_INSTRUCTIONS"]

#: Instructions appended to the problem, by the verifier that will check the answer.
DEFAULT_INSTRUCTIONS = {
    # DeepScaleR / verl's math prompt: the MathVerifier reads the last \boxed{}
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
    # DeepScaleR's own prompt (its data preparation appends this instruction); DeepScaleRVerifier reads the box
    "deepscaler": "Let's think step by step and output the final answer within \\boxed{}.",
    # the built-in task: ExactAnswerVerifier reads "Answer: N"
    "exact": "End with 'Answer: N'.",
}


def _identity(x):
    return x


class _StepDataset(torch.utils.data.Dataset):
    def __init__(self, steps: list[list[dict]]):
        self.steps = steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> list[dict]:
        return self.steps[i]


class PromptDataModule(MoxinDataModule):
    """Prompt batches for GRPO (see the module docstring).

    Args:
        source: ``"arithmetic"`` (the built-in :class:`moxin.data.arithmetic.ArithmeticTask`), a local jsonl/parquet file,
            folder or glob, or a hub dataset name (``agentica-org/DeepScaleR-Preview-Dataset``).
        prompts_per_step: prompts per rollout batch over all ranks (Moxin-Reasoning: 64). Each gets
            ``group_size`` completions in the stage.
        steps: rollout steps; None = ``num_passes`` passes over a file source (required for ``arithmetic``).
        num_passes: passes over the data when ``steps`` is None.
        instruction: appended to each problem (after a blank line); None picks ``DEFAULT_INSTRUCTIONS[verifier]``.
        verifier: which verifier will read the answers (chooses the default instruction).
        system: optional system message.
        prompt_fields: record fields tried in order for the problem text.
        answer_field / solution_field: reference answer / worked solution fields.
        max_prompt_tokens: longer rendered prompts are dropped and counted (Moxin-Reasoning: 1024).
        max_bad_fraction: stop when more than this fraction of records is bad.
        task: kwargs of :class:`ArithmeticTask` (``min_digits``, ``max_digits``, ``ops``; its seed is ``seed``), plus
            ``pool``: RL prompts cycle through the first ``pool`` problems (None: an endless stream);
            ``solution``: ``worked`` or ``answer``, the form of the warm-up targets (see ``solution_text``).
        seed: given by moxin/assemble.py; tokenizer (the object), world_size, max_seq_len: handed in by it
            through ``connect`` (or given here by direct users).
    """

    #: every rollout step's prompts are the same on any process count (each rank takes its slice of the step)
    resumes_on_another_world = True

    def __init__(self, source: str = "arithmetic", prompts_per_step: int = 64, steps: int | None = None,
                 num_passes: int = 1, instruction: str | None = None, verifier: str = "exact",
                 system: str | None = None, prompt_fields: tuple[str, ...] = ("problem", "prompt", "question"),
                 answer_field: str = "answer", solution_field: str | None = "solution", split: str = "train",
                 hub_config: str | None = None, data_files: Any = None, max_prompt_tokens: int = 1024,
                 max_bad_fraction: float = 0.01, task: dict | None = None, world_size: int | None = None,
                 seed: int = 0, tokenizer: Any = None, max_seq_len: int | None = None, num_workers: int = 0,
                 rank: int | None = None):
        super().__init__(seed=seed, tokenizer=tokenizer, world_size=world_size, rank=rank, max_seq_len=max_seq_len)
        if source == "arithmetic" and not steps:
            raise DataError("data.steps is required with source=arithmetic (the task is unbounded)")
        self.source = source
        self.prompts_per_step = prompts_per_step
        self.steps_cfg = steps
        self.num_passes = num_passes
        self.instruction = DEFAULT_INSTRUCTIONS.get(verifier, "") if instruction is None else instruction
        self.system = system
        self.prompt_fields = tuple(prompt_fields)
        self.answer_field = answer_field
        self.solution_field = solution_field
        self.split, self.hub_config, self.data_files = split, hub_config, data_files
        self.max_prompt_tokens = max_prompt_tokens
        self.max_bad_fraction = max_bad_fraction
        self.task_kwargs = dict(task or {})
        self.num_workers = num_workers
        self.stats: dict = {}
        self._records: list[dict] | None = None
        self.check_config()

    def check_config(self) -> None:
        if self.prompts_per_step < 1 or self.prompts_per_step % self.world_size:
            raise DataError(f"data.prompts_per_step={self.prompts_per_step} must be a positive multiple of the world "
                            f"size ({self.world_size}): every rank takes the same number of prompts per step")

    @property
    def per_rank(self) -> int:
        """Prompts per rank per step."""
        return self.prompts_per_step // self.world_size

    # ---- records ---------------------------------------------------------------------------------------------
    def user_text(self, problem: str) -> str:
        return f"{problem.strip()}\n\n{self.instruction}" if self.instruction else problem.strip()

    def messages(self, problem: str) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user_text(problem)}]

    def render(self, rec: dict) -> dict | None:
        """A raw ``{"problem", "answer", "solution"}`` record -> the batch record, or None when too long."""
        msgs = self.messages(rec["problem"])
        ids = render_chat(msgs, self.tokenizer, add_generation_prompt=True).input_ids
        if self.max_prompt_tokens and len(ids) > self.max_prompt_tokens:
            return None
        return {"prompt_ids": ids, "messages": msgs, "answer": rec["answer"], "solution": rec.get("solution")}

    def _file_records(self) -> list[dict]:
        if self._records is None:
            src = SourceConfig(name="prompts", path=self.source, split=self.split, hub_config=self.hub_config,
                               data_files=self.data_files)
            items = extract_all(
                src, prompt_from_record(self.prompt_fields, self.answer_field, self.solution_field),
                max_bad_records=None, max_bad_fraction=self.max_bad_fraction, check_while_reading=False,
                what=f"prompt source {self.source!r}",
                fix=f"Fix the records, set prompt_fields/answer_field ({list(self.prompt_fields)}/"
                    f"{self.answer_field!r}) or raise the limit")
            recs = [out for out in map(self.render, (items[i] for i in range(len(items)))) if out is not None]
            st = items.stats
            st.kept = len(recs)
            self.stats = {**st.to_dict(), "too_long": len(items) - len(recs)}
            if not recs:
                raise DataError(
                    f"prompt source {self.source!r}: no usable prompt ({st.records} records, {st.bad} bad, "
                    f"{self.stats['too_long']} longer than max_prompt_tokens={self.max_prompt_tokens}); first bad: "
                    f"{st.bad_examples}")
            self._records = recs
        return self._records

    # ---- the step plan ---------------------------------------------------------------------------------------
    @property
    def accumulate_grad_batches(self) -> int:
        return 1  # the GRPO stage optimises manually; one batch = one rollout

    @property
    def num_epochs(self) -> int:
        return 1  # the whole run (all passes) is laid out as one epoch of batches

    @property
    def total_steps(self) -> int:
        """Rollout (GRPO) steps."""
        if self.steps_cfg:
            return int(self.steps_cfg)
        return max(1, self.num_passes * len(self._file_records()) // self.prompts_per_step)

    def steps_per_epoch(self) -> list[int]:
        """Batches of the one epoch."""
        return [self.total_steps]

    def _global_batch(self, step: int) -> list[dict]:
        """The ``prompts_per_step`` records of global step ``step``."""
        P = self.prompts_per_step
        if self.source == "arithmetic":
            kw = dict(self.task_kwargs)
            pool = kw.pop("pool", None)
            style = kw.pop("solution", "worked")  # worked: "A + B = C. Answer: C"; answer: "Answer: C"
            task = ArithmeticTask(seed=self.seed, **kw)
            first = step * P
            idx = [(first + i) % pool if pool else first + i for i in range(P)]
            out = []
            for p in (task.problem(i) for i in idx):
                rec = self.render({"problem": p["prompt"], "answer": p["answer"], "solution": solution_text(p, style)})
                if rec is None:
                    raise DataError(f"an arithmetic prompt is longer than data.max_prompt_tokens={self.max_prompt_tokens}")
                out.append(rec)
            return out
        recs = self._file_records()
        n = len(recs)
        out = []
        for j in range(step * P, step * P + P):
            pass_idx, k = divmod(j, n)
            order = self._order(pass_idx, n)
            out.append(recs[order[k]])
        return out

    def _order(self, pass_idx: int, n: int) -> list[int]:
        cache = getattr(self, "_orders", None)
        if cache is None:
            cache = self._orders = {}
        if pass_idx not in cache:
            idx = list(range(n))
            random.Random(f"moxin-prompts/{self.seed}/{pass_idx}").shuffle(idx)
            cache[pass_idx] = idx
        return cache[pass_idx]

    def solution_conversations(self, n: int) -> list[dict]:
        """``n`` conversations ``{"messages": [prompt..., {"role": "assistant", "content": solution}]}`` for an SFT
        warm-up before RL (moxin/warmup.py writes them as a chat jsonl): the user turn is exactly the RL prompt's.
        The arithmetic task's come from an index range disjoint from the RL ones (with 1-digit operands many still
        repeat by value); a file's are its records with a solution, in the seeded order, cycling."""
        if self.source == "arithmetic":
            kw = dict(self.task_kwargs)
            kw.pop("pool", None)
            style = kw.pop("solution", "worked")
            task = ArithmeticTask(seed=self.seed, **kw)
            pairs = [(self.messages(p["prompt"]), solution_text(p, style))
                     for p in (task.problem(10**7 + i) for i in range(n))]
        else:
            recs = self._file_records()
            order = [recs[k] for k in self._order(0, len(recs)) if recs[k].get("solution")]
            if not order:
                raise DataError(f"prompt source {self.source!r}: no record has a solution (field "
                                f"data.solution_field={self.solution_field!r}), so there is nothing to warm up on; "
                                "set warmup.steps=0 or point data.solution_field at the worked solutions")
            pairs = [(order[i % len(order)]["messages"], order[i % len(order)]["solution"]) for i in range(n)]
        return [{"messages": msgs + [{"role": "assistant", "content": sol}]} for msgs, sol in pairs]

    def rank_batches(self, rank: int) -> list[list[dict]]:
        steps = self.total_steps
        return [self._global_batch(s)[rank * self.per_rank:(rank + 1) * self.per_rank] for s in range(steps)]

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.source != "arithmetic":
            self._file_records()

    def train_dataloader(self):
        return StatefulDataLoader(_StepDataset(self.rank_batches(self.rank)), batch_size=None, shuffle=False,
                                  collate_fn=_identity, num_workers=0, generator=loader_generator(self.seed))

    def data_report(self) -> dict:
        rep = {"source": self.source, "prompts_per_step": self.prompts_per_step, "rollout_steps": self.total_steps}
        if self.source != "arithmetic":
            rep.update(self.stats)
        return rep
