"""Where moxin finds its own files.

The Hydra configs live in `conf/` at the top of a source checkout (the layout users know) and are copied into
the wheel as `moxin/conf/` (setup.py's build step), so `pip install moxin` followed by `python -m moxin.run`
works from any folder. `conf_dir()` returns whichever exists; an installed copy wins over a checkout's. The
notebooks travel the same way (`notebooks/` -> `moxin/notebooks/`, `notebook_path()`).
"""

from __future__ import annotations

from pathlib import Path

import moxin.config.schema  # noqa: F401  the YAML files name these schemas: registered before any compose

_PKG = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The folder holding `config.yaml` and the config groups (model/, data/, stage/, hardware/, ...). Its YAML
    files name schemas in Hydra's ConfigStore (moxin/config/schema.py, registered on importing this module), so
    composing from this folder works without importing moxin.run first."""
    for candidate in (_PKG / "conf", _PKG.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"moxin's config folder is missing: looked for config.yaml in {_PKG / 'conf'} (an installed "
                            f"wheel) and {_PKG.parent / 'conf'} (a source checkout); reinstall moxin")


def notebook_path(name: str = "inspect_checkpoint.ipynb") -> Path:
    """A notebook shipped with moxin: the installed copy (`moxin/notebooks/`, from setup.py's build step), else the
    source checkout's `notebooks/`."""
    for candidate in (_PKG / "notebooks" / name, _PKG.parent / "notebooks" / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"moxin's notebook {name} is missing from {_PKG / 'notebooks'} (an installed wheel) and "
                            f"{_PKG.parent / 'notebooks'} (a source checkout); reinstall moxin")
