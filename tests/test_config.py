"""moxin.config: a leaf package (imports nothing of moxin outside itself), each rule checked in its dataclass, and
every user-facing error a MoxinUserError."""

import subprocess
import sys

import pytest

from moxin.config import (TASK_PRESETS, ConfigError, DataError, EvalConfigError, InitFromError, MoxinUserError,
                          RunConfig, TrainerConfig)


def test_config_imports_nothing_of_moxin_outside_itself():
    code = ("import sys, moxin.config, moxin.config.schema; "
            "print(sorted(m for m in sys.modules if m.startswith('moxin') and not m.startswith('moxin.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['moxin']", out


def test_every_task_preset_has_its_record_mapping():
    from moxin.eval.tasks import GEN_PRESET_DOCS, PRESET_DOCS

    assert set(TASK_PRESETS) == set(PRESET_DOCS) | set(GEN_PRESET_DOCS)
    assert not set(PRESET_DOCS) & set(GEN_PRESET_DOCS)


def test_trainer_config_names_the_key_type_and_range():
    with pytest.raises(ConfigError, match=r"trainer.max_steps='abc': expected int, got str. Fix the override, "
                                          r"e.g. trainer.max_steps=100"):
        TrainerConfig(max_steps="abc")
    with pytest.raises(ConfigError, match=r"trainer.val_every_n_steps=1.5: expected int or null"):
        TrainerConfig(val_every_n_steps=1.5)
    with pytest.raises(ConfigError, match="trainer.save_checkpoints=1: expected bool"):
        TrainerConfig(save_checkpoints=1)
    with pytest.raises(ConfigError, match=r"trainer.max_steps=0 must be -1 .*; trainer.max_nonfinite_steps=0 must"):
        TrainerConfig(max_steps=0, max_nonfinite_steps=0)
    with pytest.raises(ConfigError, match="trainer.progress_bar='fancy': use one of rich, rich_always, plain, none"):
        TrainerConfig(progress_bar="fancy")
    assert TrainerConfig(limit_val_batches=3, val_every_n_steps=None).limit_val_batches == 3


def test_run_config_checks_resume_and_init_from(tmp_path):
    with pytest.raises(ConfigError, match=r"resume=3: use null, auto or a path to a .ckpt"):
        RunConfig(resume=3)
    with pytest.raises(InitFromError, match="no such file or folder"):
        RunConfig(init_from=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InitFromError, match="is a folder without config.json"):
        RunConfig(init_from=str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"\+experiment=eval needs init_from="):
        RunConfig(eval_only=True)
    cfg = RunConfig.from_cfg({"seed": 3, "trainer": {"max_steps": 4}, "model": {"dim": 8}})
    assert cfg.seed == 3 and cfg.trainer.max_steps == 4 and cfg.trainer.max_nonfinite_steps == 5


def test_user_errors_share_one_base_and_keep_their_builtin_one():
    from moxin.checkpoint.lock import RunLockError
    from moxin.checkpoint.policy import DiskSpaceError
    from moxin.errors import user_message
    from moxin.tokenizer import ChatValidationError, TokenizerError

    for cls, builtin in ((ConfigError, ValueError), (DataError, ValueError), (EvalConfigError, ValueError),
                         (InitFromError, FileNotFoundError), (TokenizerError, ValueError),
                         (ChatValidationError, ValueError), (DiskSpaceError, RuntimeError),
                         (RunLockError, RuntimeError)):
        assert issubclass(cls, MoxinUserError) and issubclass(cls, builtin), cls
        assert user_message(cls("the message")) == "the message"
    assert user_message(RuntimeError("a bug")) is None
