"""`python -m moxin.run [+experiment=NAME] [key=value ...]`: compose the config, build data, stage and
trainer, fit, print where everything went. Returns the monitored metric so Hydra sweepers can optimise it.

With no arguments it pretrains a tiny Moxin on the built-in sample corpus on the CPU in a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path


def _interrupted_while_starting(signum, frame) -> None:
    """Ctrl-C while torch and Lightning import (the first seconds): one line and status 130, no traceback."""
    print("moxin: interrupted (Ctrl-C) before the run started", file=sys.stderr, flush=True)
    os._exit(130)


if __name__ == "__main__":  # installed before the heavy imports below; cli() restores Python's handler
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import hydra  # noqa: E402
import lightning as L  # noqa: E402
import torch  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from moxin.config import ConfigError, RunConfig  # noqa: E402
from moxin.paths import conf_dir  # noqa: E402  (importing it registers the configs' schemas before @hydra.main)

CONF_DIR = str(conf_dir())


def _sample_path(name: str) -> str:
    from moxin.data.sample import sample_path

    return str(sample_path(name))


if not OmegaConf.has_resolver("moxin_sample"):
    OmegaConf.register_new_resolver("moxin_sample", _sample_path)


def world_size_of(hw: DictConfig) -> int:
    devices = hw.devices
    if devices in (-1, "auto"):
        import torch

        devices = torch.cuda.device_count() if hw.accelerator in ("gpu", "cuda") else 1
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return int(devices) * int(hw.num_nodes)


def build_strategy(hw: DictConfig, world: int):
    name = hw.strategy
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # every rank is a data-parallel (FSDP) rank; tensor parallelism is not used
        dp = hw.get("data_parallel_size", "auto")
        return ModelParallelStrategy(data_parallel_size=world if dp == "auto" else int(dp), tensor_parallel_size=1,
                                     save_distributed_checkpoint=True)
    if name == "ddp_cpu":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(process_group_backend="gloo")
    return name


def resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from: none for a fresh run (refused where checkpoints exist), the newest
    complete one for resume=auto (newer incomplete or unreadable ones are named in a warning and skipped),
    or the given path (checked)."""
    from moxin.checkpointing import CheckpointError, candidates, find_resume, read_info

    out_dir = ckpt_dir.parent
    if cfg.resume in (None, "", False):
        if candidates(out_dir) or (ckpt_dir / "last.ckpt").exists():
            raise ConfigError(f"{ckpt_dir} already holds a run's checkpoints. Continue it with resume=auto, or start "
                              f"a new run with another run_name=... (nothing is overwritten silently)")
        return None
    if cfg.resume == "auto":
        info, skipped = find_resume(out_dir)
        for why in skipped:
            _say(f"resume=auto: skipping {why}")
        if info is None:
            if skipped:
                raise ConfigError(f"resume=auto: no complete checkpoint in {out_dir} (skipped: {skipped}); remove "
                                  "the broken files to start over, or give resume=<path>")
            return None
        _say(f"resume=auto: continuing from {info.path} (optimizer step {info.step})")
        return str(info.path)
    try:
        return str(read_info(cfg.resume).path)
    except CheckpointError as e:
        raise ConfigError(f"resume={cfg.resume!r}: {e}; use resume=auto or a path to a complete checkpoint") from None


def _say(msg: str) -> None:
    """A one-line notice on the first process only (every rank resolves the same checkpoint)."""
    from moxin.checkpointing import launcher_rank

    if launcher_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


def check_vocab(model_cfg, tokenizer) -> None:
    """The embedding must have a row for every id the tokenizer can produce (its specials included); otherwise
    the first batch dies mid-step (an IndexError on a CPU, a device-side assert on a GPU)."""
    from moxin.tokenizer import as_tokenizer

    tok = as_tokenizer(tokenizer)
    specials = {"bos": tok._bos_id, "eos": tok._eos_id, "pad": tok._pad_id}
    top = max([tok.vocab_size - 1] + [i for i in specials.values() if i is not None])
    if top >= model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} but tokenizer={tok.name!r} produces ids up to {top} "
            f"({tok.vocab_size} entries; special ids {', '.join(f'{k} {v}' for k, v in specials.items() if v is not None)}). "
            f"Set model.vocab_size={top + 1} (or more), or choose a tokenizer with at most {model_cfg.vocab_size} "
            f"entries (tokenizer=path/to/tokenizer.json)")


