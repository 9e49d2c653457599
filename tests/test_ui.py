"""What a user sees: mistakes stop before any work as one message naming the key / path / file:line, a refused
run touches nothing, progress lines name the phase and the step out of the total, hand-offs fit the stage."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from moxin import errors, ui
from moxin.config import MoxinUserError, RunConfig
from tests.helpers.compose import compose_config
from tests.helpers.tiny_overrides import TINY_PRETRAIN, tiny_model

ROOT = Path(__file__).resolve().parent.parent


def _msg(overrides, tmp_path) -> str:
    cfg = compose_config(overrides + [f"out_dir={tmp_path}/run", "run_name=t"])
    with pytest.raises(MoxinUserError) as e:
        errors.preflight(cfg)
    return str(e.value)


def test_preflight_names_key_and_fix(tmp_path):
    assert "trainer.max_steps='abc'" in _msg(["trainer.max_steps=abc"], tmp_path)
    m = _msg(["+experiment=sft", "init_from=runs/nope/checkpoints/last.ckpt"], tmp_path)
    assert "init_from='runs/nope/checkpoints/last.ckpt'" in m and "no such file" in m
    m = _msg(["data.sources=[{name: prose, path: /nope/x.jsonl}]"], tmp_path)
    assert "data.sources[0] (prose).path='/nope/x.jsonl' does not exist" in m
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\nnot json\n{"txt": 3}\n')
    m = _msg([f"data.sources=[{{name: prose, path: {bad}}}]"], tmp_path)
    assert f"{bad}:2: malformed JSON" in m and "2 of the first 3 records" in m
    import torch

    if not torch.cuda.is_available():
        assert "CPU-only" in _msg(["hardware=gpu"], tmp_path) or "sees no GPU" in _msg(["hardware=gpu"], tmp_path)


def test_init_from_accepts_every_folder_the_loader_reads(tmp_path):
    """An FSDP run's last.ckpt is a distributed-checkpoint folder (.metadata inside); preflight must let it
    through, as it does a HF folder and a run folder, and name the folder that holds none of them."""
    dcp = tmp_path / "fsdp" / "checkpoints" / "step-000004.ckpt"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(b"")
    (tmp_path / "fsdp" / "checkpoints" / "last.ckpt").symlink_to(dcp.name)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    for ok in (dcp, dcp.parent / "last.ckpt", tmp_path / "fsdp", hf):
        RunConfig.from_cfg(compose_config(["+experiment=sft", f"init_from={ok}"]))
    (tmp_path / "empty").mkdir()
    m = _msg(["+experiment=sft", f"init_from={tmp_path / 'empty'}"], tmp_path)
    assert "is a folder without config.json" in m and ".metadata" in m


def test_unknown_key_added_with_plus_is_named():
    """`+key=value` is Hydra's explicit "add a key": it passes a schema (force-added), so the instantiation names it."""
    cfg = compose_config(["+stage.optim.foo=1"])
    with pytest.raises(InstantiationException) as e:
        instantiate(cfg.stage.optim)
    m = errors.user_message(e.value)
    assert m.startswith("stage.optim.foo:") and "has no parameter 'foo'" in m and "lr" in m


