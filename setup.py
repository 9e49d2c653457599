"""Packaging metadata lives in pyproject.toml. This file only adds one build step: the top-level `conf/` folder
(Hydra configs, kept at the top of the repository where users look for it) is copied into the wheel as
`moxin/conf/`, so a non-editable install runs `python -m moxin.run` from any folder (moxin/paths.py finds it);
`notebooks/` goes in as `moxin/notebooks/` the same way, so the notebook path a run prints exists."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithConf(build_py):
    def run(self):
        super().run()
        for name in ("conf", "notebooks"):
            src = Path(__file__).resolve().parent / name
            dst = Path(self.build_lib) / "moxin" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))


setup(cmdclass={"build_py": BuildWithConf})
