"""One seam between the core and plugins: the core never imports ``ngkit_plugins``, and a plugin
(built-in or example package) imports only the ngkit modules docs/writing-a-plugin.md lists in
"What a plugin may import"; built-ins share only the same-package helpers listed there."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUIDE = (ROOT / "docs" / "writing-a-plugin.md").read_text()
SECTION = GUIDE.split("## What a plugin may import", 1)[1].split("\n## ", 1)[0]
PUBLIC = {name for line in SECTION.splitlines() if line.startswith("| `ngkit")
          for name in re.findall(r"`(ngkit(?:\.\w+)*)`", line.split("|")[1])}
INTERNAL = set(re.findall(r"`(ngkit_plugins\.\w+)`", SECTION.split("Same-package internals", 1)[1]))
PLUGINS = sorted((ROOT / "plugins").glob("*.py"))
EXAMPLES = sorted((ROOT / "docs" / "examples").rglob("*.py"))


def imported(path: Path) -> list[tuple[str, int]]:
    """Every module an import statement in ``path`` names (absolute imports), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, node.lineno))
    return found


def test_the_documented_lists_are_read():
    assert {"ngkit", "ngkit.components", "ngkit.distributed", "ngkit.methods", "ngkit.nn"} <= PUBLIC
    assert not any(name.startswith("ngkit.engine") for name in PUBLIC)
    assert INTERNAL == {"ngkit_plugins.conv_decoder", "ngkit_plugins.daps_proxy", "ngkit_plugins.daps_first_order"}


def test_no_module_of_the_core_imports_ngkit_plugins():
    offenders = [f"{path.relative_to(ROOT)}:{line} imports {name}"
                 for path in sorted((ROOT / "toolkit").rglob("*.py"))
                 for name, line in imported(path) if name.split(".")[0] == "ngkit_plugins"]
    assert offenders == []


def test_plugins_import_only_the_public_modules_of_ngkit():
    offenders = []
    for path in PLUGINS + EXAMPLES:
        for name, line in imported(path):
            top = name.split(".")[0]
            allowed = name in PUBLIC if top == "ngkit" else (path in PLUGINS and name in INTERNAL
                                                             if top == "ngkit_plugins" else True)
            if not allowed:
                offenders.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert offenders == []


def test_every_public_module_exists():
    import importlib

    for name in PUBLIC:
        importlib.import_module(name)
