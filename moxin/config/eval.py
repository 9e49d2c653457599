"""EvalConfig and TaskConfig: what to evaluate and how (``conf/eval/*.yaml``); moxin/eval scores them.

The verifier a generation task names is checked against the verifier registry by ``moxin.eval.tasks.eval_config``
(the registry is code, moxin/rewards, which this leaf does not import).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from typing import Any

from moxin.config.data import plain
from moxin.config.errors import EvalConfigError
from moxin.config.options import EvalAfter, FewshotSampler, TaskKind

__all__ = ["EvalConfig", "TaskConfig", "TaskPreset", "TASK_PRESETS", "task_from_any"]


@dataclass(frozen=True)
class TaskPreset:
    """Where a public benchmark's records are (hub name, as its reference evaluation reads them, and the file name of
    a local copy under a task's ``local_dir``) and the reference's task settings (``defaults``: TaskConfig fields a
    task that names the preset gets unless it sets them). moxin/eval/tasks.py maps the records."""

    path: str
    split: str
    hub_config: str | None = None
    fewshot_split: str | None = None
    kind: TaskKind = TaskKind.multiple_choice
    local: str = ""
    """Local copy, relative to ``local_dir``: ``<preset>/<split>.jsonl`` unless given."""
    defaults: dict = field(default_factory=dict)


# lm-eval's generate_until stop strings (kept equal to moxin.eval.scoring's GSM8K_UNTIL / HUMANEVAL_UNTIL by a test)
_GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]
_HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
# Qwen2.5-Math evaluation's "qwen25-math-cot" prompt: this system message, the problem as the user turn
_QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
_QWEN_MATH = dict(verifier="qwen_math", chat=True, system=_QWEN_MATH_SYSTEM, instruction="", max_new_tokens=4096)
# One hub config per subtask (BBH's 27, MATH's 7), each read and its records tagged with the subtask; the lists equal
# the subtasks of moxin/eval/assets' fixed few-shot files (a test checks it)
_BBH_CONFIGS = ("boolean_expressions causal_judgement date_understanding disambiguation_qa dyck_languages "
                "formal_fallacies geometric_shapes hyperbaton logical_deduction_five_objects "
                "logical_deduction_seven_objects logical_deduction_three_objects movie_recommendation "
                "multistep_arithmetic_two navigate object_counting penguins_in_a_table "
                "reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks "
                "sports_understanding temporal_sequences tracking_shuffled_objects_five_objects "
                "tracking_shuffled_objects_seven_objects tracking_shuffled_objects_three_objects web_of_lies "
                "word_sorting").split()
_MATH_CONFIGS = ("algebra counting_and_probability geometry intermediate_algebra number_theory prealgebra "
                 "precalculus").split()
_CODE = dict(verifier="humaneval", chat=False, instruction="", until=_HUMANEVAL_UNTIL, max_new_tokens=1024,
             verifier_timeout_s=20.0)  # above the sandbox's 4 s wall limit plus a child's start-up

#: The benchmarks of the Moxin paper's tables, as their reference evaluations read them: lm-evaluation-harness's
#: task (dataset, splits, few-shot split and sampler, description) for the base and instruct suites, Qwen2.5-Math's
#: evaluation data (the copies on the hub under math-ai/) for the reasoning suite. Sources: docs/recipe.md.
TASK_PRESETS: dict[str, TaskPreset] = {
    "arc_easy": TaskPreset("allenai/ai2_arc", "test", "ARC-Easy", "train"),
    "arc_challenge": TaskPreset("allenai/ai2_arc", "test", "ARC-Challenge", "train"),
    # no fewshot_split and no test_split in lm-eval's yaml: its sampler draws one example more (fewshot_extra_draw)
    "hellaswag": TaskPreset("Rowan/hellaswag", "validation", None, "train", defaults=dict(fewshot_extra_draw=True)),
    "piqa": TaskPreset("baber/piqa", "validation", None, "train", defaults=dict(fewshot_extra_draw=True)),
    "winogrande": TaskPreset("allenai/winogrande", "validation", "winogrande_xl", "train",
                             defaults=dict(fewshot_extra_draw=True)),
    # lm-eval truthfulqa_mc1 / truthfulqa_mc2 (0-shot; the fixed six-QA prompt is part of each item's text)
    "truthfulqa_mc1": TaskPreset("truthfulqa/truthful_qa", "validation", "multiple_choice"),
    "truthfulqa_mc2": TaskPreset("truthfulqa/truthful_qa", "validation", "multiple_choice"),
    # lm-eval's `mmlu` group: 57 subject tasks over cais/mmlu (lm-eval reads hails/mmlu_no_train, the same records
    # without auxiliary_train); the "all" config holds every subject with its `subject` field; few-shot: the
    # subject's dev split, first n (fewshot_config sampler: first_n); each subject's description line
    "mmlu": TaskPreset("cais/mmlu", "test", "all", "dev", defaults=dict(
        subject_field="subject", fewshot_sampler="first_n",
        description="The following are multiple choice questions (with answers) about {subject}.\n\n")),
    # OLMES mmlu:mc (oe_eval/tasks/oe_eval_tasks/mmlu.py GenericMMLU_MC): the same records, subjects, description and
    # first-5 dev shots, its make_mcq_prompt layout ("Question: ..", " A. .." lines, "Answer:"); acc_raw is acc.
    # mmlu:mc::tulu adds chat and fewshot_as_multiturn (conf/eval/paper_instruct)
    "mmlu_mc": TaskPreset("cais/mmlu", "test", "all", "dev", defaults=dict(
        subject_field="subject", fewshot_sampler="first_n",
        description="The following are multiple choice questions (with answers) about {subject}.\n\n")),
    # OLMES mmlu:cot::summarize (the MMLU 0-shot CoT column of Tülu 3's table): per subject its instruction, then
    # "Question: ..\n A. ..\n B. .." in one chat turn, greedy, 512 tokens, stop "Question:"; the answer letter read
    # by OLMES's patterns (verifier mmlu_cot); exact_match, per subject and macro
    "mmlu_cot": TaskPreset("cais/mmlu", "test", "all", kind=TaskKind.generation, defaults=dict(
        verifier="mmlu_cot", chat=True, instruction="", subject_field="subject", until=["Question:"],
        max_new_tokens=512, metric="exact_match",
        description="The following are multiple choice questions about {subject}. Summarize your reasoning "
                    "concisely, then conclude with 'Therefore, the answer is: X' where X is one of A, B, C, or "
                    "D.\n\n")),
    # lm-eval gsm8k.yaml 3.0: 5-shot "Question: ...\nAnswer:" from train (seeded sampler), greedy, until, 256 tokens,
    # exact_match under the strict-match and flexible-extract filters
    "gsm8k": TaskPreset("openai/gsm8k", "test", "main", "train", TaskKind.generation, defaults=dict(
        verifier="gsm8k", chat=False, instruction="", num_fewshot=5, until=_GSM8K_UNTIL, max_new_tokens=256,
        metric="exact_match", verifier_variants={"strict-match": {"filter_name": "strict-match"},
                                                 "flexible-extract": {"filter_name": "flexible-extract"}})),
    "math500": TaskPreset("HuggingFaceH4/MATH-500", "test", kind=TaskKind.generation, defaults=_QWEN_MATH),
    # MATH's 5,000 test problems as lm-eval's minerva_math group (and OLMES's minerva_math) reads them: 7 subject
    # configs of EleutherAI/hendrycks_math, Minerva's four fixed examples ("Problem:\n..\n\nSolution:\n.."), greedy,
    # 1024 tokens, until "Problem:"; the answer read by qwen_math (Minerva's "Final Answer: The final answer is X."
    # line first), math-verify equality. Tülu 3's MATH column is OLMES's minerva_math::tulu (conf/eval/paper_instruct)
    "hendrycks_math": TaskPreset("EleutherAI/hendrycks_math", "test", kind=TaskKind.generation, defaults=dict(
        verifier="qwen_math", chat=False, instruction="", num_fewshot=4, fewshot_sampler="first_n",
        target_delimiter="\n", subject_field="subtask", hub_configs=_MATH_CONFIGS, until=["Problem:"],
        max_new_tokens=1024, metric="exact_match")),
    "minerva_math": TaskPreset("math-ai/minervamath", "test", kind=TaskKind.generation, defaults=_QWEN_MATH),
    "amc23": TaskPreset("math-ai/amc23", "test", kind=TaskKind.generation, defaults=_QWEN_MATH),
    "olympiadbench": TaskPreset("math-ai/olympiadbench", "test", kind=TaskKind.generation, defaults=_QWEN_MATH),
    # lm-eval humaneval.yaml (0-shot, greedy, the prompt as plain text); HumanEval+ is evalplus's release
    "humaneval": TaskPreset("openai/openai_humaneval", "test", kind=TaskKind.generation, defaults=_CODE),
    "humaneval_plus": TaskPreset("evalplus/humanevalplus", "test", kind=TaskKind.generation, defaults=_CODE),
    # lm-eval bbh_cot_fewshot (version 4.0; Tülu 3's BBH: 3-shot CoT): 27 subtasks, one hub config each (SaylorTwift/
    # bbh, the parquet copy of lukaemon/bbh lm-eval reads), each its description and three fixed CoT examples
    # (moxin/eval/assets), greedy to 1024 tokens or a stop string, exact_match of the "the answer is X." answer
    "bbh_cot_fewshot": TaskPreset("SaylorTwift/bbh", "test", kind=TaskKind.generation, defaults=dict(
        verifier="bbh", chat=False, instruction="", num_fewshot=3, fewshot_sampler="first_n", target_delimiter="",
        subject_field="subtask", hub_configs=_BBH_CONFIGS, until=["</s>", "Q", "\n\n"], max_new_tokens=1024,
        metric="exact_match", verifier_variants={"get-answer": {}})),
    # PopQA (Tülu 3: 15-shot, greedy, exact match) as its authors' run_model.py runs it: "Q: .. A:" prompts, one
    # example from each of the other 15 relations, 15 new tokens, correct when a possible answer is in the first line
    "popqa": TaskPreset("akariasai/PopQA", "test", kind=TaskKind.generation, defaults=dict(
        verifier="popqa", chat=False, instruction="", num_fewshot=15, max_new_tokens=15, metric="exact_match")),
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
    hub_configs: list[str] | None = None
    """Hub configs read one by one, each config's records tagged with its name in ``subject_field`` (a dataset with
    one config per subtask: BBH, MATH; a preset gives them). A local copy is one file whose records carry the field."""
    data_files: Any = None
    preset: str | None = None
    """A public benchmark (see ``TASK_PRESETS``): its record mapping, path/split/config if unset, and its reference
    settings (few-shot count, verifier, stop strings ...) for the keys the task does not set (``task_from_any``)."""
    local_dir: str | None = None
    """With a preset: read ``<local_dir>/<preset>/<split>.jsonl`` (and the few-shot split's file) instead of the hub,
    for offline machines (write the copies with ``datasets``' ``to_json``)."""
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
    fewshot_extra_draw: bool | None = None
    """Draw ``num_fewshot + 1`` examples per item and drop the item, keeping the first ``num_fewshot``. lm-eval does
    so whenever its task's fewshot_split equals its test_split, which includes tasks with neither (hellaswag, piqa,
    winogrande: validation evaluated, shots from train), so the draws of later items depend on it. None: only
    when the few-shot pool is the evaluated records."""
    subject_field: str | None = None
    """Records are grouped by this field (MMLU's ``subject``): few-shot examples come from the same subject, each
    subject's sampler is seeded alone (lm-eval runs one task per subject), and per-subject scores are reported."""
    description: str = ""
    """lm-eval's description, put before the few-shot examples; ``{subject}`` is the subject, ``_`` as spaces."""
    # ---- generation
    problem_field: str = "problem"
    answer_field: str = "answer"
    verifier: str = "math"
    """moxin.rewards.get_verifier name: math (math-verify equality), exact ("Answer: N"), format."""
    verifier_kwargs: dict = field(default_factory=dict)
    verifier_variants: dict = field(default_factory=dict)
    """Name -> verifier kwargs: the same completions scored once per variant, reported as ``<metric>,<name>``
    (lm-eval's filters: gsm8k's ``exact_match,strict-match`` and ``exact_match,flexible-extract``)."""
    metric: str = "pass@1"
    """Name of the greedy score (lm-eval's metric name for its tasks: ``exact_match`` for gsm8k)."""
    until: list[str] = field(default_factory=list)
    """Stop strings: a completion is cut before the first one (lm-eval's generate_until ``until``)."""
    verifier_timeout_s: float | None = None
    """Per-item verifier deadline for this task (None: ``eval.verifier_timeout_s``); code runs need more."""
    instruction: str | None = None
    """Appended to the problem after a blank line; None: the verifier's default (the GRPO prompts' form)."""
    system: str | None = None
    chat: bool | None = None
    """Render the prompt with the chat template and a generation prompt (as GRPO / SFT models expect); None: on for
    generation tasks, off for multiple choice. A multiple-choice context in chat form is OLMES's
    ``use_chat_format`` request: the template over the turns with the generation prompt, each continuation without
    its leading space (moxin/eval/tasks.py, ``build_mc_items``)."""
    fewshot_multiturn: bool = False
    """With ``chat``: each few-shot example is a user turn (its text) and an assistant turn (its target), the item the
    last user turn (OLMES's ``fewshot_as_multiturn``, which Tülu 3's ``gsm8k::tulu``, ``popqa::tulu``,
    ``minerva_math::tulu`` and ``mmlu:mc::tulu`` set); off: description and examples lead the one user turn."""
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
            if self.path is None and self.local_dir:
                self.path = f"{self.local_dir}/{p.local or f'{self.preset}/{p.split}.jsonl'}"
                if self.fewshot_path is None and p.fewshot_split:
                    self.fewshot_path = f"{self.local_dir}/{self.preset}/{p.fewshot_split}.jsonl"
            elif self.path is None:
                self.path, self.hub_config = p.path, p.hub_config
                self.split = p.split
                if self.fewshot_split is None:
                    self.fewshot_split = p.fewshot_split
            self.kind = p.kind
        if self.chat is None:
            self.chat = self.kind == TaskKind.generation
        if not self.path:
            raise EvalConfigError(f"eval task {self.name!r}: no path; give a local jsonl/parquet file or a hub "
                                  "dataset name (or a preset)")
        if self.hub_configs is not None:
            self.hub_configs = [str(c) for c in self.hub_configs]
            if not self.hub_configs or not self.subject_field or self.hub_config is not None:
                raise EvalConfigError(f"eval task {self.name!r}: hub_configs={self.hub_configs} needs a non-empty "
                                      f"list, subject_field (the field each config's records are tagged with; now "
                                      f"{self.subject_field!r}) and no hub_config (now {self.hub_config!r})")
        if self.num_fewshot < 0:
            raise EvalConfigError(f"eval task {self.name!r}: num_fewshot={self.num_fewshot} must be >= 0")
        self.k = sorted({int(x) for x in self.k})
        self.until = [str(u) for u in self.until]
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
        if self.fewshot_multiturn and not self.chat:
            raise EvalConfigError(f"eval task {self.name!r}: fewshot_multiturn needs chat=true (kind="
                                  f"{self.kind.value}); set chat: true or drop fewshot_multiturn")


def task_from_any(obj: Any, local_dir: str | None = None) -> TaskConfig:
    """A TaskConfig from a dict / DictConfig (Hydra), naming unknown keys; a preset's reference settings fill the
    keys it does not give, and ``local_dir`` (``eval.local_dir``) those of a preset task that gives none."""
    if isinstance(obj, TaskConfig):
        return obj
    obj = plain(obj)
    if not isinstance(obj, dict) or "name" not in obj:
        raise EvalConfigError(f"an eval task must be a mapping with at least 'name' and 'path'; got {obj!r}")
    known = {f.name for f in fields(TaskConfig)}
    unknown = sorted(set(obj) - known)
    if unknown:
        raise EvalConfigError(f"eval task {obj['name']!r}: unknown key(s) {unknown}; allowed: {sorted(known)}")
    preset = TASK_PRESETS.get(obj.get("preset") or "")
    if preset and local_dir and obj.get("local_dir") is None:
        obj = {**obj, "local_dir": local_dir}
    return TaskConfig(**{**copy.deepcopy(preset.defaults if preset else {}), **obj})


@dataclass
class EvalConfig:
    """What to evaluate and how (``conf/eval/*.yaml``)."""

    tasks: list = field(default_factory=list)
    """TaskConfigs (or mappings with their keys)."""
    local_dir: str | None = None
    """Folder of local copies of the preset tasks' data (``<preset>/<split>.jsonl``), for offline machines; None:
    the hub. A task's own ``local_dir`` or ``path`` wins."""
    after: EvalAfter | None = None
    """With a training run: when the callback evaluates (None: never)."""
    bos: bool = True
    """Start every context with bos, as Mistral/Moxin were trained (lm-eval: model_args add_bos_token=True)."""
    batch_tokens: int = 16384
    """Padded tokens per log-likelihood forward (rows x longest row)."""
    max_batch: int = 64
    share_prefixes: bool = True
    """Log-likelihood inputs packed as prefix trees: a context shared by a question's options (a few-shot prefix shared
    by questions) goes through the model once, every option still scored as if alone (moxin/eval/loglik.py). False:
    one padded row per distinct input, the way lm-eval runs them."""
    row_tokens: int = 1024
    """With share_prefixes: packed tokens per row (at least the longest input). Longer rows cut fewer questions in two
    (the second part writes its context again); the dense tree mask's attention grows with the row."""
    gen_batch_size: int = 64
    """Prompts per generate() call."""
    verifier_timeout_s: float = 10.0
    verifier_workers: int | None = None
    """Verifier processes (None: min(4, cpus); 0: in-process, no timeouts)."""
    log_items: bool = True
    """Keep every item's scores (log-likelihoods, predictions, completions) in eval.json."""

    def __post_init__(self):
        self.tasks = [task_from_any(t, self.local_dir) for t in (self.tasks or [])]
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
        if self.batch_tokens < 1 or self.max_batch < 1 or self.gen_batch_size < 1 or self.row_tokens < 1:
            raise EvalConfigError("eval.batch_tokens, eval.max_batch, eval.gen_batch_size and eval.row_tokens must be "
                                  ">= 1")

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