@pytest.mark.parametrize("overrides, key, why", [
    (["model.dimm=4"], "model.dimm", "Key 'dimm' not in 'ModelConfigSchema'"),
    (["+experiment=grpo", "stage.grpo.group_size=abc"], "stage.grpo.group_size",
     "Value 'abc' of type 'str' could not be converted to Integer"),
    (["stage.optim.lr=fast"], "stage.optim.lr", "Value 'fast' of type 'str' could not be converted to Float"),
    (["stage.optim.max_nonfinite_steps=3"], "stage.optim.max_nonfinite_steps", "not in 'OptimConfigSchema'"),
    (["hardware=fsdp", "hardware.parallel.compile=maybe"], "hardware.parallel.compile", "not a valid bool"),
    (["+experiment=eval", "eval.batch_tokens=many"], "eval.batch_tokens", "could not be converted to Integer"),
    (["+experiment=sft", "model=tiny-cjk", "model.n_layers=1.5"], "model.n_layers", "could not be converted"),
])
def test_schemas_refuse_bad_overrides_at_compose_time(overrides, key, why):
    """conf/model, stage.optim, stage.grpo, hardware.parallel and eval are typed by schemas made from their
    dataclasses (moxin/config/schema.py): Hydra refuses a key the dataclass lacks or a value of the wrong type
    while composing, naming the key, before anything is built."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose_config(overrides)
    text = f"{e.value}\n{e.value.__cause__}"
    assert f"full_key: {key}" in text and why in text, text


def test_cli_refuses_a_mistyped_value_at_compose_time(tmp_path):
    res = _run(["run_name=typed", "stage.optim.lr=fast"], tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "Error merging override stage.optim.lr=fast" in res.stderr
    assert "Value 'fast' of type 'str' could not be converted to Float" in res.stderr
    assert "full_key: stage.optim.lr" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


def _run(args, cwd, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "moxin.run", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def test_cli_user_error_is_one_message_and_leaves_nothing(tmp_path):
    res = _run(["run_name=abc", "trainer.max_steps=abc"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "moxin: error: trainer.max_steps='abc'" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) <= 3
    assert not (tmp_path / "runs" / "abc").exists()


def test_refused_run_touches_nothing_of_the_existing_one(tmp_path):
    run = tmp_path / "runs" / "taken"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("original: true\n")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    res = _run(["run_name=taken", "seed=99"], tmp_path)
    assert res.returncode == 2 and "resume=auto" in res.stderr, res.stderr[-2000:]
    assert (run / ".hydra" / "config.yaml").read_text() == "original: true\n"
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_progress_lines_banner_and_log(tmp_path, capsys):
    from moxin import run as R

    cfg = compose_config(TINY_PRETRAIN + [f"out_dir={tmp_path}", "run_name=p", "trainer.progress_bar=plain",
                                    "trainer.progress_every_n_steps=2", "trainer.max_steps=8", "resume=auto"])
    info = R.train(cfg)
    out = capsys.readouterr().out
    assert "moxin pretrain run 'p'" in out and "12 optimizer steps, stopping at 8" in out
    assert "resume=auto: nothing to resume" in out and "starting a fresh run at step 0" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/8", "2/8", "4/8", "6/8", "8/8"], lines
    assert "phase a (1/2)" in lines[0] and "phase b (2/2)" in lines[-1] and "ETA" in lines[-1]
    assert "loss" in lines[-1] and "tokens" in lines[-1]
    # hand-offs: one line each, the continue command drops max_steps, the next stage is SFT from this run
    hand = [line for line in out.splitlines() if line.startswith(("Continue this run:", "Next stage (SFT):"))]
    assert len(hand) == 2 and "trainer.max_steps" not in hand[0] and hand[0].endswith("resume=auto")
    assert f"init_from={Path(info['checkpoint']).resolve()}" in hand[1]
    # the message the resume code can call, when there is something to resume
    msg = ui.resume_message(cfg, info["checkpoint"], tmp_path / "checkpoints")
    assert "resuming from" in msg and "step 8" in msg


@pytest.mark.parametrize("exp,nxt", [("pretrain", "sft"), ("sft", "dpo"), ("dpo", "grpo"), ("grpo", None)])
def test_next_stage_follows_the_recipe(exp, nxt, tmp_path):
    cfg = compose_config([f"+experiment={exp}", f"out_dir={tmp_path}", "run_name=x"])
    info = {"out_dir": str(tmp_path), "run_name": "x", "checkpoint": str(tmp_path / "checkpoints" / "last.ckpt"),
            "hf_export": str(tmp_path / "hf"), "optimizer_steps": 5}
    cmd = ui.next_stage_command(cfg, info)
    if nxt is None:
        assert cmd is None
    else:
        assert cmd == f"python -m moxin.run +experiment={nxt} init_from={(tmp_path / 'hf').resolve()}"
    assert all("\n" not in c for _, c in ui.handoff_lines(cfg, info))


def test_help_lists_groups_experiments_and_commands():
    res = subprocess.run([sys.executable, "-m", "moxin.run", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert res.returncode == 0
    for word in ("+experiment=sft", "resume=auto", "hardware", "dpo_moxin_instruct", "logger", "-m"):
        assert word in res.stdout, word
    assert len(res.stdout.splitlines()) < 80


@pytest.mark.parametrize("override, key, close", [
    ("+trainer.max_stepz=5", "trainer.max_stepz", "trainer.max_steps"),
    ("+hardware.devicez=1", "hardware.devicez", "hardware.devices"),
    ("+samples.prompt=[a]", "samples.prompt", "samples.prompts"),
    ("+sead=3", "sead", "seed"),
    ("+stage.optim.lrr=1", "stage.optim.lrr", "stage.optim.lr"),
    ("+data.val_token=5", "data.val_token", "data.val_tokens"),
    ("+schedule.tokens_per_stp=5", "schedule.tokens_per_stp", "schedule.tokens_per_step"),
])
def test_unknown_key_anywhere_is_refused_with_the_closest_valid_one(override, key, close, tmp_path):
    """A key added with `+` passes Hydra (an explicit add); preflight refuses any key nothing reads, naming it and
    the closest valid key, wherever it is: top level, trainer/hardware/samples/schedule, or a `_target_` node."""
    m = _msg([override], tmp_path)
    assert m.startswith(f"unknown key {key} (did you mean {close}?)"), m


def test_every_experiment_passes_the_key_check():
    for exp in sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")):
        errors.check_keys(compose_config([f"+experiment={exp}"]))
    from moxin.warmup import warmup_config

    errors.check_keys(warmup_config(compose_config(["+experiment=grpo", "out_dir=x", "run_name=x"])))  # the warm-up's own run config


def test_cli_refuses_a_misspelt_added_key_before_any_work(tmp_path):
    res = _run(["run_name=typo", "+trainer.max_stepz=5"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "moxin: error: unknown key trainer.max_stepz (did you mean trainer.max_steps?)" in res.stderr
    assert "+trainer.max_stepz=5" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "runs" / "typo").exists()


def _moxin(args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "moxin.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize("when", ["importing", "training"])
def test_ctrl_c_early_is_one_line_and_status_130(when, tmp_path):
    """Ctrl-C while torch imports, or once the banner is out (Lightning's fit): no traceback, status 130."""
    import signal

    p = _moxin(TINY_PRETRAIN + ["run_name=c", "trainer.progress_bar=plain"], tmp_path)
    if when == "importing":  # torch's library is being loaded (a signal before Python itself is up kills it bare)
        maps = Path(f"/proc/{p.pid}/maps")
        if not maps.exists():
            p.kill()
            pytest.skip("needs /proc to see the import under way")
        while p.poll() is None and "libtorch" not in maps.read_text():
            time.sleep(0.01)
    if when == "training":
        for line in p.stdout:  # the banner's last line: the run is accepted and fit is starting
            if line.lstrip().startswith("log "):
                break
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=120)[0]
    assert p.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "interrupted" in out.lower(), out[-2000:]


