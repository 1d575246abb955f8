"""mkdocs hook: writes the command-line reference from the typer app itself.

A page that contains the line `<!-- cli-reference -->` gets, in its place, one section per
`modelmap` command: its usage line, its docstring and a table of its arguments and options
(names, default, help), read from `typer.main.get_command(modelmap.cli.app)`. The reference
therefore never drifts from `modelmap COMMAND --help`.
"""

from __future__ import annotations

import enum
import html
import re

MARKER = "<!-- cli-reference -->"


def _cell(text) -> str:
    """Text for one markdown table cell (pipes escaped, one line)."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _default(param) -> str:
    if getattr(param, "required", False):
        return "required"
    value = param.default
    if callable(value) or value is None:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if getattr(param, "is_flag", False) and getattr(param, "secondary_opts", None):
        return "`" + (param.opts[0] if value else param.secondary_opts[0]) + "`"
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return f"`{value}`"


def _choices(param) -> str:
    choices = getattr(getattr(param, "type", None), "choices", None)
    if not choices:
        return ""
    return " One of: " + ", ".join(f"`{getattr(c, 'value', c)}`" for c in choices) + "."


def _names(param) -> str:
    if param.param_type_name == "argument":
        return f"`{param.name.upper()}`"
    opts = list(param.opts)
    if getattr(param, "secondary_opts", None):
        opts = [f"{a} / {b}" for a, b in zip(param.opts, param.secondary_opts)]
    return ", ".join(f"`{o}`" for o in opts)


def cli_reference() -> str:
    import click
    import typer

    from modelmap.cli import app

    root = typer.main.get_command(app)
    root_ctx = click.Context(root, info_name="modelmap")
    lines = []
    for name, command in root.commands.items():
        ctx = click.Context(command, info_name=name, parent=root_ctx)
        usage = command.get_usage(ctx).replace("Usage: ", "")
        usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), usage)  # typer writes {model}
        lines += [f"## `modelmap {name}`", "", "```text", usage, "```", ""]
        if command.help:
            lines += [command.help.strip(), ""]
        lines += ["| argument / option | default | meaning |", "|---|---|---|"]
        for param in command.params:
            if param.name in ("help",) or getattr(param, "hidden", False):
                continue
            help_text = (getattr(param, "help", None) or "") + _choices(param)
            lines.append(f"| {_names(param)} | {_default(param)} | {_cell(help_text)} |")
        lines.append("")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (mkdocs hook signature)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())
