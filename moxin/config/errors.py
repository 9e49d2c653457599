"""The user-facing errors: one base class, :class:`MoxinUserError`, for every mistake a user can fix.

A run that stops on one prints its one-line message (``moxin: error: ...``, moxin/errors.py) and exits with status
2; anything else keeps its traceback (a bug). The subclasses keep the built-in base they always had, so code that
catches ``ValueError`` or ``FileNotFoundError`` still does. Further subclasses live where they are raised:
``TokenizerError`` and ``ChatValidationError`` (moxin/tokenizer), ``DiskSpaceError`` and ``RunLockError``
(moxin/checkpoint/policy.py, moxin/checkpoint/lock.py).
"""

from __future__ import annotations

__all__ = ["MoxinUserError", "ConfigError", "DataError", "EvalConfigError", "InitFromError"]


class MoxinUserError(Exception):
    """Something the user can fix; the message names the key / file:line / path and says how."""


class ConfigError(MoxinUserError, ValueError):
    """A config value that cannot work; the message names the key and what to do."""


class DataError(MoxinUserError, ValueError):
    """A data input that cannot be used. The message names the source, the file/line/key and the fix."""


class EvalConfigError(MoxinUserError, ValueError):
    """An evaluation config that cannot work; the message names the task, the key and the fix."""


class InitFromError(MoxinUserError, FileNotFoundError):
    """``init_from`` names weights that cannot be read (a missing file, a folder without weights, an adapter
    without its base)."""
