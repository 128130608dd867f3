"""Test isolation: only ngkit's built-in plugins load, whatever else is installed."""

from __future__ import annotations

import os

# Before torch/deepspeed/datasets are imported anywhere in the test process.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ["NGKIT_PLUGINS"] = ""

import hashlib  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from ngkit import weights  # noqa: E402
from ngkit.plugins import reset_plugin_manager  # noqa: E402


@pytest.fixture(autouse=True)
def builtin_plugins_only(monkeypatch: pytest.MonkeyPatch):
    """Each test starts from a fresh manager holding only the built-ins."""
    monkeypatch.setenv("NGKIT_PLUGINS", "")
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module: on tensors this small, or on a busy 2-core
    machine, threads waiting on each other make things several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight state dict with the real names, scaled so that features do not vanish."""
    torch.manual_seed(0)
    from ngkit.metrics.inception import FIDInceptionV3

    network = FIDInceptionV3()
    for module in network.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture
def trusted(random_weights: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make ngkit.weights accept the random file as if it were the published one."""
    digest = hashlib.sha256(random_weights.read_bytes()).hexdigest()
    spec = replace(weights.KNOWN_WEIGHTS["inception"], sha256=digest)
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "inception", spec)
    monkeypatch.setenv("NGKIT_INCEPTION_WEIGHTS", str(random_weights))
    return random_weights
