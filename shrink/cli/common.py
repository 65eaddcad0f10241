"""What the command modules share: the consoles, the common options and the JSON envelope."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console

from shrink.cli.options import config_options, values
from shrink.core.errors import ShrinkError
from shrink.core.progress import stderr
from shrink.stages.configs import EvaluateConfig, ModelOptions, make

console = Console()  # results: stdout
err = stderr  # shrink's own notes and progress: one stderr console for the whole package


def model_options(f):
    """Options shared by every command that loads a model (ModelOptions)."""
    return config_options(ModelOptions)(f)


def eval_options(f):
    """``--eval-*``: the perplexity a stage measures before and after itself."""
    return config_options(EvaluateConfig, prefix="eval", exclude=("batch_size",))(f)


def json_option(help: str, metavar: str = "FILE"):  # noqa: A002 - click's own keyword
    """``--json FILE``; each command words its help for what it writes."""
    return click.option("--json", "json_out", default=None, metavar=metavar, help=help)


def output_options(f):
    """-o/--output, --force, --no-verify and --json: what every writing command takes."""
    f = json_option("Write the result as JSON (- for stdout).")(f)
    f = click.option(
        "--no-verify", is_flag=True, help="Skip the fresh-process check of the output."
    )(f)
    f = click.option(
        "--force",
        is_flag=True,
        help="Replace the output if it exists (only a folder shrink or another model tool wrote).",
    )(f)
    return click.option("-o", "--output", required=True, help="Output folder.")(f)


def build_config(cls, kwargs: dict, where: str = ""):
    """The typed config of a stage command from its options (errors name the setting)."""
    return make(cls, values(cls, kwargs), where)


def load_options(kwargs: dict) -> ModelOptions:
    return build_config(ModelOptions, kwargs)


def eval_config(kwargs: dict) -> EvaluateConfig:
    """The ``--eval-*`` options as an EvaluateConfig."""
    return make(EvaluateConfig, values(EvaluateConfig, kwargs, "eval"), "eval")


def model_folder(model: str) -> str:
    """MODEL as a local folder, for commands that read the files themselves (export): a folder
    is kept as given, an alias or hub id is resolved the way every loading command resolves it
    (the hub's cache, downloading when needed)."""
    if Path(model).expanduser().is_dir():
        return model
    from shrink.core.models import resolve

    resolved = resolve(model)
    if resolved.path is not None:
        return str(resolved.path)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return snapshot_download(resolved.hub_id)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        line = (str(e).strip().splitlines() or [""])[0]
        raise ShrinkError(f"cannot fetch '{model}' from the hub: {line}") from None


def check_writable(*paths: str | None) -> None:
    """Fail before any work when a --json/--plot file cannot be written."""
    from shrink.core.outputs import check_writable_file

    for p in paths:
        if p and p != "-":
            check_writable_file(p, "output file")


def write_json(result, dest: str, settings: dict | None = None) -> None:
    """One envelope for every --json output: {"command", "settings", "result", "versions"}."""
    from shrink.core.outputs import versions

    ctx = click.get_current_context(silent=True)
    envelope = {
        "command": ctx.command_path if ctx else "shrink",
        "settings": settings or {},
        "result": result,
        "versions": versions(),
    }
    text = json.dumps(envelope, indent=2, default=str)
    if dest == "-":
        click.echo(text, file=console.file)
    else:
        Path(dest).write_text(text + "\n")
        err.print(f"wrote {dest}")


def wrote(path) -> None:
    """The note that a --plot/--markdown file was written."""
    err.print(f"wrote {path}")
