"""``--help`` of every command renders the table names its texts mention (``[run]``,
``[compare.variants]``): rich markup would read them as styles and drop them."""

from __future__ import annotations

import re

import pytest
import typer

from ngkit.cli.main import app, main

TABLE = re.compile(r"\[[a-z_]+(?:\.[a-z_]+)*\]")  # [run], [eval], [compare.variants]


def commands(group: typer.Typer = app, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """(argv prefix, every help text of the command) for each command, groups included."""
    import click

    root = typer.main.get_command(group)
    out = []

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        out.append((path, "\n".join(texts)))
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(root, prefix)
    return out


CASES = [(argv, sorted(set(TABLE.findall(text)))) for argv, text in commands()]


def test_some_help_texts_name_tables():
    named = {" ".join(argv) for argv, tables in CASES if tables}
    assert {"run", "prior train", "bench", "eval", "compare"} <= named


@pytest.mark.parametrize("argv, tables", CASES, ids=[" ".join(c[0]) or "ngkit" for c in CASES])
def test_help_renders_every_table_name(argv, tables, capsys):
    assert main([*argv, "--help"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert all(table in shown for table in tables), (tables, shown)
