"""What a user sees around the training itself: the start-up banner, the run's own log file, the resume message,
the final table and the hand-off lines printed at the end (continue, the next stage, inspect).

Functions here only print and write the run folder's log / saved config; they never decide what is resumed,
saved or exported (that is `moxin.run`'s checkpoint logic). Every function is a no-op off rank zero.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import sys
import warnings
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from moxin.errors import INTERRUPTED, guarded
from moxin.paths import notebook_path

from moxin.checkpoint.lock import launcher_rank

#: The stage that usually follows each stage (the Moxin recipe: pretrain -> SFT -> DPO -> GRPO).
NEXT_STAGE = {"pretrain": "sft", "sft": "dpo", "dpo": "grpo", "grpo": None}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


def stage_kind(cfg: DictConfig) -> str:
    """pretrain | sft | dpo | grpo, from the stage's target class (experiments rename jobs, not classes)."""
    target = str(cfg.stage.get("_target_", ""))
    for kind in ("grpo", "dpo", "sft", "pretrain"):
        if f".{kind}." in target or target.lower().endswith(f"{kind}stage"):
            return kind
    return "pretrain"


# ---- the run's log file: a copy of what the console showed --------------------------------------------------
class _Tee:
    """A text stream that writes to the console stream and to the log file (escape codes stripped; rich's
    live-redraw frames, which only make sense on a terminal, are not copied)."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, s):
        n = self._stream.write(s)
        self._log.write_console(s)
        return n

    def flush(self):
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class RunLog:
    """`out_dir/<job name>.log` (Hydra's own log file name): the banner, progress lines, warnings, samples and
    the final table, as the console showed them. Before, it held only Python logging records (none)."""

    def __init__(self):
        self.path: Path | None = None
        self._fh = None
        self._orig = None

    def open(self, path: Path) -> None:
        if self._fh is not None or launcher_rank() != 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path.resolve()
        self._fh = open(path, "a", encoding="utf-8", buffering=1)
        self._orig = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self), _Tee(sys.stderr, self)

    def write_console(self, s: str) -> None:
        if self._fh is None or not s:
            return
        if "\x1b[" in s and ("\x1b[2K" in s or "\x1b[1A" in s or "\x1b[?25" in s):
            return  # a live progress frame (rich redraws in place); the plain progress lines go here instead
        s = _ANSI.sub("", s).replace("\r", "\n")
        self._fh.write(s)

    def write_line(self, line: str) -> None:
        """Only into the file (what a terminal shows as a live bar)."""
        if self._fh is not None:
            self._fh.write(line.rstrip("\n") + "\n")

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is None:
            return
        if self._orig is not None:
            sys.stdout, sys.stderr = self._orig
        self._fh.close()
        self._fh = None


_RUN_LOG = RunLog()
_PLAN: dict = {}  # the current run's plan (set by on_built)


def run_log() -> RunLog:
    return _RUN_LOG


def current_plan() -> dict:
    """The plan of the run in progress (empty before one is built)."""
    return _PLAN


def _hydra():
    try:
        return HydraConfig.get()
    except ValueError:  # not under Hydra (called from Python)
        return None


def save_run_config(cfg: DictConfig) -> None:
    """Write out_dir/.hydra/{config,hydra,overrides}.yaml once the run is accepted (conf/config.yaml sets
    hydra.output_subdir: null, so Hydra no longer writes them at launch; a run refused because its name exists
    left the existing run's config overwritten)."""
    hc = _hydra()
    if hc is None or launcher_rank() != 0:
        return
    d = Path(cfg.out_dir) / ".hydra"
    d.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, d / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": OmegaConf.to_container(hc, resolve=False)}), d / "hydra.yaml")
    OmegaConf.save(OmegaConf.create(list(hc.overrides.task)), d / "overrides.yaml")


# ---- start-up --------------------------------------------------------------------------------------------------
def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def run_plan(cfg: DictConfig, datamodule, stage) -> dict:
    """Steps, phases and tokens the run will go through (what the banner and the progress display show).

    Steps are the data module's: optimizer steps, except for GRPO, whose steps are rollout steps of
    ``per_step`` optimizer steps each (``stage.optimizer_steps_per_rollout()``); Lightning's ``global_step`` and
    ``trainer.max_steps`` count optimizer steps, so the plan says both."""
    steps = list(datamodule.steps_per_epoch())
    total = sum(steps)
    per_step = int(stage.optimizer_steps_per_rollout()) if hasattr(stage, "optimizer_steps_per_rollout") else 1
    max_steps = int(cfg.trainer.max_steps)
    stop = min(total, -(-max_steps // per_step)) if max_steps > 0 else total
    return {"phases": datamodule.epoch_names(), "steps": steps, "total_steps": total, "stop_step": stop,
            "per_step": per_step, "unit": "rollout step" if hasattr(stage, "optimizer_steps_per_rollout") else
            "optimizer step", "tokens": datamodule.planned_tokens(), "params": stage.model_cfg.num_params()}


def steps_text(n: int, plan: dict, optimizer_steps: int | None = None) -> str:
    """`n` of the plan's steps in words: "12 optimizer steps"; for GRPO "30 rollout steps (up to 4 optimizer
    steps each)" before the run, "30 rollout steps, 118 optimizer steps" after it (`optimizer_steps`: a rollout
    whose groups all had one reward takes no optimizer step)."""
    unit = plan.get("unit", "optimizer step")
    if unit == "optimizer step":
        return f"{n} optimizer step{'s' * (n != 1)}"
    if optimizer_steps is not None:
        return f"{n} {unit}{'s' * (n != 1)}, {optimizer_steps} optimizer steps"
    return f"{n} {unit}{'s' * (n != 1)} (up to {plan.get('per_step', 1)} optimizer steps each)"


def resume_message(cfg: DictConfig, ckpt_path: str | None, ckpt_dir: Path) -> str | None:
    """What resume=... did, in one line: resumed from which checkpoint and step, or started fresh. The
    checkpoint logic decides; this only says it (callable from it)."""
    if cfg.get("resume") in (None, "", False):
        return None
    if ckpt_path is None:
        return (f"resume=auto: nothing to resume in {Path(ckpt_dir).resolve()} (no last.ckpt); starting a fresh "
                f"run at step 0")
    step = None
    try:
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
        step = ck.get("global_step")
    except Exception:  # a sharded (FSDP2) checkpoint folder or an unreadable file: the step stays unknown
        pass
    at = f" at optimizer step {step}" if step is not None else ""
    return f"resume={cfg.resume}: resuming from {Path(ckpt_path).resolve()}{at}"


def banner(cfg: DictConfig, plan: dict, trainer, resume_line: str | None) -> str:
    kind = stage_kind(cfg)
    lines = [f"moxin {kind} run '{cfg.run_name}' -> {Path(cfg.out_dir).resolve()}"]
    if plan.get("params"):
        lines.append(f"  model      {_human(plan['params'])} parameters ({cfg.model.get('dim', '?')} dim, "
                     f"{cfg.model.get('n_layers', '?')} layers), tokenizer {cfg.tokenizer}")
    phase_txt = ", ".join(f"{n} ({s} steps)" for n, s in zip(plan["phases"], plan["steps"]))
    lines.append(f"  phases     {phase_txt}")
    stop = plan["stop_step"]
    total_txt = steps_text(plan["total_steps"], plan)
    if stop != plan["total_steps"]:
        total_txt += f", stopping at {stop} (trainer.max_steps={cfg.trainer.max_steps})"
    if plan.get("tokens"):
        total_txt += f", {_human(plan['tokens'])} tokens"
    lines.append(f"  total      {total_txt}")
    hw = cfg.hardware
    lines.append(f"  hardware   {hw.accelerator} x {trainer.world_size}, precision {hw.precision}, "
                 f"strategy {hw.strategy}")
    if cfg.get("init_from"):
        lines.append(f"  init from  {cfg.init_from}")
    if resume_line:
        lines.append(f"  {resume_line}")
    lines.append(f"  log        {run_log().path or '(console only)'}")
    return "\n".join(lines)


def on_built(cfg: DictConfig, trainer, stage, datamodule, ckpt_path: str | None) -> dict:
    """Called once the run is accepted (config checked, nothing refused) and before fit: save the config,
    start the log file, print the banner and what resume did. Returns the run plan for the progress display."""
    plan = run_plan(cfg, datamodule, stage)
    _PLAN.clear()
    _PLAN.update(plan)
    if launcher_rank() != 0 or not trainer.is_global_zero:
        return plan
    save_run_config(cfg)
    hc = _hydra()
    job = hc.job.name if hc is not None else "moxin"
    if hc is not None:
        run_log().open(Path(cfg.out_dir) / f"{job}.log")
    line = resume_message(cfg, ckpt_path, Path(cfg.out_dir) / "checkpoints")
    print(banner(cfg, plan, trainer, line), flush=True)
    return plan


# ---- hand-offs -------------------------------------------------------------------------------------------------
def _task_overrides() -> list[str]:
    hc = _hydra()
    if hc is not None:  # this job's own overrides (in a sweep: its values, not the sweep's lists)
        return list(hc.overrides.task)
    return sys.argv[1:]


def continue_command(cfg: DictConfig, info: dict | None = None) -> str:
    """The one line that continues this run. `trainer.max_steps` is dropped: a run stopped by it would
    otherwise do nothing when continued (the continued run would be at max_steps already)."""
    run_name = (info or {}).get("run_name", cfg.run_name)
    out_dir = Path((info or {}).get("out_dir", cfg.out_dir)).resolve()
    keep = [a for a in _task_overrides()
            if not a.lstrip("+~").startswith(("run_name=", "resume=", "out_dir=", "trainer.max_steps=", "hydra."))
            and a not in ("-m", "--multirun")]
    where = [f"run_name={run_name}"]
    if out_dir != (Path("runs") / run_name).resolve():
        where.append(f"out_dir={out_dir}")
    return "python -m moxin.run " + " ".join(shlex.quote(a) for a in keep + where + ["resume=auto"])


def next_stage_command(cfg: DictConfig, info: dict) -> str | None:
    """The next stage of the recipe, started from this run's weights (full path), or None after GRPO."""
    nxt = NEXT_STAGE.get(stage_kind(cfg))
    if nxt is None:
        return None
    src = info.get("hf_export") or info.get("checkpoint")
    if not src:  # trainer.save_checkpoints=false and no export: nothing to start from
        return None
    return f"python -m moxin.run +experiment={nxt} init_from={shlex.quote(str(Path(src).resolve()))}"


def handoff_lines(cfg: DictConfig, info: dict) -> list[tuple[str, str]]:
    """(label, command) pairs printed after the summary table; each command is a single paste-able line."""
    out = []
    planned = _PLAN.get("total_steps", 1 << 62)
    stopped_early = info.get("rollout_steps", info.get("optimizer_steps", 0)) < planned
    if stopped_early:  # a finished run has nothing left to continue
        out.append(("Continue this run", continue_command(cfg, info)))
    nxt = next_stage_command(cfg, info)
    if nxt:
        out.append((f"Next stage ({NEXT_STAGE[stage_kind(cfg)].upper()})", nxt))
    out.append(("Inspect it", notebook_command(info["out_dir"])))
    return out


def _extra_requirements(extra: str) -> list[str]:
    """The requirements of one of moxin's extras, from the installed package's metadata ([] when moxin runs from a
    checkout that was never installed)."""
    try:
        reqs = requires("moxin") or []
    except PackageNotFoundError:
        return []
    return [r.split(";")[0].strip() for r in reqs if re.search(rf"""extra\s*==\s*["']{extra}["']""", r)]


def notebook_command(run_dir: str | Path) -> str:
    """The line that opens the inspection notebook on `run_dir` (absolute, so it works from any folder), with
    the install of Jupyter first when it is missing: the notebook extra's packages by name (right for a wheel
    and an editable install alike), or the checkout's extra when moxin was never installed."""
    nb = notebook_path()
    try:
        import notebook  # noqa: F401  (an optional dependency: is it installed?)

        prefix = ""
    except ImportError:
        reqs = _extra_requirements("notebook")
        if reqs:
            prefix = f"pip install {' '.join(shlex.quote(r) for r in reqs)} && "
        else:
            prefix = f"pip install -e {shlex.quote(str(nb.parent.parent) + '[notebook]')} && "
    return f"{prefix}MOXIN_RUN={shlex.quote(str(Path(run_dir).resolve()))} jupyter notebook {shlex.quote(str(nb))}"


def print_handoffs(cfg: DictConfig, info: dict) -> None:
    """Plain print, never wrapped or cut (rich folds long lines at the terminal width; a folded command pasted
    back starts something else)."""
    lines = handoff_lines(cfg, info)
    width = max(len(label) for label, _ in lines) + 1
    for label, cmd in lines:
        print(f"{(label + ':').ljust(width)}  {cmd}", flush=True)


def print_summary(cfg: DictConfig, info: dict, handoffs: bool = True) -> None:
    """The final table of a run (steps, tokens, time, losses and metrics, where its files are), then the
    hand-off lines (`handoffs`)."""
    # piped output (a log file, `| tee`): as wide as the rows, so no path is cut; on a terminal long values fold
    c = Console() if sys.stdout.isatty() else Console(width=1000)
    t = Table(title=f"moxin run '{info['run_name']}' finished", show_header=False)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("steps", steps_text(info.get("rollout_steps", info["optimizer_steps"]), current_plan(),
                                  info["optimizer_steps"] if "rollout_steps" in info else None))
    t.add_row("target tokens", f"{info['target_tokens']:,}")
    t.add_row("time", f"{info['seconds']} s")
    if info.get("tokens_per_s"):
        t.add_row("throughput", f"{info['tokens_per_s']:,.0f} tokens/s")
    line_loss = current_plan().get("train_loss_line")  # what the last progress line showed as its loss
    for k in sorted(info["metrics"]):
        if k == "train/loss" and line_loss and line_loss[2] == info.get("rollout_steps", info["optimizer_steps"]):
            value, first, last = line_loss
            t.add_row(f"train/loss (mean {first}-{last})" if first != last else k, f"{value:.4f}")
        elif k.startswith(("train/loss", "val/", "dpo/", "grpo/", "sft/")):
            t.add_row(k, f"{info['metrics'][k]:.4f}")
    t.add_row("checkpoint", info["checkpoint"] or "none (trainer.save_checkpoints=false)")
    if info.get("hf_export"):
        t.add_row("HF export", info["hf_export"])
    if info.get("metrics_csv"):
        t.add_row("metrics CSV", info["metrics_csv"])
    t.add_row("summary", str(Path(info["out_dir"]) / "summary.json"))
    c.print(t)
    if handoffs:  # continue / next stage / inspect, one paste-able line each
        print_handoffs(cfg, info)


def interrupted_message(cfg: DictConfig, trainer: Any) -> str:
    """Printed on Ctrl-C: where the run stood and how to continue it (what was saved is the checkpoint
    logic's business; this names the checkpoint folder so the user can look)."""
    ckpt_dir = (Path(cfg.out_dir) / "checkpoints").resolve()
    step = getattr(trainer, "global_step", "?")
    if step == 0:
        return "\nInterrupted before the first optimizer step; nothing was trained."
    if not (ckpt_dir / "last.ckpt").exists():
        return (f"\nInterrupted at optimizer step {step}; no checkpoint in {ckpt_dir} yet, so resume=auto would "
                f"start from step 0.\nContinue: {continue_command(cfg)}")
    return (f"\nInterrupted at optimizer step {step}. Checkpoints are in {ckpt_dir} "
            f"(resume=auto continues from the newest last.ckpt there).\nContinue: {continue_command(cfg)}")


# ---- the job as a whole ----------------------------------------------------------------------------------------
_STEP = {"step": 0}  # the newest optimizer step this launch reached (set by the progress callback)


def note_step(step: int) -> None:
    _STEP["step"] = max(_STEP["step"], int(step))


def note_train_loss(value: float, first: int, last: int) -> None:
    """The train loss of the last progress line: the mean over steps first..last (the final table shows it)."""
    _PLAN["train_loss_line"] = (value, first, last)


def note_interrupt() -> None:
    """Ctrl-C reached Lightning's fit (which then exits with status 1; guarded_train makes it 130)."""
    _STEP["interrupted"] = True


def quiet_third_party_noise() -> None:
    """Drop messages from dependencies that say nothing about this run (advertising, deprecations inside
    Lightning/torchdata that users cannot act on)."""
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    # the stages move their batches themselves (a data module's own hook would bypass the stage's): by design
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # a run without a validation set (GRPO, its warm-up) hands Lightning an empty list of val batches
    warnings.filterwarnings("ignore", message=".*Total length of `list` across ranks is zero.*")
    # Lightning's start-up and stop notices ("GPU available: ...", "`Trainer.fit` stopped: ..."): the banner and the
    # final table say what the run is and how it ended; Lightning's warnings and errors still show
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())


def guarded_train(cfg: DictConfig, train) -> float | None:
    """`train(cfg)` for `python -m moxin.run`: user errors as one message (moxin.errors.guarded), and the
    monitored metric for sweepers, with a warning when the run never produced it (the sweeper would get None)."""
    out_dir = Path(cfg.out_dir)
    hc = _hydra()
    multirun = hc is not None and str(hc.mode) == "RunMode.MULTIRUN"
    # Hydra has made out_dir and opened an (empty) job log file in it before this runs: the folder is this
    # launch's own if that is all it holds
    launch_log = out_dir / f"{hc.job.name}.log" if hc is not None else None

    def launch_made(p: Path) -> bool:
        return p == launch_log and p.is_file() and p.stat().st_size == 0

    fresh = not out_dir.exists() or all(launch_made(p) for p in out_dir.iterdir())

    def cleanup() -> None:
        """After a failure before the first step: remove the folder if this launch made it, else only the
        empty log file Hydra opened in an existing run's folder (a refused run leaves that run as it was)."""
        run_log().close()
        if fresh and not multirun:
            shutil.rmtree(out_dir, ignore_errors=True)
        elif launch_log is not None and launch_log.is_file() and launch_log.stat().st_size == 0:
            launch_log.unlink()

    _STEP["step"] = 0
    _STEP["interrupted"] = False
    try:
        info = guarded(lambda: train(cfg), cleanup, lambda: _STEP["step"], exit_on_user_error=not multirun)
    except SystemExit as e:
        if _STEP["interrupted"] and e.code == 1:  # Lightning ends an interrupted fit with sys.exit(1)
            raise SystemExit(INTERRUPTED) from None
        raise
    finally:
        run_log().close()
    value = info["metrics"].get(cfg.monitor)
    if (value is None or value != value) and multirun:  # outside a sweep nobody reads the returned value
        have = sorted(k for k in info["metrics"] if "/" in k)
        print(f"warning: monitor={cfg.monitor} was never produced by this run ({info['optimizer_steps']} steps, "
              f"validation every {cfg.trainer.val_every_n_steps} steps): the sweeper gets None. Lower "
              f"trainer.val_every_n_steps, or set monitor to one of {have}", flush=True)
        return None
    return value
