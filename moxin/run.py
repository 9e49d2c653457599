"""`python -m moxin.run [+experiment=NAME] [key=value ...]`: compose the config, build data, stage and
trainer, fit, print where everything went. Returns the monitored metric so Hydra sweepers can optimise it.

With no arguments it pretrains a tiny Moxin on the built-in sample corpus on the CPU in a few minutes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _sample_path(name: str) -> str:
    from moxin.data.sample import sample_path

    return str(sample_path(name))


if not OmegaConf.has_resolver("moxin_sample"):
    OmegaConf.register_new_resolver("moxin_sample", _sample_path)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to do."""


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
    if cfg.resume in (None, "", False):
        if (ckpt_dir / "last.ckpt").exists():
            raise ConfigError(f"{ckpt_dir} already holds a run's checkpoints. Continue it with resume=auto, or start "
                              f"a new run with another run_name=... (nothing is overwritten silently)")
        return None
    if cfg.resume == "auto":
        last = ckpt_dir / "last.ckpt"
        return str(last) if last.exists() else None
    p = Path(cfg.resume)
    if not p.exists():
        raise ConfigError(f"resume={cfg.resume!r}: no such checkpoint; use resume=auto or a path to a .ckpt")
    return str(p)


def check_vocab(model_cfg, tokenizer_spec) -> None:
    """The embedding must have a row for every id the tokenizer can produce (its specials included); otherwise
    the first batch dies mid-step (an IndexError on a CPU, a device-side assert on a GPU)."""
    from moxin.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_spec)
    specials = {"bos": tok._bos_id, "eos": tok._eos_id, "pad": tok._pad_id}
    top = max([tok.vocab_size - 1] + [i for i in specials.values() if i is not None])
    if top >= model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} but tokenizer={tokenizer_spec!r} produces ids up to {top} "
            f"({tok.vocab_size} entries; special ids {', '.join(f'{k} {v}' for k, v in specials.items() if v is not None)}). "
            f"Set model.vocab_size={top + 1} (or more), or choose a tokenizer with at most {model_cfg.vocab_size} "
            f"entries (tokenizer=path/to/tokenizer.json)")


def build(cfg: DictConfig):
    """Instantiate datamodule, stage, trainer from the composed config (before any training work)."""
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path = resolve_resume(cfg, ckpt_dir)
    hw = cfg.hardware
    world = world_size_of(hw)

    model_cfg = instantiate(cfg.model)
    check_vocab(model_cfg, cfg.tokenizer)
    datamodule = instantiate(cfg.data, world_size=world, seed=cfg.seed, tokenizer=cfg.tokenizer,
                             max_seq_len=model_cfg.max_seq_len, _convert_="all")
    accum = datamodule.accumulate_grad_batches
    stage = instantiate(cfg.stage, model=model_cfg, parallel=instantiate(hw.parallel),
                        init_from=cfg.init_from, _convert_="object")

    from lightning.pytorch.callbacks import ModelCheckpoint

    from moxin.callbacks import AtomicCheckpointIO, SampleGenerations, Throughput

    throughput = Throughput(peak_tflops=hw.peak_tflops)

    class SaveWhereStopped(L.Callback):
        """trainer.max_steps ends a run mid-phase: save last.ckpt right at that step (inside the loop, where
        the loop and data-loader state say 'mid-epoch'), so resume=auto continues exactly there."""

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if 0 < trainer.max_steps <= trainer.global_step and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                trainer.save_checkpoint(str(ckpt_dir / "last.ckpt"))

    callbacks = [
        ModelCheckpoint(dirpath=str(ckpt_dir), filename="step{step:06d}", auto_insert_metric_name=False,
                        every_n_train_steps=cfg.trainer.checkpoint_every_n_steps, save_last=True, save_top_k=-1
                        if cfg.trainer.keep_all_checkpoints else 1, monitor=None),
        throughput,
        SaveWhereStopped(),
    ]
    from moxin.callbacks.progress import progress_callbacks  # ux: phases, step/total, tokens, ETA; Ctrl-C hint
    from moxin.ui import run_plan

    console_callbacks, bar_on = progress_callbacks(cfg, run_plan(cfg, datamodule, stage), accum)
    callbacks += console_callbacks
    if cfg.get("samples") and cfg.samples.prompts:
        callbacks.append(SampleGenerations(list(cfg.samples.prompts), cfg.samples.max_new_tokens, cfg.tokenizer))
    val_every = val_interval_steps(cfg.trainer.val_every_n_steps, datamodule.steps_per_epoch())
    from moxin.loggers import build_loggers  # ux: CSV always, plus W&B / TensorBoard

    logger = build_loggers(cfg, out_dir)
    trainer = L.Trainer(
        accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, precision=hw.precision,
        strategy=build_strategy(hw, world), plugins=[AtomicCheckpointIO()] if hw.strategy != "fsdp2" else None,
        max_epochs=datamodule.num_epochs, reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=accum, callbacks=callbacks, logger=logger, default_root_dir=str(out_dir),
        log_every_n_steps=1, num_sanity_val_steps=0, gradient_clip_val=None,
        val_check_interval=(val_every * accum) if val_every else None, max_steps=cfg.trainer.max_steps,
        check_val_every_n_epoch=1, limit_val_batches=cfg.trainer.limit_val_batches,
        enable_progress_bar=bar_on, enable_model_summary=False,
        deterministic=cfg.trainer.deterministic, use_distributed_sampler=False,
    )
    return trainer, stage, datamodule, ckpt_path, throughput


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


