"""The entry point: every experiment composes; the tiny ones run; a stopped run resumes exactly; bad
configs stop before any training step with an error that names the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moxin import run as R
from moxin.assemble import assemble, val_interval_steps
from moxin.config import ConfigError
from moxin.presets import load_preset
from tests.helpers.resume_state import (load_checkpoint, sources_override, state_diff,
                                        write_corpus_with_late_duplicates)
from tests.helpers.compose import compose_config, logged_train_losses
from tests.helpers.tiny_overrides import TINY_MODEL, TINY_PRETRAIN, tiny_model
from tests.helpers.tokenizer_count import count_tokenizers

EXPERIMENTS = sorted(p.stem for p in (Path(R.CONF_DIR) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name, tmp_path):
    cfg = compose_config([f"+experiment={name}", f"out_dir={tmp_path}", "run_name=t"])
    OmegaConf.resolve(cfg)  # every interpolation resolves
    model_cfg = instantiate(cfg.model)
    assert model_cfg.num_params() > 0
    assert cfg.stage._target_.startswith("moxin.stages.")
    if name.endswith(("moxin_7b", "moxin_instruct", "moxin_reasoning")):
        assert model_cfg.n_layers == 36 and model_cfg.dim == 4096, "the published recipes use Moxin-7B"


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(R.CONF_DIR) / "data").glob("*.yaml")))
def test_every_data_config_instantiates_and_connects(name):
    """conf/data/*.yaml build a MoxinDataModule (no data is read: hub sets stay offline) that takes the run's
    objects through connect()."""
    from moxin.data.base import MoxinDataModule

    cfg = compose_config([f"data={name}", "model=moxin-7b"]
                         + (["schedule=moxin_7b"] if name in ("moxin_pretrain", "moxin_enhance") else []))
    if name == "moxin_pretrain":  # phases 1-2's corpora: phase 3 reads moxin_enhance's benchmark sources
        cfg.schedule.phases = cfg.schedule.phases[:2]
    dm = instantiate(cfg.data, seed=cfg.seed, _convert_="all")
    assert isinstance(dm, MoxinDataModule)
    tok = object()
    dm.connect(tok, world_size=1, max_seq_len=cfg.model.max_seq_len)
    assert dm.tokenizer is tok and dm.world_size == 1 and dm.accumulate_grad_batches >= 1 and dm.num_epochs >= 1


def test_default_run_composes_to_tiny_cpu_pretraining():
    cfg = compose_config([])
    assert cfg.stage._target_ == "moxin.stages.pretrain.PretrainStage"
    assert cfg.hardware.accelerator == "cpu"
    assert [p.name for p in cfg.schedule.phases] == ["ctx128", "ctx256", "enhance"]
    assert cfg.schedule.phases[1].seq_len == 2 * cfg.schedule.phases[0].seq_len


def test_pretrain_smoke_run_learns_and_writes_everything(tmp_path):
    cfg = compose_config(["+experiment=pretrain", f"out_dir={tmp_path}", "run_name=smoke"] + TINY_PRETRAIN + ["export_hf=true"])
    info = R.train(cfg)
    losses = logged_train_losses(tmp_path)
    assert info["optimizer_steps"] == 12 and sorted(losses) == list(range(12))
    assert losses[11] < losses[0] - 0.5, losses  # it learns
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert "val/loss" in info["metrics"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["data"]["sources"]["prose"]["records"] > 0
    # the HF export loads back into moxin with the same weights
    from moxin.model import load_hf

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    back = load_hf(tmp_path / "hf")
    w = ckpt["state_dict"]["model.layers.0.attention.wq.weight"]
    assert torch.equal(back.layers[0].attention.wq.weight, w)


def test_a_run_builds_one_tokenizer_and_hands_it_everywhere(tmp_path, monkeypatch):
    """`tokenizer: mistral` is loaded once per run (moxin.assemble): the data module, the stage, the sample callback
    and the HF export use that object, and the loader workers get it pickled (nothing loads it again)."""
    from moxin.callbacks import SampleGenerations

    built = count_tokenizers(monkeypatch)
    over = TINY_PRETRAIN + ["+experiment=pretrain", "hardware.num_workers=2", "samples.prompts=[Hello]",
                            "samples.max_new_tokens=2"]
    trainer, stage, dm, _, _ = assemble(compose_config(over + [f"out_dir={tmp_path / 'a'}", "run_name=a"]))
    samples = next(c for c in trainer.callbacks if isinstance(c, SampleGenerations))
    assert dm.tokenizer is stage.tokenizer is samples.tokenizer and built == ["mistral"]
    built.clear()
    info = R.train(compose_config(over + [f"out_dir={tmp_path / 'b'}", "run_name=b", "export_hf=true"]))
    assert info["optimizer_steps"] == 12 and (tmp_path / "b" / "hf" / "tokenizer.json").exists()
    assert built == ["mistral"]  # assemble, fit (2 workers per phase), samples, check_vocab, export: one


def _dedup_dropped(ckpt: dict) -> int:
    """Documents the readers of a pretraining checkpoint dropped as duplicates so far (all workers, all sources)."""
    from moxin.data.packed_dataset import reader_states

    return sum(c["dropped"] for st in reader_states(ckpt["PretrainDataModule"]) for c in st["dedup"]["counts"].values())


@pytest.mark.parametrize("workers", [2])
def test_resume_continues_exactly(tmp_path, workers):
    """Stop after step 4, resume: every step's loss, and the whole final checkpoint tensor by tensor (weights,
    optimizer moments, LR schedule, loop counters, loader and reader states with their dedup sets, tokens_seen,
    RNG states), equal the uninterrupted run's. Every duplicate of the corpus comes after the resume point, so a
    resume that forgot the dedup set trains on them, and one that reset tokens_seen ends with a smaller count."""
    sources = write_corpus_with_late_duplicates(tmp_path / "corpus")
    common = TINY_PRETRAIN + [sources_override(sources), f"hardware.num_workers={workers}",
                              "trainer.val_every_n_steps=null"]
    full = R.train(compose_config(common + [f"out_dir={tmp_path / 'full'}", "run_name=full"]))
    R.train(compose_config(common + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=4"]))
    at_stop = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.ckpt")
    with pytest.raises(ConfigError, match="resume=auto"):  # never silently overwrite a run
        assemble(compose_config(common + [f"out_dir={tmp_path / 'part'}", "run_name=part"]))
    R.train(compose_config(common + [f"out_dir={tmp_path / 'part'}", "run_name=part", "resume=auto"]))
    a, b = logged_train_losses(tmp_path / "full"), logged_train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(12)), (sorted(a), sorted(b))
    for step in a:  # phases, LR schedule, data position and weights all continue as if never stopped
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])
    assert full["optimizer_steps"] == 12
    end, resumed = (load_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "part"))
    assert at_stop["global_step"] == 4 and end["global_step"] == 12
    assert _dedup_dropped(at_stop) == 0 < _dedup_dropped(end), "the fixture's duplicates come after the resume point"
    assert 0 < at_stop["moxin"]["tokens_seen"] < end["moxin"]["tokens_seen"]
    assert state_diff(end, resumed) == []


ONLY_PROSE = "schedule.phases=[{name: a, seq_len: 64, tokens: 4096, mixture: {prose: 1}}]"


@pytest.mark.parametrize("overrides, match", [
    (["schedule.phases=[{name: a, seq_len: 4096, tokens: 8192, mixture: {prose: 1}}]"], "seq_len"),
    (["schedule.phases=[{name: a, seq_len: 64, tokens: 4096, mixture: {prose: -1, code: 1}}]"], "prose"),
    (["schedule.phases=[{name: a, seq_len: 64, tokens: 4096, mixture: {prose: 0, code: 0}}]"], "zero"),
    (["schedule.phases=[{name: a, seq_len: 64, tokens: 4096, mixture: {poetry: 1}}]"], "poetry"),
    (["data.sources=[{name: prose, path: /nonexistent/corpus.jsonl}]", ONLY_PROSE], "/nonexistent/corpus.jsonl"),
    (["data.sources=[{name: prose, path: EMPTY}]", ONLY_PROSE], "no document|empty"),
    (["data.sources=[{name: prose, path: NOFIELD, text_field: text}]", ONLY_PROSE], "text"),
    (["data.sources=[{name: prose, path: MALFORMED}]", ONLY_PROSE], "malformed|bad"),
])
def test_bad_input_stops_before_any_training_step(tmp_path, overrides, match):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "nofield.jsonl").write_text("\n".join('{"content": "some words here"}' for _ in range(50)))
    (tmp_path / "malformed.jsonl").write_text("\n".join('{"text": "fine"}' if i % 2 else "{not json" for i in range(400)))
    subst = {"EMPTY": tmp_path / "empty.jsonl", "NOFIELD": tmp_path / "nofield.jsonl",
             "MALFORMED": tmp_path / "malformed.jsonl"}
    for k, v in subst.items():
        overrides = [o.replace(k, str(v)) for o in overrides]
    out = tmp_path / "run"
    with pytest.raises(Exception, match=match):
        R.train(compose_config(TINY_PRETRAIN + overrides + [f"out_dir={out}", "run_name=bad"]))
    assert not list(out.glob("**/*.ckpt")) and not list(out.glob("logs/*/metrics.csv")), "a step ran"


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(R.CONF_DIR) / "model").glob("*.yaml")))
def test_every_model_preset_composes_through_the_schema(name):
    """conf/model/<name>.yaml is typed by ModelConfig's own fields (moxin/config/schema.py): the composed node
    has exactly ModelConfig's fields (defaults filled in) and instantiates to load_preset(name)."""
    import dataclasses

    from moxin.config import ModelConfig
    from moxin.config.schema import ModelConfigSchema

    node = compose_config([f"model={name}"]).model
    assert OmegaConf.get_type(node) is ModelConfigSchema
    assert list(node) == ["_target_"] + [f.name for f in dataclasses.fields(ModelConfig)]
    assert node._target_ == "moxin.config.ModelConfig"
    assert instantiate(node) == load_preset(name)


def test_schemas_are_the_dataclasses_fields():
    """One source: each schema is its dataclass's fields (and types mapped for OmegaConf), plus _target_; every
    stage's optim, GRPO's grpo, every hardware's parallel and every eval config are typed by them."""
    import dataclasses
    import pickle

    from moxin.config import schema as S
    from moxin.config import EvalConfig, GRPOConfig, OptimConfig, ParallelConfig

    def names(c):
        return [f.name for f in dataclasses.fields(c)]

    assert names(S.OptimConfigSchema) == ["_target_"] + names(OptimConfig)
    assert names(S.GRPOConfigSchema) == ["_target_"] + names(GRPOConfig)
    assert names(S.ParallelConfigSchema) == ["_target_"] + names(ParallelConfig)
    assert names(S.EvalConfigSchema) == names(EvalConfig)
    for stage in ("pretrain", "sft", "dpo", "grpo"):
        cfg = compose_config([f"stage={stage}"] + (["data=grpo_arithmetic"] if stage == "grpo" else []))
        assert OmegaConf.get_type(cfg.stage.optim) is S.OptimConfigSchema, stage
        assert isinstance(instantiate(cfg.stage.optim), OptimConfig)
    grpo = compose_config(["+experiment=grpo"])
    assert OmegaConf.get_type(grpo.stage.grpo) is S.GRPOConfigSchema
    assert grpo.stage.grpo.aggregation == "token"  # StrEnum fields stay strings in the config
    assert instantiate(grpo.stage.grpo).aggregation == "token"
    assert pickle.loads(pickle.dumps(grpo)) == grpo
    for hw in sorted(p.stem for p in (Path(R.CONF_DIR) / "hardware").glob("*.yaml")):
        node = compose_config([f"hardware={hw}"]).hardware.parallel
        assert OmegaConf.get_type(node) is S.ParallelConfigSchema, hw
        assert isinstance(instantiate(node), ParallelConfig)
    for ev in sorted(p.stem for p in (Path(R.CONF_DIR) / "eval").glob("*.yaml")):
        node = compose_config(["+experiment=eval", f"eval={ev}"]).eval
        assert OmegaConf.get_type(node) is S.EvalConfigSchema, ev
        EvalConfig.from_any(node)


def test_unknown_key_is_refused_naming_it():
    with pytest.raises(Exception, match="no_such_knob"):
        compose_config(["model.no_such_knob=3"])


def test_val_interval_falls_on_phase_ends():
    assert val_interval_steps(25, [16, 16, 8]) == 8
    assert val_interval_steps(5, [12, 12]) == 4
    assert val_interval_steps(None, [12]) is None


def _resume_matches(tmp_path, base, stop=3, total=6, unequal=()):
    """Run `total` steps straight; run `stop` steps, resume to `total`; every step's loss and the whole final
    checkpoint (weights, optimizer, loop and loader state, counters, RNG states) must match, but for the leaves
    named in `unequal`."""
    R.train(compose_config(base + [f"out_dir={tmp_path / 'full'}", "run_name=full", f"trainer.max_steps={total}"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", f"trainer.max_steps={stop}"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", f"trainer.max_steps={total}",
                             "resume=auto"]))
    a, b = logged_train_losses(tmp_path / "full"), logged_train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(total)), (sorted(a), sorted(b))
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-5), (step, a[step], b[step])
    diff = state_diff(*(load_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "part")))
    assert [d for d in diff if d.split(":")[0] not in unequal] == []


SFT_DPO_TINY = TINY_MODEL + ["data.batch_size=8", "data.micro_batch_size=4", "trainer.val_every_n_steps=null",
                             "samples.prompts=[]", "trainer.progress_bar=none", "hardware.num_workers=0",
                             "export_hf=false", "trainer.checkpoint_every_n_steps=100"]


def test_sft_resume_continues_exactly(tmp_path):
    _resume_matches(tmp_path, ["+experiment=sft", "data.max_length=128"] + SFT_DPO_TINY)


def test_dpo_resume_continues_exactly(tmp_path):
    # the first run computes the reference log-probs (their loader draws a seed from torch's generator) and the
    # second reuses them from the cache, so the torch generator differs from the start, resume or not
    _resume_matches(tmp_path, ["+experiment=dpo", f"stage.ref_cache_dir={tmp_path / 'cache'}"] + SFT_DPO_TINY,
                    unequal=("/moxin/rng_torch",))


def test_grpo_resume_continues_exactly(tmp_path):
    """Rollouts are seeded by (seed, step, rank): a GRPO run stopped mid-RL and resumed regenerates the same
    completions and takes the same updates (after a 40-step SFT warm-up, its own run in out_dir/warmup that the
    resumed command does not run again; steps 0-3 are the rollout steps)."""
    base = ["+experiment=grpo", *tiny_model(n_layers=1, sliding_window=None), "data.steps=4",
            "data.prompts_per_step=4", "data.task.pool=4", "stage.grpo.group_size=4", "stage.grpo.max_new_tokens=8",
            "warmup.steps=40", "warmup.batch_size=4", "warmup.micro_batch_size=4", "warmup.optim.lr=5e-3",
            "stage.grpo.verifier_workers=0", "stage.grpo.ppo_epochs=1", "stage.grpo.num_minibatches=1",
            "stage.grpo.filter_zero_std=false", "stage.grpo.mask_truncated=false", "stage.optim.lr=1e-3",
            "trainer.progress_bar=none"]
    R.train(compose_config(base + [f"out_dir={tmp_path / 'full'}", "run_name=full"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "trainer.max_steps=2"]))
    R.train(compose_config(base + [f"out_dir={tmp_path / 'part'}", "run_name=part", "resume=auto"]))
    a, b = logged_train_losses(tmp_path / "full"), logged_train_losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == [0, 1, 2, 3], (sorted(a), sorted(b))
    assert any(abs(a[s]) > 1e-4 for s in (2, 3)), a  # real updates after the resume point (groups with signal)
    assert len(list((tmp_path / "part" / "warmup").glob("logs/version_*"))) == 1  # the warm-up ran once
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a[step], b[step])
    assert state_diff(*(load_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("full", "part"))) == []


def test_vocab_smaller_than_tokenizer_is_refused_before_any_step(tmp_path):
    cfg = compose_config(["model=tiny", f"out_dir={tmp_path}", "run_name=t"])
    with pytest.raises(ConfigError, match=r"model.vocab_size=512 .* ids up to 31999 .*model.vocab_size=32000"):
        assemble(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_finished_run_says_why_max_steps_cannot_extend_it(tmp_path, capsys):
    """A run that ended its whole schedule, continued with a larger trainer.max_steps, trains nothing and says
    why (the schedules end there) and how to train more, instead of advising to raise trainer.max_steps."""
    base = TINY_PRETRAIN + [f"out_dir={tmp_path}", "run_name=done"]
    R.train(compose_config(base))
    capsys.readouterr()
    again = R.train(compose_config(base + ["resume=auto", "trainer.max_steps=44"]))
    err = capsys.readouterr().err
    assert again["nothing_to_do"] and again["optimizer_steps"] == 12
    assert "trainer.max_steps=44 cannot take it further" in err and "init_from=" in err, err
    assert "Raise trainer.max_steps" not in err


def test_readme_own_jsonl_command_runs(tmp_path):
    """README "Pretraining on your own files": its command, with a jsonl file of ours and a tiny model, composes
    and trains a few steps; data.sources alone stops before any work, naming the phase and the fix."""
    import re
    import shlex

    from moxin.errors import preflight

    readme = (Path(R.__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Pretraining on your own files"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    args = shlex.split(block.replace("\\\n", " "))
    assert args[:3] == ["python", "-m", "moxin.run"], args
    corpus = tmp_path / "my.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i}: " + "the river runs to the sea. " * (20 + i % 7)})
                              + "\n" for i in range(200)))
    overrides = [a.replace("/path/to/my.jsonl", str(corpus)) for a in args[3:]]
    small = TINY_MODEL + ["trainer.max_steps=2", "export_hf=false", "samples.prompts=[]", "trainer.progress_bar=none",
                          "data.val_tokens=2048", f"out_dir={tmp_path / 'run'}"]
    info = R.train(compose_config(overrides + small))
    assert info["optimizer_steps"] == 2 and info["data"], info
    sources_only = [a for a in overrides if a.startswith("data.sources=")]
    with pytest.raises(ConfigError, match=r"schedule.phases\[0\] \(ctx128\).mixture names source 'prose'.*"
                                         r"'schedule.phases=\[\{name: main"):
        preflight(compose_config(sources_only + [f"out_dir={tmp_path / 'x'}", "run_name=x"]))


def test_keep_checkpoints_keeps_the_newest_n_and_weights_only_export(tmp_path):
    """trainer.keep_checkpoints=N: the newest N step checkpoints stay (last.ckpt -> the newest); with
    trainer.save_checkpoints=false a run leaves only its weights-only hf/ export (the README's Disk section)."""
    from moxin.checkpoint.files import step_name
    from moxin.checkpoint.policy import apply_retention

    d = tmp_path / "unit"
    d.mkdir()
    for step in (3, 6, 9, 12, 1000000):
        (d / step_name(step)).write_bytes(b"x")
    apply_retention(d, step_name(1000000), keep_all=False, keep=3)
    assert sorted(p.name for p in d.iterdir()) == sorted(step_name(s) for s in (9, 12, 1000000))
    R.train(compose_config(TINY_PRETRAIN + [f"out_dir={tmp_path / 'k'}", "run_name=k", "trainer.keep_checkpoints=2"]))
    ck = tmp_path / "k" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["last.ckpt", "step000009.ckpt", "step000012.ckpt"]
    assert (ck / "last.ckpt").resolve().name == "step000012.ckpt"
    R.train(compose_config(TINY_PRETRAIN + [f"out_dir={tmp_path / 'w'}", "run_name=w", "trainer.max_steps=2",
                                      "trainer.save_checkpoints=false", "export_hf=true"]))
    assert not (tmp_path / "w" / "checkpoints").exists() and (tmp_path / "w" / "hf" / "model.safetensors").is_file()