def build(cfg: DictConfig):
    """Instantiate datamodule, stage, trainer from the composed config (before any training work). The run's one
    tokenizer is built here and handed to the data module (``connect``), the stage and the callbacks; the HF
    export at the end takes it from the stage."""
    run_cfg = RunConfig.from_cfg(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path = resolve_resume(cfg, ckpt_dir)
    hw = cfg.hardware
    world = world_size_of(hw)
    if ckpt_path:
        from moxin.checkpointing import read_info

        saved_world = read_info(ckpt_path).world_size
        if saved_world and saved_world != world:
            raise ConfigError(
                f"{ckpt_path} was written by {saved_world} processes; this run has {world} (hardware.devices x "
                f"hardware.num_nodes). The data and loop state belong to the process count, so resume with "
                f"{saved_world} processes, or start a new run from its weights: init_from={ckpt_path} (the weights "
                "reshard to any process count)")

    model_cfg = instantiate(cfg.model)
    from moxin.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(model_cfg, tokenizer)
    datamodule = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    datamodule.connect(tokenizer, world_size=world, max_seq_len=model_cfg.max_seq_len)
    accum = datamodule.accumulate_grad_batches
    stage = instantiate(cfg.stage, model=model_cfg, parallel=instantiate(hw.parallel), tokenizer=tokenizer,
                        init_from=cfg.init_from, max_nonfinite_steps=run_cfg.trainer.max_nonfinite_steps,
                        _convert_="object")

    from moxin.callbacks import SampleGenerations, Throughput
    from moxin.checkpointing import CheckpointPolicy, StopOnSignal

    throughput = Throughput(peak_tflops=hw.peak_tflops)
    # one policy for every strategy: new name, complete, then last.ckpt switched to it, then retention
    policy = CheckpointPolicy(ckpt_dir, cfg.trainer.checkpoint_every_n_steps, cfg.trainer.keep_all_checkpoints,
                              enabled=cfg.trainer.get("save_checkpoints", True),
                              keep=int(cfg.trainer.get("keep_checkpoints", 1)))
    callbacks = [StopOnSignal(policy), throughput]  # the policy goes last (below)
    from moxin.callbacks.progress import progress_callbacks  # ux: phases, step/total, tokens, ETA; Ctrl-C hint
    from moxin.ui import run_plan

    console_callbacks, bar_on = progress_callbacks(cfg, run_plan(cfg, datamodule, stage), accum)
    callbacks += console_callbacks
    if cfg.get("samples") and cfg.samples.prompts:
        callbacks.append(SampleGenerations(list(cfg.samples.prompts), cfg.samples.max_new_tokens, tokenizer))
    if cfg.get("eval") and cfg.eval.get("after"):  # +eval=NAME eval.after=phase|stage (moxin/eval)
        from moxin.callbacks.evaluation import EvalCallback

        callbacks.append(EvalCallback(cfg.eval, tokenizer, str(out_dir)))
    # last, so that in every hook it sees what the others did: a phase's or the run's checkpoint is published
    # after that phase's samples and evaluation are on record (a kill in an evaluation redoes it on resume)
    callbacks.append(policy)
    val_every = val_interval_steps(cfg.trainer.val_every_n_steps, datamodule.steps_per_epoch())
    from moxin.loggers import build_loggers  # ux: CSV always, plus W&B / TensorBoard

    logger = build_loggers(cfg, out_dir)
    trainer = L.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, precision=hw.precision,
        strategy=build_strategy(hw, world), plugins=_plugins(hw),
        max_epochs=datamodule.num_epochs, reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=accum, callbacks=callbacks, logger=logger, default_root_dir=str(out_dir),
        log_every_n_steps=1, num_sanity_val_steps=0, gradient_clip_val=None,
        val_check_interval=(val_every * accum) if val_every else None, max_steps=cfg.trainer.max_steps,
        check_val_every_n_epoch=1, limit_val_batches=cfg.trainer.limit_val_batches,
        enable_progress_bar=bar_on, enable_model_summary=False, enable_checkpointing=False,
        deterministic=cfg.trainer.deterministic, use_distributed_sampler=False,
    )
    return trainer, stage, datamodule, ckpt_path, throughput


