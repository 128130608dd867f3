"""Finding, checking and loading pretrained weights files (the FID Inception network, LPIPS's VGG-16).

ngkit never downloads weights behind the user's back: an FID computed with any other file is not
comparable to published numbers, and many training machines have no internet. A weights file
is looked for, in this order:

1. an explicit path (``--inception-weights PATH`` on the command line, ``weights`` in a recipe);
2. the environment variable ``NGKIT_INCEPTION_WEIGHTS``;
3. ngkit's weights cache: ``$NGKIT_CACHE/weights/`` (default ``~/.cache/ngkit/weights/``).

Every file is checked against the published SHA-256 before it is used. ``add_weights`` copies a
checked file into the cache; ``fetch_weights`` downloads it where the internet is reachable.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ngkit.errors import WeightsError


@dataclass(frozen=True)
class WeightsFile:
    """A published weights file: its name, SHA-256 (full hex digest, or the leading hex digits
    where only a prefix is published) and where it is published."""

    filename: str
    sha256: str
    url: str
    description: str


KNOWN_WEIGHTS: dict[str, WeightsFile] = {
    # pytorch-fid's port of the TF graph inception-2015-12-05 (the network of the original FID).
    # The file name carries the first 8 hex digits of its SHA-256 (torch.hub convention); the
    # full digest is pinned by e.g. genforce's models/inception_model.py (snap-research/discoscene).
    # torch-fidelity's weights-inception-2015-12-05-6726825d.pth has the same bytes.
    "inception": WeightsFile(
        filename="pt_inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
        description="FID Inception-v3 weights",
    ),
    # torchvision's ImageNet VGG-16 (the LPIPS trunk, plugins/lpips_loss.py); torch.hub names the
    # file after the first 8 hex digits of its SHA-256, the only part published.
    "vgg16": WeightsFile(
        filename="vgg16-397923af.pth",
        sha256="397923af",
        url="https://download.pytorch.org/models/vgg16-397923af.pth",
        description="VGG-16 ImageNet weights (LPIPS trunk)",
    ),
}


def known(name: str) -> WeightsFile:
    """The table entry for ``name``; an unknown name lists the known ones."""
    if name not in KNOWN_WEIGHTS:
        raise WeightsError(f'unknown weights "{name}"; known: {", ".join(sorted(KNOWN_WEIGHTS))}')
    return KNOWN_WEIGHTS[name]


def env_var(name: str) -> str:
    """The environment variable that points at the weights file ``name``."""
    return f"NGKIT_{name.upper()}_WEIGHTS"


def cache_dir() -> Path:
    """ngkit's weights cache: ``$NGKIT_CACHE/weights`` (default ``~/.cache/ngkit/weights``)."""
    root = os.environ.get("NGKIT_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "ngkit"
    return base / "weights"


def how_to_provide(name: str) -> str:
    """The three ways to provide a weights file, for error messages."""
    spec = known(name)
    return (
        f"Provide {spec.filename} (SHA-256 {spec.sha256}) in one of three ways:\n"
        f"  1. pass its path: --{name}-weights /path/to/{spec.filename}\n"
        f"     (in a recipe: the metric's `weights` or the loss's `{name}_weights` option)\n"
        f"  2. set the environment variable {env_var(name)}=/path/to/{spec.filename}\n"
        f"  3. put it in ngkit's weights cache: {cache_dir() / spec.filename}\n"
        f"     ('ngkit weights add FILE' checks the hash and copies it there; NGKIT_CACHE moves the cache)\n"
        f"The file is published at {spec.url}; download it on a machine with internet access\n"
        f"(there, 'ngkit weights fetch {name}' downloads and checks it)."
    )


def find_weights(name: str, path: str | os.PathLike[str] | None = None) -> Path:
    """The weights file for ``name``: ``path`` if given, else ``$NGKIT_<NAME>_WEIGHTS``, else
    the cache. A path given explicitly or by the environment must exist (no silent fallback)."""
    spec = known(name)
    for given, source in ((path, f"--{name}-weights"), (os.environ.get(env_var(name)), env_var(name))):
        if given:
            found = Path(given).expanduser()
            if not found.is_file():
                raise WeightsError(f"{source} names {found}, which is not a file.\n{how_to_provide(name)}")
            return found
    cached = cache_dir() / spec.filename
    if cached.is_file():
        return cached
    raise WeightsError(f"{spec.description} not found (looked in {cached}).\n{how_to_provide(name)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_hash(name: str, path: Path) -> str:
    """Return the file's SHA-256 if it matches the published one; raise WeightsError if not."""
    spec = known(name)
    digest = sha256_of(path)
    if not digest.startswith(spec.sha256):
        raise WeightsError(
            f"{path}: SHA-256 is {digest}, expected {spec.sha256} ({spec.filename}). This is not "
            f"the published {spec.description} file (a different or corrupted download); numbers "
            f"computed with it would not be comparable.\n{how_to_provide(name)}"
        )
    return digest


def add_weights(path: str | os.PathLike[str], name: str = "inception") -> Path:
    """Check ``path`` against the published hash and copy it into the cache; returns the copy."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise WeightsError(f"{source} is not a file")
    check_hash(name, source)
    return _install(source, name)


def fetch_weights(name: str = "inception", timeout: float = 60.0) -> Path:
    """Download the published file into the cache and check its hash (needs internet access)."""
    spec = known(name)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        target = Path(tmp) / spec.filename
        try:
            with urllib.request.urlopen(spec.url, timeout=timeout) as response, open(target, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:  # URLError, timeouts and refused connections are all OSErrors
            raise WeightsError(
                f"could not download {spec.url}: {exc}. This machine may have no internet access.\n"
                f"{how_to_provide(name)}"
            ) from exc
        check_hash(name, target)
        return _install(target, name)


def _install(source: Path, name: str) -> Path:
    """Copy into the cache under the published name; a rename makes a partial copy impossible."""
    destination = cache_dir() / known(name).filename
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_suffix(destination.suffix + ".partial")
    shutil.copyfile(source, partial)
    partial.replace(destination)
    return destination


def _counted(keys: Iterable[str]) -> set[str]:
    """State-dict keys that must match: all but BatchNorm's step counters."""
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def load_weights(name: str, path: Path, model: nn.Module, ignore: tuple[str, ...] = ()) -> str:
    """Check the hash, then load the state dict into ``model`` with every name and shape checked;
    entries whose names start with one of ``ignore`` are dropped (e.g. a classifier ``model`` lacks).

    BatchNorm's ``num_batches_tracked`` counters are optional (files saved before PyTorch 0.4.1
    lack them; they do not affect eval-mode outputs). Returns the file's SHA-256.
    """
    digest = check_hash(name, path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the file is not a state dict
        raise WeightsError(f"{path}: cannot be read as a PyTorch state dict: {exc}") from exc
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}

    expected = model.state_dict()
    missing = sorted(_counted(expected) - _counted(state))
    unexpected = sorted(_counted(state) - _counted(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(_counted(expected) & _counted(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    found = {"missing keys": missing, "unexpected keys": unexpected, "wrong shapes": wrong_shape}
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
        for label, items in found.items()
        if items
    ]
    if problems:
        raise WeightsError(
            f"{path}: the state dict does not fit the {known(name).description} network: " + "; ".join(problems)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in _counted(expected)}, strict=False)
    return digest
