"""Turn a composed config into the objects of a run: tokenizer, data module (connected), stage, strategy,
callbacks, loggers and the Lightning trainer, in one readable place (torchtitan's ``Trainer.__init__``).

``moxin.run`` (training), ``moxin.warmup`` (the SFT run before GRPO and the solutions it trains on) and
``moxin.eval.stage`` (evaluation) build through this module; it imports none of them. The run's one tokenizer
is made here from ``cfg.tokenizer`` unless the caller hands one in (a warm-up and its run share one), and every
object that needs it gets that object.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from moxin.callbacks import SampleGenerations, Throughput
from moxin.callbacks.evaluation import EvalCallback
from moxin.callbacks.progress import progress_callbacks
from moxin.checkpoint.async_save import AsyncCheckpointStrategy
from moxin.checkpoint.files import AtomicCheckpointIO, CheckpointError, read_info
from moxin.checkpoint.lock import launcher_rank
from moxin.checkpoint.policy import CheckpointPolicy
from moxin.checkpoint.resume import candidates, find_resume
from moxin.checkpoint.signals import StopOnSignal
from moxin.config import ConfigError, RunConfig, check_tensor_parallel
from moxin.data.sample import sample_path
from moxin.loggers import build_loggers
from moxin.tokenizer import Tokenizer, load_tokenizer
from moxin.ui import run_plan

__all__ = ["Run", "assemble", "build_strategy", "check_resume_world", "check_tensor_parallel_run", "check_vocab",
           "connected_datamodule", "data_parallel_size_of", "hardware_trainer", "plugins_for", "resolve_resume", "say",
           "tensor_parallel_size_of", "val_interval_steps", "world_size_of"]

if not OmegaConf.has_resolver("moxin_sample"):  # ${moxin_sample:NAME}: a file of the built-in sample data
    OmegaConf.register_new_resolver("moxin_sample", lambda name: str(sample_path(name)))


class Run(NamedTuple):
    """What :func:`assemble` builds: fit ``stage`` on ``datamodule`` with ``trainer`` from ``ckpt_path`` (None: a
    fresh start); ``throughput`` holds the run's tokens/s and MFU for the summary."""

    trainer: L.Trainer
    stage: Any
    datamodule: Any
    ckpt_path: str | None
    throughput: Throughput


def say(msg: str) -> None:
    """A one-line notice on the first process only (every rank takes the same decisions)."""
    if launcher_rank() == 0:
        print(msg, file=sys.stderr, flush=True)


# ---- hardware ----------------------------------------------------------------------------------------------------
def world_size_of(hw: DictConfig) -> int:
    """Processes of the run (hardware.devices x hardware.num_nodes), known before the trainer exists."""
    devices = hw.devices
    if devices in (-1, "auto"):
        devices = torch.cuda.device_count() if hw.accelerator in ("gpu", "cuda") else 1
    elif isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        devices = len(devices)
    return int(devices) * int(hw.num_nodes)


def tensor_parallel_size_of(hw: DictConfig):
    """``hardware.tensor_parallel_size`` (Lightning's argument; 1, no tensor parallelism, when absent)."""
    return hw.get("tensor_parallel_size", 1)


def data_parallel_size_of(hw: DictConfig) -> int:
    """Data-parallel ranks of the run: the world over the tensor-parallel group size (the ranks of a group read the
    same rows, so the data is planned for world / T readers)."""
    return world_size_of(hw) // int(tensor_parallel_size_of(hw))


def build_strategy(hw: DictConfig, world: int, async_checkpoint: bool = False):
    """Lightning's strategy for ``hardware.strategy``: fsdp2 (FSDP2 over the data-parallel ranks, tensor
    parallelism over groups of ``hardware.tensor_parallel_size`` ranks; its checkpoints written in the background
    with `async_checkpoint`), ddp_cpu (DDP over gloo), or Lightning's own name."""
    name = hw.strategy
    if async_checkpoint and name != "fsdp2":
        raise ConfigError(f"trainer.async_checkpoint=true writes FSDP2's distributed checkpoints in the background, "
                          f"and this run's hardware.strategy is {name!r} (single-file checkpoints): use hardware=fsdp "
                          "(strategy fsdp2), or trainer.async_checkpoint=false")
    if name == "fsdp2":
        tp = int(tensor_parallel_size_of(hw))
        dp = hw.get("data_parallel_size", "auto")
        cls = AsyncCheckpointStrategy if async_checkpoint else ModelParallelStrategy
        return cls(data_parallel_size=world // tp if dp == "auto" else int(dp), tensor_parallel_size=tp,
                   save_distributed_checkpoint=True)
    if name == "ddp_cpu":
        return DDPStrategy(process_group_backend="gloo")
    return name


def plugins_for(hw: DictConfig) -> list | None:
    """Atomic checkpoint files (ModelParallelStrategy writes its own folders), and under SLURM the cluster
    environment without Lightning's requeue-in-the-signal-handler (StopOnSignal saves at a step boundary)."""
    plugins = [AtomicCheckpointIO()] if hw.strategy != "fsdp2" else []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins or None


