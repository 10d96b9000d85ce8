"""The `vlmtune` command line.

Only typer, rich and the standard library are imported here: torch and transformers load inside
the commands that need them, so `vlmtune --help` stays fast. Each command lives in
``vlmtune/commands/``; this module only wires them up and owns the one error handler.
"""

from __future__ import annotations

import os
import sys

import typer

from vlmtune.commands import core, memory, observe, posttrain, quantcheck
from vlmtune.commands import inspect as inspect_cmd

app = typer.Typer(
    name="vlmtune",
    help="Fine-tune vision-language models from one YAML recipe.\n\n"
    "Start with `vlmtune train recipes/demo.yaml` (a tiny model, offline, on CPU).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
data_app = typer.Typer(help="Check datasets before training.", no_args_is_help=True)
app.add_typer(data_app, name="data")

app.command("train")(core.train)
app.command("validate")(core.validate)
app.command("schema")(core.schema)
app.command("tiny")(core.tiny)
app.command("inspect")(inspect_cmd.inspect)
app.command("estimate-memory")(memory.estimate_memory)
app.command("quant-check")(quantcheck.quant_check)
app.command("predict")(posttrain.predict)
app.command("eval")(posttrain.evaluate)
app.command("export")(posttrain.export)
app.command("runs")(observe.runs)
app.command("report")(observe.report)
data_app.command("check")(core.data_check)


@app.callback()
def _options(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (also VLMTUNE_DEBUG=1)."),
) -> None:
    if debug:
        os.environ["VLMTUNE_DEBUG"] = "1"


NARROW_HELP = 100  # columns under which --help is click's plain layout: rich's table left 20 for descriptions


def _plain_help_when_narrow() -> None:
    """In a narrow terminal, rich's option table squeezes each description into a sliver beside long
    option names and types; click's plain layout wraps them at full width instead."""
    import shutil

    import typer.core

    if shutil.get_terminal_size((NARROW_HELP, 24)).columns < NARROW_HELP:
        typer.core.HAS_RICH = False


def main() -> None:
    """Entry point: user errors become a message, a hint and exit code 2."""
    from vlmtune.errors import VlmtuneError
    from vlmtune.observe.noise import silence_known_noise

    silence_known_noise()  # before any library that prints it loads
    _plain_help_when_narrow()
    try:
        # Without standalone mode click returns typer.Exit's code instead of exiting: pass it on.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except VlmtuneError as exc:
        if os.environ.get("VLMTUNE_DEBUG") == "1":
            raise
        from rich.console import Console
        from rich.text import Text

        # Text, not markup: messages quote tokens like [IMG] that rich would swallow.
        Console(stderr=True, highlight=False).print(
            Text("error: ", style="bold red") + Text(str(exc)), soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:  # 128 + the signal number: 130 for Ctrl-C, 143 for SIGTERM
        sys.exit(getattr(exc, "exit_code", 130))
    except (typer.Abort, typer.Exit) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:
        # Usage errors (unknown command or option) are click exceptions; typer vendors its own click.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise
