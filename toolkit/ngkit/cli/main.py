"""``ngkit`` entry point: sub-commands, and one place that turns bad input into a clear message.

Errors from bad input (:class:`ngkit.errors.NgkitError`) print one message and exit with code 2;
``ngkit --debug ...`` shows the traceback as well.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

from ngkit import __version__
from ngkit.cli import bench_cmd, compare_cmd, encode_cmd, eval_cmd, export_cmd, plugins_cmd, recipes_cmd, run_cmd, weights_cmd
from ngkit.errors import NgkitError, RunStopped

app = typer.Typer(
    name="ngkit",
    help="Train and evaluate discrete image tokenizers with DAPS and its baselines.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("run")(run_cmd.run)
app.command("plugins")(plugins_cmd.plugins)
app.command("compare")(compare_cmd.compare)
app.add_typer(recipes_cmd.app, name="recipes")
app.command("eval")(eval_cmd.eval_command)
app.add_typer(weights_cmd.app, name="weights")
app.command("export")(export_cmd.export_command)
app.command("encode")(encode_cmd.encode_command)
app.command("bench")(bench_cmd.bench_command)

err = Console(stderr=True)
DEBUG = {"on": False}


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


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = launcher_args(sys.argv[1:] if argv is None else list(argv))
    try:
        code = app(args=argv, standalone_mode=False)  # click returns the code of a typer.Exit
    except RunStopped as exc:
        err.print(f"[bold yellow]stopped:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except NgkitError as exc:
        if DEBUG["on"]:
            err.print_exception()
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("aborted")
        return 130
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return code if isinstance(code, int) else 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
