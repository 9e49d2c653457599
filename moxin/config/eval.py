"""EvalConfig and TaskConfig: what to evaluate and how (``conf/eval/*.yaml``); moxin/eval scores them.

The verifier a generation task names is checked against the verifier registry by ``moxin.eval.tasks.eval_config``
(the registry is code, moxin/rewards, which this leaf does not import).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from moxin.config.data import plain
from moxin.config.errors import EvalConfigError
from moxin.config.options import EvalAfter, FewshotSampler, TaskKind

__all__ = ["EvalConfig", "TaskConfig", "TaskPreset", "TASK_PRESETS", "task_from_any"]


@dataclass(frozen=True)
class TaskPreset:
    """Where a public benchmark's records are, as lm-eval names them (moxin/eval/tasks.py maps the records)."""

    path: str
    split: str
    hub_config: str | None = None
    fewshot_split: str | None = None


#: lm-eval's datasets of the benchmarks in the Moxin paper
TASK_PRESETS: dict[str, TaskPreset] = {
    "arc_easy": TaskPreset("allenai/ai2_arc", "test", "ARC-Easy", "train"),
    "arc_challenge": TaskPreset("allenai/ai2_arc", "test", "ARC-Challenge", "train"),
    "hellaswag": TaskPreset("Rowan/hellaswag", "validation", None, "train"),
    "piqa": TaskPreset("baber/piqa", "validation", None, "train"),
    "winogrande": TaskPreset("allenai/winogrande", "validation", "winogrande_xl", "train"),
}


@dataclass
class TaskConfig:
    """One evaluation task (``conf/eval/*.yaml`` lists them under ``tasks``)."""

    name: str
    kind: TaskKind = TaskKind.multiple_choice
    path: str | None = None
    """Local jsonl/parquet file, folder or glob, or a hub dataset name. A preset fills it in."""
    split: str = "test"
    hub_config: str | None = None
    data_files: Any = None
    preset: str | None = None
    """A built-in record mapping for a public benchmark (see ``TASK_PRESETS``); sets path/split/config if unset."""
    limit: int | None = None
    """Evaluate the first ``limit`` records only (after any preset filtering)."""
    # ---- multiple choice (lm-eval's names)
    text: str = "{question}"
    """Context of a record: a str.format template over its fields (lm-eval's doc_to_text)."""
    choices_field: str = "choices"
    gold_field: str = "gold"
    """Index of the right option (an int, or a letter A-Z / a label found in ``labels_field``)."""
    labels_field: str | None = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    fewshot_split: str | None = None
    """Split (hub) the few-shot examples come from; None: the evaluated records themselves (minus the item)."""
    fewshot_path: str | None = None
    """Local file of few-shot examples; None: ``path`` with ``fewshot_split``, or the evaluated records."""
    fewshot_seed: int = 1234
    fewshot_sampler: FewshotSampler = FewshotSampler.default
    # ---- generation
    problem_field: str = "problem"
    answer_field: str = "answer"
    verifier: str = "math"
    """moxin.rewards.get_verifier name: math (math-verify equality), exact ("Answer: N"), format."""
    verifier_kwargs: dict = field(default_factory=dict)
    instruction: str | None = None
    """Appended to the problem after a blank line; None: the verifier's default (the GRPO prompts' form)."""
    system: str | None = None
    chat: bool = True
    """Render the prompt with the chat template and a generation prompt (as GRPO / SFT models expect)."""
    max_new_tokens: int = 512
    greedy: bool = True
    """pass@1 from one greedy completion per problem."""
    samples: int = 0
    """Sampled completions per problem for pass@k (0: none); pass@k for every k in ``k`` with k <= samples."""
    k: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.6
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        try:
            self.kind = TaskKind(self.kind)
        except ValueError:
            raise EvalConfigError(f"eval task {self.name!r}: kind={self.kind!r}; choose one of "
                                  f"{[k.value for k in TaskKind]}") from None
        try:
            self.fewshot_sampler = FewshotSampler(self.fewshot_sampler)
        except ValueError:
            raise EvalConfigError(f"eval task {self.name!r}: fewshot_sampler={self.fewshot_sampler!r}; choose one of "
                                  f"{[k.value for k in FewshotSampler]}") from None
        if self.preset is not None:
            if self.preset not in TASK_PRESETS:
                raise EvalConfigError(f"eval task {self.name!r}: unknown preset {self.preset!r}; known: "
                                      f"{sorted(TASK_PRESETS)} (or map fields with text/choices_field/gold_field)")
            p = TASK_PRESETS[self.preset]
            if self.path is None:
                self.path, self.hub_config = p.path, p.hub_config
                self.split = p.split
                if self.fewshot_split is None:
                    self.fewshot_split = p.fewshot_split
            self.kind = TaskKind.multiple_choice
        if not self.path:
            raise EvalConfigError(f"eval task {self.name!r}: no path; give a local jsonl/parquet file or a hub "
                                  "dataset name (or a preset)")
        if self.num_fewshot < 0:
            raise EvalConfigError(f"eval task {self.name!r}: num_fewshot={self.num_fewshot} must be >= 0")
        self.k = sorted({int(x) for x in self.k})
        if self.kind == TaskKind.generation:
            if not self.greedy and self.samples <= 0:
                raise EvalConfigError(f"eval task {self.name!r}: greedy=false and samples=0 generate nothing; "
                                      "set greedy=true or samples >= 1")
            if self.samples and (not self.k or self.k[0] < 1 or self.k[-1] > self.samples):
                raise EvalConfigError(f"eval task {self.name!r}: every k in {self.k} must be in 1..samples="
                                      f"{self.samples} (pass@k needs at least k samples per problem)")
            if self.samples and self.temperature <= 0:
                raise EvalConfigError(f"eval task {self.name!r}: samples={self.samples} need temperature > 0 "
                                      "(greedy completions are all the same)")
            if self.max_new_tokens < 1:
                raise EvalConfigError(f"eval task {self.name!r}: max_new_tokens must be >= 1")