def hardware_trainer(cfg: DictConfig, **settings) -> L.Trainer:
    """A Lightning trainer on the config's hardware (accelerator, devices, nodes, precision, strategy) logging to
    the run's loggers in ``out_dir``; ``settings`` are the job's own (training's loop, evaluation's quiet test)."""
    hw = cfg.hardware
    out_dir = Path(cfg.out_dir)
    async_checkpoint = bool((cfg.get("trainer") or {}).get("async_checkpoint", False))
    return L.Trainer(accelerator=hw.accelerator, devices=hw.devices, num_nodes=hw.num_nodes, precision=hw.precision,
                     strategy=build_strategy(hw, world_size_of(hw), async_checkpoint),
                     logger=build_loggers(cfg, out_dir),
                     default_root_dir=str(out_dir), enable_model_summary=False, use_distributed_sampler=False,
                     **settings)


# ---- checks ------------------------------------------------------------------------------------------------------
def resolve_resume(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """The checkpoint to continue from: none for a fresh run (refused where checkpoints exist), the newest
    complete one for resume=auto (newer incomplete or unreadable ones are named in a warning and skipped),
    or the given path (checked)."""
    out_dir = ckpt_dir.parent
    if cfg.resume in (None, "", False):
        if candidates(out_dir) or (ckpt_dir / "last.ckpt").exists():
            raise ConfigError(f"{ckpt_dir} already holds a run's checkpoints. Continue it with resume=auto, or start "
                              f"a new run with another run_name=... (nothing is overwritten silently)")
        return None
    if cfg.resume == "auto":
        info, skipped = find_resume(out_dir)
        for why in skipped:
            say(f"resume=auto: skipping {why}")
        if info is None:
            if skipped:
                raise ConfigError(f"resume=auto: no complete checkpoint in {out_dir} (skipped: {skipped}); remove "
                                  "the broken files to start over, or give resume=<path>")
            return None
        say(f"resume=auto: continuing from {info.path} (optimizer step {info.step})")
        return str(info.path)
    try:
        return str(read_info(cfg.resume).path)
    except CheckpointError as e:
        raise ConfigError(f"resume={cfg.resume!r}: {e}; use resume=auto or a path to a complete checkpoint") from None


def check_resume_world(ckpt_path: str, world: int, datamodule) -> None:
    """A checkpoint written by another process count resumes where the data module can move its loader state to
    the new layout (every built-in one: pretraining's readers are redistributed, the step samplers' positions
    rescaled); a data module that cannot (``resumes_on_another_world`` False, a user's own by default) is refused."""
    saved_world = read_info(ckpt_path).world_size
    if saved_world and saved_world != world and not datamodule.resumes_on_another_world:
        raise ConfigError(
            f"{ckpt_path} was written by {saved_world} processes; this run has {world} (hardware.devices x "
            f"hardware.num_nodes). {type(datamodule).__name__} keeps its data position as batches of the process "
            f"count that wrote it (resumes_on_another_world is False), so resume with {saved_world} processes, "
            f"or start a new run from its weights: init_from={ckpt_path} (the weights reshard to any process count)")


def check_tensor_parallel_run(cfg: DictConfig, model_cfg) -> None:
    """``hardware.tensor_parallel_size`` that the run cannot hold, refused before any work: shapes it does not
    divide (`moxin.config.check_tensor_parallel`), and what the tensor-parallel plan does not cover yet: LoRA (its
    wrapped projections are not in the plan). Float8 composes (torchao's float8 styles under tensorwise,
    `moxin.tensor_parallel._styles`), tensorwise on GPUs only (gloo sends no float8 tensors); sample generations, evaluation, GRPO's rollouts, held-out rewards and
    validation decode through the same forward (or GRPO's gathered copy, the group splitting the rows) and do
    run; GRPO's update counts a tensor group's rows once (`GRPOStage.row_sums`)."""
    hw = cfg.hardware
    tp = tensor_parallel_size_of(hw)
    check_tensor_parallel(tp, world_size_of(hw), model_cfg, hw.strategy, int(hw.parallel.get("replicate", 1)))
    if tp == 1:
        return
    lora = cfg.stage.get("lora")
    if lora is not None and lora.get("rank"):
        raise ConfigError(f"hardware.tensor_parallel_size={tp} does not support LoRA (stage.lora.rank > 0) yet (not "
                          "in the tensor-parallel plan). Run it with hardware.tensor_parallel_size=1 (FSDP2 or HSDP), "
                          "or train without it (stage.lora.rank=0)")
    float8 = str(hw.parallel.get("float8", "none"))
    if float8 == "tensorwise" and str(hw.get("accelerator", "")) == "cpu":
        raise ConfigError(f"hardware.tensor_parallel_size={tp} with hardware.parallel.float8=tensorwise on the CPU: "
                          "torchao's tensorwise float8 styles all-gather activations in float8, which gloo (the CPU's "
                          "backend) cannot send (NCCL sends them as bytes). On the CPU use "
                          "hardware.parallel.float8=rowwise (its gathers stay in high precision), or a GPU")


def check_vocab(model_cfg, tok: Tokenizer) -> None:
    """The embedding must have a row for every id the tokenizer can produce (its specials included); otherwise
    the first batch dies mid-step (an IndexError on a CPU, a device-side assert on a GPU)."""
    specials = {"bos": tok._bos_id, "eos": tok._eos_id, "pad": tok._pad_id}
    top = max([tok.vocab_size - 1] + [i for i in specials.values() if i is not None])
    if top >= model_cfg.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model_cfg.vocab_size} but tokenizer={tok.name!r} produces ids up to {top} "
            f"({tok.vocab_size} entries; special ids {', '.join(f'{k} {v}' for k, v in specials.items() if v is not None)}). "
            f"Set model.vocab_size={top + 1} (or more), or choose a tokenizer with at most {model_cfg.vocab_size} "
            f"entries (tokenizer=path/to/tokenizer.json)")


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


