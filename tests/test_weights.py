"""Finding, checking and loading weights files (ngkit.weights)."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from ngkit import weights
from ngkit.errors import WeightsError

INCEPTION = weights.KNOWN_WEIGHTS["inception"]


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ngkit cache and no NGKIT_INCEPTION_WEIGHTS from the caller's environment."""
    monkeypatch.setenv("NGKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NGKIT_INCEPTION_WEIGHTS", raising=False)
    return tmp_path / "cache" / "weights"


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def trust(monkeypatch: pytest.MonkeyPatch, path: Path, digits: int = 64) -> None:
    """Make the table expect this file's SHA-256 (or its first ``digits`` hex digits)."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:digits]
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "inception", replace(INCEPTION, sha256=digest))


def test_table_pins_pytorch_fid_file() -> None:
    assert INCEPTION.filename == "pt_inception-2015-12-05-6726825d.pth"
    assert INCEPTION.url.endswith("/mseitzer/pytorch-fid/releases/download/fid_weights/" + INCEPTION.filename)
    # torch.hub convention: the hex digits in the file name start the file's SHA-256.
    assert len(INCEPTION.sha256) == 64 and INCEPTION.sha256.startswith("6726825d")


def test_missing_weights_message_lists_the_three_ways(isolated_cache: Path) -> None:
    with pytest.raises(WeightsError) as info:
        weights.find_weights("inception")
    message = str(info.value)
    for needed in (
        "--inception-weights",
        "NGKIT_INCEPTION_WEIGHTS",
        str(isolated_cache / INCEPTION.filename),
        INCEPTION.filename,
        INCEPTION.sha256,
        INCEPTION.url,
    ):
        assert needed in message
    assert "1." in message and "2." in message and "3." in message and "4." not in message


def test_search_order_explicit_then_environment_then_cache(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = write(isolated_cache / INCEPTION.filename, b"cache")
    assert weights.find_weights("inception") == cached
    from_env = write(tmp_path / "env.pth", b"env")
    monkeypatch.setenv("NGKIT_INCEPTION_WEIGHTS", str(from_env))
    assert weights.find_weights("inception") == from_env
    explicit = write(tmp_path / "explicit.pth", b"explicit")
    assert weights.find_weights("inception", explicit) == explicit


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_named_file_that_is_missing_is_an_error_not_a_fallback(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    write(isolated_cache / INCEPTION.filename, b"cache")  # would be found if we fell back
    missing = tmp_path / "nowhere.pth"
    if source == "environment":
        monkeypatch.setenv("NGKIT_INCEPTION_WEIGHTS", str(missing))
    with pytest.raises(WeightsError, match="nowhere.pth"):
        weights.find_weights("inception", missing if source == "argument" else None)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(WeightsError, match="known: inception"):
        weights.find_weights("inceptoin")


def test_add_weights_rejects_a_wrong_hash(tmp_path: Path, isolated_cache: Path) -> None:
    bogus = write(tmp_path / "bogus.pth", b"not the inception weights")
    with pytest.raises(WeightsError) as info:
        weights.add_weights(bogus)
    assert hashlib.sha256(b"not the inception weights").hexdigest() in str(info.value)
    assert INCEPTION.sha256 in str(info.value)
    assert not (isolated_cache / INCEPTION.filename).exists()


@pytest.mark.parametrize("digits", [64, 8])
def test_add_weights_copies_a_checked_file_into_the_cache(
    tmp_path: Path, isolated_cache: Path, monkeypatch: pytest.MonkeyPatch, digits: int
) -> None:
    source = write(tmp_path / "download" / "any-name.pth", b"the right bytes")
    trust(monkeypatch, source, digits)
    installed = weights.add_weights(source)
    assert installed == isolated_cache / INCEPTION.filename
    assert installed.read_bytes() == b"the right bytes"
    assert weights.find_weights("inception") == installed


def test_hash_prefix_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tmp_path / "w.pth", b"bytes")
    digest = hashlib.sha256(b"bytes").hexdigest()
    wrong_prefix = format(int(digest[:8], 16) ^ 1, "08x")
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "inception", replace(INCEPTION, sha256=wrong_prefix))
    with pytest.raises(WeightsError, match="SHA-256"):
        weights.check_hash("inception", source)


def test_fetch_fails_clearly_without_internet(isolated_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Port 9 (discard) on localhost refuses at once: the same path as a machine with no route out.
    unreachable = "http://127.0.0.1:9/" + INCEPTION.filename
    monkeypatch.setitem(weights.KNOWN_WEIGHTS, "inception", replace(INCEPTION, url=unreachable))
    with pytest.raises(WeightsError) as info:
        weights.fetch_weights("inception", timeout=5)
    message = str(info.value)
    assert "could not download" in message and unreachable in message
    assert "--inception-weights" in message and "NGKIT_INCEPTION_WEIGHTS" in message
    assert not (isolated_cache / INCEPTION.filename).exists()


class Tiny(nn.Module):
    def __init__(self, out: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out, 3, bias=False)
        self.bn = nn.BatchNorm2d(out)


def saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "w.pth") -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


def test_load_weights_loads_a_matching_state_dict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    source = Tiny()
    source.bn.running_mean.normal_()
    path = saved(tmp_path, source.state_dict())
    trust(monkeypatch, path)
    target = Tiny()
    digest = weights.load_weights("inception", path, target)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_weights_accepts_files_without_batch_counters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = {k: v for k, v in Tiny().state_dict().items() if not k.endswith("num_batches_tracked")}
    path = saved(tmp_path, state)
    trust(monkeypatch, path)
    weights.load_weights("inception", path, Tiny())


def test_load_weights_checks_the_hash_before_reading(tmp_path: Path) -> None:
    path = saved(tmp_path, Tiny().state_dict())
    with pytest.raises(WeightsError, match="SHA-256"):
        weights.load_weights("inception", path, Tiny())


def test_load_weights_names_wrong_keys_and_shapes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = Tiny(out=5).state_dict()
    state["aux.weight"] = torch.zeros(2)
    del state["bn.bias"]
    path = saved(tmp_path, state)
    trust(monkeypatch, path)
    with pytest.raises(WeightsError) as info:
        weights.load_weights("inception", path, Tiny(out=4))
    message = str(info.value)
    assert "missing keys (1): bn.bias" in message
    assert "unexpected keys (1): aux.weight" in message
    assert "conv.weight (5, 3, 3, 3) (expected (4, 3, 3, 3))" in message


def test_load_weights_rejects_a_file_that_is_not_a_state_dict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "junk.pth", b"\x00junk")
    trust(monkeypatch, path)
    with pytest.raises(WeightsError, match="cannot be read"):
        weights.load_weights("inception", path, Tiny())