def task_from_any(obj: Any) -> TaskConfig:
    """A TaskConfig from a dict / DictConfig (Hydra), naming unknown keys."""
    if isinstance(obj, TaskConfig):
        return obj
    obj = plain(obj)
    if not isinstance(obj, dict) or "name" not in obj:
        raise EvalConfigError(f"an eval task must be a mapping with at least 'name' and 'path'; got {obj!r}")
    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise EvalConfigError(f"eval task {obj['name']!r}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    return TaskConfig(**obj)


@dataclass
class EvalConfig:
    """What to evaluate and how (``conf/eval/*.yaml``)."""

    tasks: list = field(default_factory=list)
    """TaskConfigs (or mappings with their keys)."""
    after: EvalAfter | None = None
    """With a training run: when the callback evaluates (None: never)."""
    bos: bool = True
    """Start every context with bos, as Mistral/Moxin were trained (lm-eval: model_args add_bos_token=True)."""
    batch_tokens: int = 16384
    """Padded tokens per log-likelihood forward (rows x longest row)."""
    max_batch: int = 64
    gen_batch_size: int = 64
    """Prompts per generate() call."""
    verifier_timeout_s: float = 10.0
    verifier_workers: int | None = None
    """Verifier processes (None: min(4, cpus); 0: in-process, no timeouts)."""
    log_items: bool = True
    """Keep every item's scores (log-likelihoods, predictions, completions) in eval.json."""

    def __post_init__(self):
        self.tasks = [task_from_any(t) for t in (self.tasks or [])]
        if self.after is not None:
            try:
                self.after = EvalAfter(self.after)
            except ValueError:
                raise EvalConfigError(f"eval.after={self.after!r}: choose null, "
                                      f"{' or '.join(a.value for a in EvalAfter)}") from None
        if not self.tasks:
            raise EvalConfigError("eval.tasks is empty: list at least one task (see conf/eval/sample.yaml)")
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise EvalConfigError(f"eval.tasks: task names {dup} appear twice; names key the results")
        if self.batch_tokens < 1 or self.max_batch < 1 or self.gen_batch_size < 1:
            raise EvalConfigError("eval.batch_tokens, eval.max_batch and eval.gen_batch_size must be >= 1")

    @classmethod
    def from_any(cls, obj: Any) -> "EvalConfig":
        if isinstance(obj, EvalConfig):
            return obj
        obj = dict(plain(obj))
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(obj) - known)
        if unknown:
            raise EvalConfigError(f"eval: unknown key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**obj)
