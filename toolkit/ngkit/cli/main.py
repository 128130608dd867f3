"""``ngkit`` entry point: sub-commands, and one place that turns bad input into a clear message.

Errors from bad input (:class:`ngkit.errors.NgkitError`) print one message and exit with code 2;
so do exceptions raised inside a plugin's code, reported with the plugin, its package and the
recipe key of the component that raised. ``ngkit --debug ...`` shows the traceback as well.
Unknown options are usage errors (exit 2). Any other exception is an ngkit bug: its traceback.
"""

from __future__ import annotations

import os
import shlex
import sys
from types import ModuleType, TracebackType

import typer
from rich.console import Console
from rich.markup import escape

from ngkit import __version__
from ngkit.cli import (
    bench_cmd, checkpoint_cmd, compare_cmd, encode_cmd, eval_cmd, export_cmd, plugins_cmd, prior_cmd, recipes_cmd,
    run_cmd, sample_cmd, weights_cmd,
)
from ngkit.errors import NgkitError, RunStopped
from ngkit.plugins import add_plugin_commands

app = typer.Typer(
    name="ngkit",
    help="Train and evaluate discrete image tokenizers with DAPS and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help texts are plain: rich markup would eat table names like [run]
)
app.command("run")(run_cmd.run)
app.command("plugins")(plugins_cmd.plugins)
app.command("compare")(compare_cmd.compare)
app.add_typer(recipes_cmd.app, name="recipes")
app.command("eval")(eval_cmd.eval_command)
app.add_typer(weights_cmd.app, name="weights")
app.command("export")(export_cmd.export_command)
app.command("encode")(encode_cmd.encode_command)
app.add_typer(prior_cmd.app, name="prior")
app.command("sample")(sample_cmd.sample_command)
app.command("bench")(bench_cmd.bench_command)
app.add_typer(checkpoint_cmd.app, name="checkpoint")

err = Console(stderr=True)
DEBUG = {"on": False}
PLUGIN_COMMANDS = {"added": False}  # once per process, however often main() runs


def _version(value: bool) -> None:
    if value:
        print(f"ngkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    DEBUG["on"] = debug


def launcher_args(argv: list[str]) -> list[str]:
    """Drop the ``--local_rank=N`` that the ``deepspeed`` launcher (and old ``torch.distributed.launch``)
    put before the sub-command; its value also arrives as the LOCAL_RANK variable."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        name, eq, value = arg.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv):
                value, skip = argv[i + 1], True
            os.environ.setdefault("LOCAL_RANK", value)
            continue
        out.append(arg)
    return out


def _is_usage_error(exc: Exception) -> bool:
    """click's usage errors, also as typer >= 0.2x vendors them (``typer._click``)."""
    import click

    vendored = type(exc).__module__.startswith("typer.") and hasattr(exc, "show")
    return isinstance(exc, click.ClickException) or vendored


def _plugin_modules() -> dict[str, str]:
    """Module name -> entry-point name of every loaded plugin; empty if none could load."""
    from ngkit.plugins import get_plugin_manager

    try:
        pm = get_plugin_manager()
    except NgkitError:
        return {}
    return {module.__name__: name for name, module in pm.list_name_plugin() if isinstance(module, ModuleType)}


def _in_package_of(module: str, plugin_module: str) -> bool:
    """``module`` is a plugin's module or a sibling in its package (a helper), ngkit's core aside."""
    package = plugin_module.rpartition(".")[0]
    return module == plugin_module or (package not in ("", "ngkit") and module.startswith(package + "."))


def plugin_error(exc: BaseException, command: str) -> str | None:
    """One message for an exception raised in plugin code, or None if no plugin code raised it.

    The innermost traceback frame in a plugin's package says where it happened; the nearest
    enclosing method of a recipe-built component gives the recipe key and its plugin, else the
    nearest frame in a plugin's own module gives the plugin."""
    from ngkit.binding import built_at, plugin_label
    from ngkit.plugins import NOUNS

    modules = _plugin_modules()
    frames = []
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    inner = [f for f in frames if any(_in_package_of(f.f_globals.get("__name__", ""), m) for m in modules)]
    if not inner:
        return None
    at = f"{inner[-1].f_code.co_filename}:{inner[-1].f_lineno} in {inner[-1].f_code.co_name}"
    plugin, key = None, ""
    for frame in reversed(inner):
        found = built_at(frame.f_locals.get("self"))
        if found is not None:
            where, registration = found
            plugin, key = registration.plugin, f' at [{where}] ({NOUNS[registration.kind]} "{registration.name}")'
            break
        plugin = plugin or modules.get(frame.f_globals.get("__name__", ""))
    return (
        f"in {plugin_label(plugin) if plugin else 'plugin code'}{key}: {type(exc).__name__}: {exc}\n"
        f"  raised at {at}\n  for the traceback: ngkit --debug {command}"
    )


def unreadable_file_error(exc: BaseException) -> str | None:
    """A refusal of the safe loaders that reached here unwrapped (every load site names its file;
    this is the net under them): one message, never the unpickler's traceback."""
    import pickle

    from ngkit.engine.safe_load import TRUST_HINT

    if isinstance(exc, pickle.UnpicklingError):
        return f"a file could not be loaded safely ({exc}); {TRUST_HINT}"
    if type(exc).__name__ == "SafetensorError":
        return f"a safetensors file is damaged or not safetensors ({exc})"
    return None


def _report(message: str, code: int) -> int:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = launcher_args(sys.argv[1:] if argv is None else list(argv))
    if not PLUGIN_COMMANDS["added"]:
        PLUGIN_COMMANDS["added"] = True
        for warning in add_plugin_commands(app):
            err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    try:
        code = app(args=argv, standalone_mode=False)  # click returns the code of a typer.Exit
    except RunStopped as exc:
        err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except NgkitError as exc:
        if DEBUG["on"]:
            err.print_exception()
        return _report(str(exc), exc.exit_code)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:
        if _is_usage_error(exc):  # they carry their own exit code (2)
            exc.show()
            return exc.exit_code
        message = plugin_error(exc, shlex.join(argv)) or unreadable_file_error(exc)
        if message is None:  # not from a plugin: an ngkit bug, whose traceback is the report
            raise
        if DEBUG["on"]:
            err.print_exception()
        return _report(message, NgkitError.exit_code)
    return code if isinstance(code, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