def test_locked_run_name_is_one_message(tmp_path):
    from moxin.checkpoint.lock import RunLock

    with RunLock(tmp_path / "runs" / "busy"):
        res = _run(["run_name=busy", "resume=auto"], tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "moxin: error:" in res.stderr and "is in use by another run" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow  # a whole tiny run in a subprocess on a pseudo-terminal
def test_rich_bar_is_one_line_in_80_columns_and_ends_as_the_table(tmp_path):
    """On an 80-column terminal the bar is one line (a redraw never moves the cursor up), counts optimizer steps
    with one ETA, and its last frame shows the final table's train loss and val loss."""
    import fcntl
    import pty
    import re
    import struct
    import termios

    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", COLUMNS="80", TERM="xterm")
    env.pop("HYDRA_FULL_ERROR", None)
    p = subprocess.Popen([sys.executable, "-m", "moxin.run", *TINY_PRETRAIN, "run_name=bar",
                          "trainer.progress_bar=rich"], stdin=child, stdout=child, stderr=child, cwd=tmp_path, env=env)
    os.close(child)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    p.wait(timeout=300)
    os.close(main)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert p.returncode == 0, out[-3000:]
    live = out[out.index("\x1b[?25l"):out.rindex("\x1b[?25h")]  # the bar's frames (cursor hidden meanwhile)
    assert "\x1b[1A" not in live, "a frame spans several lines"
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    last = plain[:plain.index("finished")].replace("\r\n", "\n").split("\r")[-1].split("\n")
    bar = next(line for line in reversed(last) if "12/12" in line)
    assert len(bar) <= 80 and "ETA: 0:00" in bar and "it/s" not in bar, bar
    table = dict(re.findall(r"│ (train/loss[^│]*?|val/loss)\s*│ ([0-9.]+)", plain))
    assert f"val: {table['val/loss']}" in bar, (bar, table)
    assert any(f"loss: {v}" in bar for k, v in table.items() if k.startswith("train/loss")), (bar, table)


GRPO_TINY = ["+experiment=grpo", *tiny_model(n_layers=1, sliding_window=None), "data.steps=4", "data.prompts_per_step=4", "data.task.pool=4",
             "stage.grpo.group_size=4", "stage.grpo.max_new_tokens=8", "stage.grpo.ppo_epochs=2",
             "stage.grpo.num_minibatches=1", "stage.grpo.verifier_workers=0", "stage.grpo.log_every=0",
             "warmup.steps=4", "warmup.batch_size=4", "warmup.micro_batch_size=4", "trainer.progress_bar=plain",
             "trainer.progress_every_n_steps=2"]


def test_grpo_progress_and_table_count_rollout_steps(tmp_path, capsys):
    """GRPO's steps are rollout steps (data.steps), each up to ppo_epochs x num_minibatches optimizer steps: the
    banner, the progress lines and the final table count rollouts (never 'step 8/4') with the optimizer steps
    beside them, and the demo ends with an hf/ export like every other stage."""
    from moxin import run as R

    info = R.train(compose_config(GRPO_TINY + [f"out_dir={tmp_path}", "run_name=g"]))
    out = capsys.readouterr().out
    grpo_part = out[out.index("moxin grpo run 'g'"):]
    assert "total      4 rollout steps (up to 2 optimizer steps each)" in grpo_part
    lines = [line for line in grpo_part.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["1/4", "2/4", "4/4"], lines
    assert f"optimizer steps {info['optimizer_steps']}" in lines[-1]
    assert info["rollout_steps"] == 4 and f"4 rollout steps, {info['optimizer_steps']} optimizer steps" in grpo_part
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "tokenizer_config.json").is_file()


def test_sft_malformed_line_is_counted_and_reported_or_stops_at_the_limit(tmp_path, caplog):
    """What the README promises for malformed jsonl in SFT data: one bad line under the limits is skipped with a
    warning (count, file:line, the limits) and counted in summary.json; data.max_bad_records=0 stops before any
    work naming file:line."""
    import logging

    from moxin import run as R
    from moxin.data.sample import sample_path

    lines = sample_path("chat.jsonl").read_text().splitlines(keepends=True)
    bad = tmp_path / "chat.jsonl"
    bad.write_text("".join(lines[:50]) + '{"messages": [\n' + "".join(lines[50:]))
    base = ["+experiment=sft", f"data.train.path={bad}", "trainer.max_steps=1", "samples.prompts=[]",
            "export_hf=false", "trainer.progress_bar=none", *tiny_model(n_layers=1, sliding_window=None)]
    with caplog.at_level(logging.WARNING):
        info = R.train(compose_config(base + [f"out_dir={tmp_path}/ok", "run_name=ok"]))
    text = caplog.text
    assert f"{bad}:51: malformed JSON" in text and "1 bad records skipped" in text, text
    assert "data.max_bad_records=0" in text
    assert info["data"]["train"]["bad"] == 1, info["data"]
    m = _msg(base + ["data.max_bad_records=0"], tmp_path)
    assert f"{bad}:51: malformed JSON" in m and "max_bad_records=0" in m, m


def test_experiment_file_without_its_package_line_is_named():
    """An experiment of one's own without '# @package _global_' composes under `experiment:`, where nothing reads
    it: refused with the line to add."""
    from omegaconf import open_dict

    cfg = compose_config([])
    with open_dict(cfg):
        cfg.experiment = {"trainer": {"max_steps": 3}}
    with pytest.raises(MoxinUserError, match="# @package _global_"):
        errors.check_keys(cfg)