def _plugins(hw: DictConfig) -> list | None:
    """Atomic checkpoint files (ModelParallelStrategy writes its own folders), and under SLURM the cluster
    environment without Lightning's requeue-in-the-signal-handler (StopOnSignal saves at a step boundary)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from moxin.callbacks import AtomicCheckpointIO

    plugins = [AtomicCheckpointIO()] if hw.strategy != "fsdp2" else []

    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins or None


def val_interval_steps(every: int | None, phase_steps: list[int]) -> int | None:
    """Optimizer steps between validations: the largest divisor of every phase's step count that is at most
    `every`, so that validation also falls on each phase's last step (Lightning counts the interval inside
    an epoch, and our phases are epochs)."""
    if not every:
        return None
    g = 0
    for n in phase_steps:
        g = math.gcd(g, n)
    g = max(g, 1)
    return max(d for d in range(1, min(every, g) + 1) if g % d == 0)


def _last_checkpoint(out_dir: Path) -> str:
    """The step file last.ckpt points to (stable: a later resume moves last.ckpt, not this)."""
    last = out_dir / "checkpoints" / "last.ckpt"
    return str(last.resolve() if last.exists() else last)


def summary(cfg, trainer, stage, datamodule, throughput, started: float) -> dict:
    out_dir = Path(cfg.out_dir).resolve()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    from moxin.distributed import weights_checksum

    from moxin.model import lora

    # collective under FSDP2: every rank computes it. With LoRA: the merged weights, those the hf/ export holds
    checksum = lora.merged_checksum(stage.model) if lora.has_lora(stage.model) else weights_checksum(stage.model)
    info = {
        "run_name": cfg.run_name,
        "out_dir": str(out_dir),
        "checkpoint": _last_checkpoint(out_dir) if cfg.trainer.get("save_checkpoints", True) else None,
        "optimizer_steps": trainer.global_step,
        **({"rollout_steps": stage.batches_seen} if hasattr(stage, "optimizer_steps_per_rollout") else {}),
        "target_tokens": stage.tokens_seen,
        "seconds": round(time.time() - started, 1),
        "tokens_per_s": throughput.tokens_per_s,
        "mfu": throughput.mfu,
        # this process's peak of allocated GPU memory (rank zero's under FSDP: ranks hold equal shards)
        "peak_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 2)
                            if torch.cuda.is_available() and torch.cuda.is_initialized() else None),
        "metrics": metrics,
        "weights_checksum": checksum,
        "init_from": cfg.init_from,
        "init_checksum": stage.init_checksum,
    }
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        info["metrics_csv"] = str(Path(trainer.logger.log_dir).resolve() / "metrics.csv")
    info["data"] = datamodule.data_report()
    if trainer.is_global_zero:
        (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def print_summary(cfg, info: dict, handoffs: bool = True) -> None:
    from rich.console import Console
    from rich.table import Table

    # piped output (a log file, `| tee`): as wide as the rows, so no path is cut; on a terminal long values fold
    c = Console() if sys.stdout.isatty() else Console(width=1000)
    t = Table(title=f"moxin run '{info['run_name']}' finished", show_header=False)
    t.add_column(no_wrap=True)
    t.add_column(overflow="fold")
    from moxin.ui import current_plan, steps_text

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
    if handoffs:
        from moxin.ui import print_handoffs  # ux: continue / next stage / inspect, one paste-able line each

        print_handoffs(cfg, info)


def train(cfg: DictConfig, handoffs: bool = True) -> dict:
    """Lock the run folder, clear what killed saves left, run the SFT warm-up first when the config has one
    (moxin/warmup.py: its own run in out_dir/warmup, whose final weights become init_from), build, fit, export,
    report (`handoffs`: print the next commands at the end)."""
    from contextlib import nullcontext

    from moxin.checkpointing import RunLock, clean_temporaries, launcher_rank

    from moxin.errors import preflight

    preflight(cfg)  # ux: user mistakes (unknown keys, paths, types) stop here, before the warm-up or any work
    first = launcher_rank() == 0
    if cfg.resume in (None, "", False):
        # a fresh run on a folder that holds a run is refused before the lock file is made: a refused run
        # leaves that run's folder exactly as it was (checked again under the lock in build())
        resolve_resume(cfg, Path(cfg.out_dir) / "checkpoints")
    with RunLock(cfg.out_dir) if first else nullcontext():
        if first:
            clean_temporaries(cfg.out_dir)
        from moxin.warmup import run_warmup

        cfg, stopped = run_warmup(cfg, train)
        return stopped if stopped is not None else _train_locked(cfg, handoffs)


def finished_info(cfg: DictConfig, ckpt_path: str, datamodule) -> dict | None:
    """The summary to return when the checkpoint to resume is already the end of the run: the whole schedule
    done (saved at the last phase's end) or trainer.max_steps reached."""
    from moxin.checkpointing import read_info

    info = read_info(ckpt_path)
    total = int(datamodule.total_steps or 0)
    limit = int(cfg.trainer.max_steps)
    # finished: saved at the last phase's end, and the schedule asks for no more steps than that (a schedule
    # extended since then trains on)
    done = (info.moxin.get("finished") and (not total or info.step >= total)) or (0 < limit <= info.step)
    if not done:
        return None
    from moxin.ui import continue_command

    prev = Path(cfg.out_dir) / "summary.json"
    out = json.loads(prev.read_text()) if prev.exists() else {"run_name": cfg.run_name, "metrics": {}}
    out.update(checkpoint=str(Path(ckpt_path).resolve()), optimizer_steps=info.step, nothing_to_do=True)
    src = Path(ckpt_path).resolve()
    if info.moxin.get("finished"):
        # the data and LR schedules end here: trainer.max_steps only stops a run earlier, it cannot extend one
        asked = f" trainer.max_steps={limit} cannot take it further:" if limit > 0 else ""
        _say(f"run '{cfg.run_name}' is complete: {info.path} ends its whole schedule (optimizer step {info.step})."
             f"{asked} the data and learning-rate schedules end there. To train more, start a new run from its "
             f"weights with a longer schedule: python -m moxin.run init_from={src} run_name=<new name> "
             "(with schedule.phases / data.steps / data.num_epochs set for the new run)")
    else:
        _say(f"run '{cfg.run_name}' stopped at trainer.max_steps={limit}: {info.path} is optimizer step {info.step} of "
             f"{total or '?'} of the schedule; nothing left to do at this limit. Continue with a higher "
             f"trainer.max_steps, or without it for the whole schedule: {continue_command(cfg)}")
    return out


def _train_locked(cfg: DictConfig, handoffs: bool = True) -> dict:
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    from moxin import ui

    trainer, stage, datamodule, ckpt_path, throughput = build(cfg)
    ui.on_built(cfg, trainer, stage, datamodule, ckpt_path)  # ux: save config, log file, banner, resume message
    if ckpt_path:
        done = finished_info(cfg, ckpt_path, datamodule)
        if done is not None:
            return done
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    info = summary(cfg, trainer, stage, datamodule, throughput, started)
    stop = next((c for c in trainer.callbacks if type(c).__name__ == "StopOnSignal"), None)
    if stop is not None and stop.stopped_at is not None:
        info["stopped_by_signal_at"] = stop.stopped_at  # the job comes back (requeued): no export yet
    elif cfg.export_hf:
        from moxin.checkpointing import export_hf, weights_finite

        hf_dir = Path(cfg.out_dir) / "hf"
        from moxin.tokenizer.cjk import export_files  # a tokenizer file path, or moxin-cjk's tokenizer.json + config

        tok_files = [str(f) for f in export_files(cfg.tokenizer)] or None
        if not weights_finite(stage):
            if trainer.is_global_zero:
                print(f"not exporting {hf_dir}: the final weights hold NaN/Inf", file=sys.stderr)
        else:
            # every rank takes part (FSDP2 gathers each parameter); rank 0 writes, one shard in memory at a time
            export_hf(stage, hf_dir, is_global_zero=trainer.is_global_zero, tokenizer_files=tok_files)
            if trainer.is_global_zero:
                from moxin.tokenizer.hf_export import write_export_tokenizer  # tokenizer.model/json, configs

                write_export_tokenizer(hf_dir, cfg, stage.tokenizer)
                info["hf_export"] = str(hf_dir.resolve())
                if (hf_dir.parent / "hf_adapter").is_dir():  # a LoRA run: its adapters in PEFT's format too
                    info["hf_adapter"] = str((hf_dir.parent / "hf_adapter").resolve())
    if trainer.is_global_zero:
        print_summary(cfg, info, handoffs)
    return info


def evaluate_only(cfg: DictConfig) -> float | None:
    """+experiment=eval: score init_from on the eval tasks (moxin/eval/stage.py); returns the monitored metric."""
    from moxin.eval.runner import flat_metrics
    from moxin.eval.stage import run_eval

    value = flat_metrics(run_eval(cfg)).get(cfg.monitor)
    return None if value is None or math.isnan(value) else value


def quiet_third_party_noise() -> None:
    """Drop messages from dependencies that say nothing about this run (advertising, deprecations inside
    Lightning/torchdata that users cannot act on)."""
    import logging
    import warnings

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


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party_noise()
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # each sweep job writes into its own multirun/<time>/<num> folder
        with open_dict(cfg):
            cfg.run_name = f"{cfg.run_name}-{hc.job.num}"
            cfg.out_dir = hc.runtime.output_dir
    from moxin.ui import guarded_train  # ux: one-line user errors, no leftovers, monitor warning

    if cfg.get("eval_only"):  # +experiment=eval: evaluate init_from, no training
        from moxin.errors import guarded

        from moxin.errors import check_keys

        return guarded(lambda: (check_keys(cfg), evaluate_only(cfg))[1], lambda: None, lambda: 0,
                       exit_on_user_error=True)
    return guarded_train(cfg, train)


def cli() -> None:
    """`python -m moxin.run`: Ctrl-C while Hydra composes the config (before moxin's own handling starts) ends
    with one line and status 130 instead of a traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        from moxin.errors import INTERRUPTED

        print("moxin: interrupted (Ctrl-C) before the run started", file=sys.__stderr__, flush=True)
        raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    cli()
