"""`python -m moxin.run [+experiment=NAME] [key=value ...]`: compose the config, assemble the run
(moxin/assemble.py), fit, export, print where everything went. Returns the monitored metric so Hydra sweepers can
optimise it. Nothing in the package imports this module.

With no arguments it pretrains a tiny Moxin on the built-in sample corpus on the CPU in a few minutes.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
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
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, open_dict  # noqa: E402

from moxin import ui  # noqa: E402
from moxin.assemble import Run, assemble, resolve_resume, say  # noqa: E402
from moxin.checkpoint.export import export_hf  # noqa: E402
from moxin.checkpoint.files import read_info  # noqa: E402
from moxin.checkpoint.lock import RunLock, launcher_rank  # noqa: E402
from moxin.checkpoint.policy import weights_finite  # noqa: E402
from moxin.checkpoint.resume import clean_temporaries  # noqa: E402
from moxin.checkpoint.signals import StopOnSignal  # noqa: E402
from moxin.distributed import weights_checksum  # noqa: E402
from moxin.errors import INTERRUPTED, check_keys, guarded, preflight  # noqa: E402
from moxin.eval.runner import flat_metrics  # noqa: E402
from moxin.eval.stage import run_eval  # noqa: E402
from moxin.model import lora  # noqa: E402
from moxin.paths import conf_dir  # noqa: E402  (importing it registers the configs' schemas before @hydra.main)
from moxin.tokenizer import Tokenizer, load_tokenizer  # noqa: E402
from moxin.tokenizer.cjk import export_files  # noqa: E402
from moxin.tokenizer.hf_export import write_export_tokenizer  # noqa: E402
from moxin.warmup import run_warmup  # noqa: E402

CONF_DIR = str(conf_dir())


def train(cfg: DictConfig, handoffs: bool = True, tokenizer: Tokenizer | None = None) -> dict:
    """Lock the run folder, clear what killed saves left, run the SFT warm-up first when the config has one
    (moxin/warmup.py: its own run in out_dir/warmup, whose final weights become init_from), then assemble, fit,
    export, report (`handoffs`: print the next commands at the end). `tokenizer`: the run's one, loaded here from
    ``cfg.tokenizer`` when not given; the warm-up and the run after it share it."""
    preflight(cfg)  # ux: user mistakes (unknown keys, paths, types) stop here, before the warm-up or any work
    first = launcher_rank() == 0
    if cfg.resume in (None, "", False):
        # a fresh run on a folder that holds a run is refused before the lock file is made: a refused run
        # leaves that run's folder exactly as it was (checked again under the lock in assemble())
        resolve_resume(cfg, Path(cfg.out_dir) / "checkpoints")
    with RunLock(cfg.out_dir) if first else nullcontext():
        if first:
            clean_temporaries(cfg.out_dir)
        if tokenizer is None:
            tokenizer = load_tokenizer(cfg.tokenizer)
        cfg, stopped = run_warmup(cfg, tokenizer, lambda wcfg: train(wcfg, handoffs=False, tokenizer=tokenizer))
        return stopped if stopped is not None else _train_locked(cfg, tokenizer, handoffs)


def _train_locked(cfg: DictConfig, tokenizer: Tokenizer, handoffs: bool = True) -> dict:
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    run = assemble(cfg, tokenizer)
    trainer, stage = run.trainer, run.stage
    ui.on_built(cfg, trainer, stage, run.datamodule, run.ckpt_path)  # ux: save config, log, banner, resume line
    if run.ckpt_path:
        done = finished_info(cfg, run.ckpt_path, run.datamodule)
        if done is not None:
            return done
    trainer.fit(stage, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    info = summary(cfg, run, started)
    stop = next((c for c in trainer.callbacks if isinstance(c, StopOnSignal)), None)
    if stop is not None and stop.stopped_at is not None:
        info["stopped_by_signal_at"] = stop.stopped_at  # the job comes back (requeued): no export yet
    elif cfg.export_hf:
        export(cfg, run, info)
    if trainer.is_global_zero:
        ui.print_summary(cfg, info, handoffs)
    return info


def export(cfg: DictConfig, run: Run, info: dict) -> None:
    """out_dir/hf: the final weights as a Hugging Face model with the run's tokenizer files (not when they hold
    NaN/Inf). Every rank takes part (FSDP2 gathers each parameter); rank 0 writes, one shard in memory at a time."""
    trainer, stage = run.trainer, run.stage
    hf_dir = Path(cfg.out_dir) / "hf"
    tok_files = [str(f) for f in export_files(cfg.tokenizer)] or None  # a tokenizer file, or moxin-cjk's files
    if not weights_finite(stage):
        if trainer.is_global_zero:
            print(f"not exporting {hf_dir}: the final weights hold NaN/Inf", file=sys.stderr)
        return
    export_hf(stage, hf_dir, is_global_zero=trainer.is_global_zero, tokenizer_files=tok_files)
    if trainer.is_global_zero:
        write_export_tokenizer(hf_dir, cfg, stage.tokenizer)  # tokenizer.model/json, configs
        info["hf_export"] = str(hf_dir.resolve())
        if (hf_dir.parent / "hf_adapter").is_dir():  # a LoRA run: its adapters in PEFT's format too
            info["hf_adapter"] = str((hf_dir.parent / "hf_adapter").resolve())


def finished_info(cfg: DictConfig, ckpt_path: str, datamodule) -> dict | None:
    """The summary to return when the checkpoint to resume is already the end of the run: the whole schedule
    done (saved at the last phase's end) or trainer.max_steps reached."""
    info = read_info(ckpt_path)
    total = int(datamodule.total_steps or 0)
    limit = int(cfg.trainer.max_steps)
    # finished: saved at the last phase's end, and the schedule asks for no more steps than that (a schedule
    # extended since then trains on)
    done = (info.moxin.get("finished") and (not total or info.step >= total)) or (0 < limit <= info.step)
    if not done:
        return None
    prev = Path(cfg.out_dir) / "summary.json"
    out = json.loads(prev.read_text()) if prev.exists() else {"run_name": cfg.run_name, "metrics": {}}
    out.update(checkpoint=str(Path(ckpt_path).resolve()), optimizer_steps=info.step, nothing_to_do=True)
    src = Path(ckpt_path).resolve()
    if info.moxin.get("finished"):
        # the data and LR schedules end here: trainer.max_steps only stops a run earlier, it cannot extend one
        asked = f" trainer.max_steps={limit} cannot take it further:" if limit > 0 else ""
        say(f"run '{cfg.run_name}' is complete: {info.path} ends its whole schedule (optimizer step {info.step})."
            f"{asked} the data and learning-rate schedules end there. To train more, start a new run from its "
            f"weights with a longer schedule: python -m moxin.run init_from={src} run_name=<new name> "
            "(with schedule.phases / data.steps / data.num_epochs set for the new run)")
    else:
        say(f"run '{cfg.run_name}' stopped at trainer.max_steps={limit}: {info.path} is optimizer step {info.step} of "
            f"{total or '?'} of the schedule; nothing left to do at this limit. Continue with a higher "
            f"trainer.max_steps, or without it for the whole schedule: {ui.continue_command(cfg)}")
    return out


def _last_checkpoint(out_dir: Path) -> str:
    """The step file last.ckpt points to (stable: a later resume moves last.ckpt, not this)."""
    last = out_dir / "checkpoints" / "last.ckpt"
    return str(last.resolve() if last.exists() else last)


def summary(cfg: DictConfig, run: Run, started: float) -> dict:
    """What the run did (steps, tokens, time, metrics, weights checksum, where its files are), written to
    out_dir/summary.json on rank zero and returned."""
    trainer, stage, throughput = run.trainer, run.stage, run.throughput
    out_dir = Path(cfg.out_dir).resolve()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
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
    info["data"] = run.datamodule.data_report()
    if trainer.is_global_zero:
        (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def evaluate_only(cfg: DictConfig) -> float | None:
    """+experiment=eval: score init_from on the eval tasks (moxin/eval/stage.py); returns the monitored metric."""
    value = flat_metrics(run_eval(cfg)).get(cfg.monitor)
    return None if value is None or math.isnan(value) else value


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    ui.quiet_third_party_noise()
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:  # each sweep job writes into its own multirun/<time>/<num> folder
        with open_dict(cfg):
            cfg.run_name = f"{cfg.run_name}-{hc.job.num}"
            cfg.out_dir = hc.runtime.output_dir
    if cfg.get("eval_only"):  # +experiment=eval: evaluate init_from, no training
        return guarded(lambda: (check_keys(cfg), evaluate_only(cfg))[1], lambda: None, lambda: 0,
                       exit_on_user_error=True)
    return ui.guarded_train(cfg, train)  # ux: one-line user errors, no leftovers, monitor warning


def cli() -> None:
    """`python -m moxin.run`: Ctrl-C while Hydra composes the config (before moxin's own handling starts) ends
    with one line and status 130 instead of a traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except KeyboardInterrupt:
        print("moxin: interrupted (Ctrl-C) before the run started", file=sys.__stderr__, flush=True)
        raise SystemExit(INTERRUPTED) from None


if __name__ == "__main__":
    cli()
