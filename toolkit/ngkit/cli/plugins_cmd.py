"""``ngkit plugins``: what is installed and what each plugin provides."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from ngkit.plugins import get_plugin_manager


def plugin_rows(include_builtins: bool = True) -> list[dict]:
    pm = get_plugin_manager()
    rows = []
    for name, info in sorted(pm.info.items()):
        if info.builtin and not include_builtins:
            continue
        rows.append(
            {
                "name": name,
                "package": info.package,
                "version": info.version,
                "builtin": info.builtin,
                "hooks": pm.hooks_of(name),
                "provides": pm.provides(name),
            }
        )
    return rows


def plugins(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    external: bool = typer.Option(False, "--external", help="Only third-party plugins."),
) -> None:
    """List every loaded plugin: package, version, hooks and the names it registers."""
    rows = plugin_rows(include_builtins=not external)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title="ngkit plugins (NGKIT_PLUGINS selects which load)")
    for col in ("plugin", "package", "version", "provides"):
        table.add_column(col)
    for row in rows:
        provides = "\n".join(f"{kind}: {', '.join(names)}" for kind, names in row["provides"].items())
        hooks = [h for h in row["hooks"] if h.startswith("on_")]
        if hooks:
            provides += ("\n" if provides else "") + "hooks: " + ", ".join(hooks)
        table.add_row(row["name"], row["package"], row["version"], provides)
    Console().print(table)
