"""The ``register_commands`` hook: plugins add ``ngkit`` sub-commands; a broken one, or one
taking a name ngkit has, is left out with a warning and the CLI still works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import typer
from fake_dists import install  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from ngkit.plugins import add_plugin_commands

HELLO = """
import typer
from ngkit import hookimpl

@hookimpl
def register_commands(cli):
    @cli.command("hello")
    def hello(name: str = typer.Option("world")) -> None:
        print(f"hello {name}")
"""

TAKES_RUN = """
from ngkit import hookimpl

@hookimpl
def register_commands(cli):
    cli.command("run")(lambda: print("hijacked"))
"""

RAISES = """
from ngkit import hookimpl

@hookimpl
def register_commands(cli):
    cli.command("half-added")(lambda: None)
    raise RuntimeError("no config file")
"""


def fresh_cli() -> typer.Typer:
    cli = typer.Typer()
    cli.command("run")(lambda: print("the real run"))
    return cli


def test_plugin_adds_a_command(install, monkeypatch):
    install("ngkit-hello", {"hello": "hello_mod"}, {"hello_mod": HELLO})
    monkeypatch.setenv("NGKIT_PLUGINS", "ngkit-hello")
    cli = fresh_cli()
    assert add_plugin_commands(cli) == []
    result = CliRunner().invoke(cli, ["hello", "--name", "ngkit"])
    assert result.exit_code == 0 and result.output == "hello ngkit\n"


def test_plugin_commands_follow_ngkit_plugins(install, monkeypatch):
    install("ngkit-hello", {"hello": "hello_mod"}, {"hello_mod": HELLO})
    monkeypatch.setenv("NGKIT_PLUGINS", "")
    cli = fresh_cli()
    add_plugin_commands(cli)
    assert [c.name for c in cli.registered_commands] == ["run"]


def test_taken_name_and_raising_hook_are_left_out_with_a_warning(install, monkeypatch):
    install("ngkit-hijack", {"hijack": "hijack_mod"}, {"hijack_mod": TAKES_RUN})
    install("ngkit-raises", {"raises": "raises_mod"}, {"raises_mod": RAISES})
    install("ngkit-hello", {"hello": "hello_mod"}, {"hello_mod": HELLO})
    install("ngkit-broken", {"broken": "broken_mod"}, {"broken_mod": "import no_such_module_xyz\n"})
    monkeypatch.setenv("NGKIT_PLUGINS", "hijack,raises,hello,broken")
    cli = fresh_cli()
    warnings = add_plugin_commands(cli)
    assert warnings == [
        'plugin "hijack" (package ngkit-hijack 1.0) adds the command run, which ngkit or another plugin '
        "already has; its commands are left out (rename them in ngkit-hijack)",
        'plugin "raises" (package ngkit-raises 1.0): register_commands raised RuntimeError: no config '
        "file; its commands are left out (fix the plugin, or leave it out with NGKIT_PLUGINS)",
    ]
    assert sorted(c.name for c in cli.registered_commands) == ["hello", "run"]
    assert CliRunner().invoke(cli, ["run"]).output == "the real run\n"
    assert CliRunner().invoke(cli, ["hello"]).output == "hello world\n"


@pytest.mark.parametrize("plugins", ["", None])
def test_help_imports_no_plugin_without_third_party_ones(plugins):
    """Nothing third-party is installed in the test venv, so `ngkit --help` imports no plugin
    (and not torch) whether NGKIT_PLUGINS is set or not."""
    env = {k: v for k, v in os.environ.items() if k != "NGKIT_PLUGINS"}
    if plugins is not None:
        env["NGKIT_PLUGINS"] = plugins
    code = ("import sys; from ngkit.cli.main import main; main(['--help']); "
            "print('LOADED', sorted(m for m in sys.modules if m.startswith('ngkit_plugins') or m == 'torch'))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout
