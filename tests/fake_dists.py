"""Installed-looking third-party packages for plugin tests: a ``*.dist-info`` folder with an
``entry_points.txt``, and the modules it names, written to a directory put on ``sys.path``."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Install = Callable[[str, dict[str, str], dict[str, str]], None]


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Install]:
    """``install(package, {entry point: module}, {module: source})``: a package as pip leaves it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    added: list[str] = []

    def _install(package: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = tmp_path / f"{package.replace('-', '_')}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[ngkit]\n{lines}")
        for module, source in modules.items():
            (tmp_path / f"{module}.py").write_text(textwrap.dedent(source))
            added.append(module)

    yield _install
    for module in added:
        sys.modules.pop(module, None)
