"""``ngkit plugins``: what is installed, what each plugin provides and where its code lives."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ngkit import PLUGIN_API
from ngkit.plugins import get_plugin_manager


def plugin_rows(include_builtins: bool = True, include_unloaded: bool = False) -> list[dict[str, Any]]:
    """One row per loaded plugin; with ``include_unloaded`` also those ``NGKIT_PLUGINS`` left out
    (status ``excluded``) and those that failed or clash (status ``broken``/``clash``, with the
    reason). Never raises for a plugin problem: listing the rest is the point."""
    pm = get_plugin_manager()
    registry = pm.collect()
    rows: list[dict[str, Any]] = []
    for name, info in sorted(pm.info.items()):
        if info.builtin and not include_builtins:
            continue
        components = pm.components(name)
        rows.append({
            "name": name, "package": info.package, "version": info.version, "builtin": info.builtin,
            "api": info.api, "status": "loaded", "reason": "", "hooks": pm.hooks_of(name),
            "provides": {kind: sorted(found) for kind, found in components.items()},
            "components": components,
        })
    if include_unloaded:
        for name, info in sorted(pm.excluded.items()):
            rows.append({
                "name": name, "package": info.package, "version": info.version, "builtin": False,
                "api": info.api, "status": "excluded", "reason": f'left out by NGKIT_PLUGINS="{pm.selection}"',
                "hooks": [], "provides": {}, "components": {},
            })
        for problem in pm.problems + registry.problems:
            rows.append({
                "name": problem.plugin, "package": problem.package, "version": "", "builtin": False,
                "api": None, "status": problem.status, "reason": problem.reason,
                "hooks": [], "provides": {}, "components": {},
            })
    return rows


def _api(row: dict[str, Any]) -> str:
    """The plugin API its module declares (NGKIT_PLUGIN_API), and this ngkit's when that is newer."""
    if row["api"] is None:
        return "–" if row["status"] != "loaded" else "undeclared"
    return str(row["api"]) if row["api"] == PLUGIN_API else f"{row['api']} (ngkit speaks {PLUGIN_API})"


def _describe(row: dict[str, Any]) -> str:
    if row["status"] != "loaded":
        return f"{row['status']}: {row['reason']}"
    lines = [
        f"{kind}: " + ", ".join(f"{name} ({where})" for name, where in found.items())
        for kind, found in row["components"].items()
    ]
    hooks = [h for h in row["hooks"] if not h.startswith("register_") or h == "register_commands"]
    if hooks:
        lines.append("hooks: " + ", ".join(hooks))
    return "\n".join(lines)


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    external: bool = typer.Option(False, "--external", help="Only third-party plugins."),
    show_all: bool = typer.Option(
        False, "--all", help="Also plugins NGKIT_PLUGINS leaves out and plugins that failed, with the reason."
    ),
) -> None:
    """List every loaded plugin: package, version, the plugin API it declares, hooks, and each
    name it registers with the module:class that implements it."""
    rows = plugin_rows(include_builtins=not external, include_unloaded=show_all)
    pm = get_plugin_manager()
    trouble = len(pm.problems + pm.collect().problems)
    if trouble and not show_all:
        Console(stderr=True).print(
            f"[bold yellow]warning:[/] {trouble} plugin problem(s); 'ngkit plugins --all' shows them",
            highlight=False,
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="ngkit plugins (NGKIT_PLUGINS selects which load)")
    for col in ("plugin", "package", "version", "API", "provides"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(escape(row["name"]), escape(row["package"]), row["version"], _api(row), escape(_describe(row)))
    Console().print(table)