def summary(cfg, trainer, stage, datamodule, throughput, started: float) -> dict:
    out_dir = Path(cfg.out_dir).resolve()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    from moxin.distributed import weights_checksum

    checksum = weights_checksum(stage.model)  # collective under FSDP2: every rank computes it
    info = {
        "run_name": cfg.run_name,
        "out_dir": str(out_dir),
        "checkpoint": str(out_dir / "checkpoints" / "last.ckpt"),
        "optimizer_steps": trainer.global_step,
        "target_tokens": stage.tokens_seen,
        "seconds": round(time.time() - started, 1),
        "tokens_per_s": throughput.tokens_per_s,
        "mfu": throughput.mfu,
        "metrics": metrics,
        "weights_checksum": checksum,
        "init_from": cfg.init_from,
        "init_checksum": stage.init_checksum,
    }
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        info["metrics_csv"] = str(Path(trainer.logger.log_dir).resolve() / "metrics.csv")
    if hasattr(datamodule, "data_report"):
        info["data"] = datamodule.data_report()
    if trainer.is_global_zero:
        (out_dir / "summary.json").write_text(json.dumps(info, indent=2, default=str))
    return info


def print_summary(cfg, info: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    c = Console()
    t = Table(title=f"moxin run '{info['run_name']}' finished", show_header=False)
    t.add_row("steps", str(info["optimizer_steps"]))
    t.add_row("target tokens", f"{info['target_tokens']:,}")
    t.add_row("time", f"{info['seconds']} s")
    if info.get("tokens_per_s"):
        t.add_row("throughput", f"{info['tokens_per_s']:,.0f} tokens/s")
    for k in sorted(info["metrics"]):
        if k.startswith(("train/loss", "val/", "dpo/", "grpo/", "sft/")):
            t.add_row(k, f"{info['metrics'][k]:.4f}")
    t.add_row("checkpoint", info["checkpoint"])
    if info.get("hf_export"):
        t.add_row("HF export", info["hf_export"])
    if info.get("metrics_csv"):
        t.add_row("metrics CSV", info["metrics_csv"])
    t.add_row("summary", str(Path(info["out_dir"]) / "summary.json"))
    c.print(t)
    from moxin.ui import print_handoffs  # ux: continue / next stage / inspect, one paste-able line each

    print_handoffs(cfg, info)


def train(cfg: DictConfig) -> dict:
    started = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    from moxin import ui
    from moxin.errors import preflight

    preflight(cfg)  # ux: user mistakes stop here, one message each
    trainer, stage, datamodule, ckpt_path, throughput = build(cfg)
    ui.on_built(cfg, trainer, stage, datamodule, ckpt_path)  # ux: save config, log file, banner, resume message
    trainer.fit(stage, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    info = summary(cfg, trainer, stage, datamodule, throughput, started)
    if cfg.export_hf and trainer.is_global_zero and type(trainer.strategy).__name__ != "ModelParallelStrategy":
        from moxin.model.hf import save_hf

        hf_dir = Path(cfg.out_dir) / "hf"
        tok_files = [str(cfg.tokenizer)] if Path(str(cfg.tokenizer)).is_file() else None
        save_hf(stage.model, hf_dir, tokenizer_files=tok_files)
        if cfg.tokenizer == "mistral":  # the SentencePiece model, under the name HF's LlamaTokenizer looks for
            import shutil

            from moxin.tokenizer import mistral_model_path

            shutil.copy2(mistral_model_path(), hf_dir / "tokenizer.model")
        from moxin.tokenizer.hf_export import write_hf_tokenizer_files  # ux: tokenizer/generation config

        write_hf_tokenizer_files(hf_dir, cfg)
        info["hf_export"] = str(hf_dir.resolve())
    if trainer.is_global_zero:
        print_summary(cfg, info)
    return info


def quiet_third_party_noise() -> None:
    """Drop messages from dependencies that say nothing about this run (advertising, deprecations inside
    Lightning/torchdata that users cannot act on)."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*set_vital.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
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

    return guarded_train(cfg, train)


if __name__ == "__main__":
    main()
