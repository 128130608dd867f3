"""User-facing errors: one clear message, exit code 2, no traceback (unless ``--debug``)."""

from __future__ import annotations


class NgkitError(Exception):
    """Bad input from a user: a recipe, a plugin name, a file. The message says how to fix it."""

    exit_code = 2


class RecipeError(NgkitError):
    """One or more problems in a recipe; the message lists all of them."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}\n{lines}")


class PluginError(NgkitError):
    """A plugin failed to load, or two plugins registered the same name."""


class ContractError(PluginError):
    """A component broke, while running, the plugin contract its package declares (e.g. an API-2
    dataset returned uint8 pixels); not an unreadable file, so the core never skips it."""


class WeightsError(NgkitError):
    """A weights file is missing, has the wrong hash or the wrong contents."""


class DataError(NgkitError):
    """A dataset could not be read (missing file, corrupt image, wrong shape)."""


class TrainingError(NgkitError):
    """Training cannot continue (e.g. too many consecutive non-finite steps)."""


class RunStopped(NgkitError):
    """A run stopped on request (SIGTERM, Ctrl-C) after saving a checkpoint; not a failure."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
