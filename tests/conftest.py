"""Test isolation: only ngkit's built-in plugins load, whatever else is installed."""

from __future__ import annotations

import os

# Before torch/deepspeed/datasets are imported anywhere in the test process.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["NGKIT_PLUGINS"] = ""

import pytest  # noqa: E402

from ngkit.plugins import reset_plugin_manager  # noqa: E402


@pytest.fixture(autouse=True)
def builtin_plugins_only(monkeypatch: pytest.MonkeyPatch):
    """Each test starts from a fresh manager holding only the built-ins."""
    monkeypatch.setenv("NGKIT_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()