# ---- the run -----------------------------------------------------------------------------------------------------
def connected_datamodule(cfg: DictConfig, tokenizer: Tokenizer, max_seq_len: int | None = None):
    """``cfg.data`` instantiated with the run's seed and connected to the run's tokenizer and process count."""
    datamodule = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    datamodule.connect(tokenizer, world_size=data_parallel_size_of(cfg.hardware), max_seq_len=max_seq_len)
    return datamodule


def assemble(cfg: DictConfig, tokenizer: Tokenizer | None = None) -> Run:
    """Build a training run from the composed config (before any training work): checks, resume point,
    tokenizer (``tokenizer``, or loaded from ``cfg.tokenizer``), data module, stage, callbacks, trainer."""
    run_cfg = RunConfig.from_cfg(cfg)  # trainer.* types and ranges, resume, init_from
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    ckpt_path = resolve_resume(cfg, ckpt_dir)
    hw = cfg.hardware
    parallel = instantiate(hw.parallel)
    parallel.check_world(world_size_of(hw), hw.strategy)  # HSDP's replica groups, before any work

    model_cfg = instantiate(cfg.model)
    check_tensor_parallel_run(cfg, model_cfg)  # shapes the tensor dimension splits, jobs it does not cover
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer)
    check_vocab(model_cfg, tokenizer)
    datamodule = connected_datamodule(cfg, tokenizer, max_seq_len=model_cfg.max_seq_len)
    if ckpt_path:
        check_resume_world(ckpt_path, world_size_of(hw), datamodule)
    accum = datamodule.accumulate_grad_batches
    stage = instantiate(cfg.stage, model=model_cfg, parallel=parallel, tokenizer=tokenizer,
                        init_from=cfg.init_from, max_nonfinite_steps=run_cfg.trainer.max_nonfinite_steps,
                        _convert_="object")

    throughput = Throughput(peak_tflops=hw.peak_tflops)
    # one policy for every strategy: new name, complete, then last.ckpt switched to it, then retention
    policy = CheckpointPolicy(ckpt_dir, cfg.trainer.checkpoint_every_n_steps, cfg.trainer.keep_all_checkpoints,
                              enabled=cfg.trainer.get("save_checkpoints", True),
                              keep=int(cfg.trainer.get("keep_checkpoints", 1)))
    callbacks = [StopOnSignal(policy), throughput]  # the policy goes last (below)
    # phases, step/total, tokens, ETA; the Ctrl-C hint
    console_callbacks, bar_on = progress_callbacks(cfg, run_plan(cfg, datamodule, stage), accum)
    callbacks += console_callbacks
    if cfg.get("samples") and cfg.samples.prompts:
        callbacks.append(SampleGenerations(list(cfg.samples.prompts), cfg.samples.max_new_tokens, tokenizer))
    if cfg.get("eval") and cfg.eval.get("after"):  # +eval=NAME eval.after=phase|stage (moxin/eval)
        callbacks.append(EvalCallback(cfg.eval, tokenizer, str(out_dir)))
    # last, so that in every hook it sees what the others did: a phase's or the run's checkpoint is published
    # after that phase's samples and evaluation are on record (a kill in an evaluation redoes it on resume)
    callbacks.append(policy)
    val_every = val_interval_steps(cfg.trainer.val_every_n_steps, datamodule.steps_per_epoch())
    trainer = hardware_trainer(
        cfg, plugins=plugins_for(hw), max_epochs=datamodule.num_epochs, reload_dataloaders_every_n_epochs=1,
        accumulate_grad_batches=accum, callbacks=callbacks, log_every_n_steps=1, num_sanity_val_steps=0,
        gradient_clip_val=None, val_check_interval=(val_every * accum) if val_every else None,
        max_steps=cfg.trainer.max_steps, check_val_every_n_epoch=1, limit_val_batches=cfg.trainer.limit_val_batches,
        enable_progress_bar=bar_on, enable_checkpointing=False, deterministic=cfg.trainer.deterministic,
    )
    return Run(trainer, stage, datamodule, ckpt_path, throughput)
