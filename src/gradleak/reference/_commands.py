"""The command-line section of the reference page: the click command tree typer builds
from the app it is given (:data:`gradleak.cli.app`, passed in by ``gradleak reference``:
this package never imports the CLI, which imports it), walked command by command with
every option."""

from __future__ import annotations

import enum
from typing import Any, Iterator

from ._format import code, markdown_text, table

__all__ = ["command_tree", "cli_section", "option_name"]


def command_tree(app: Any) -> Any:
    """The click command of ``app`` (a typer app, or already a click command), as typer builds it."""
    import typer

    return app if not isinstance(app, typer.Typer) else typer.main.get_command(app)


def walk(command: Any, path: str = "gradleak") -> Iterator[tuple[str, Any]]:
    """(``gradleak sub command``, click command) for every command that runs something, by name."""
    commands = getattr(command, "commands", None)
    if commands is None:
        yield path, command
        return
    for name in sorted(commands):
        if not getattr(commands[name], "hidden", False):
            yield from walk(commands[name], f"{path} {name}")


def option_name(param: Any) -> str:
    """``--flag / --no-flag``, ``--model-option, -m`` or the argument's metavar (``UPDATE``)."""
    if param.param_type_name == "argument":
        return param.human_readable_name.upper()
    names = ", ".join(param.opts)
    return f"{names} / {', '.join(param.secondary_opts)}" if param.secondary_opts else names


def _range(kind: Any) -> str:
    low, high = getattr(kind, "min", None), getattr(kind, "max", None)
    lower = "" if low is None else f"{low} {'<' if getattr(kind, 'min_open', False) else '<='} "
    upper = "" if high is None else f" {'<' if getattr(kind, 'max_open', False) else '<='} {high}"
    return f"{lower}x{upper}"


def type_name(param: Any) -> str:
    """The value an option takes, in words that do not depend on click's version."""
    if getattr(param, "is_flag", False):
        return "flag"
    kind = param.type
    choices = getattr(kind, "choices", None)
    if choices:
        return " | ".join(code(getattr(c, "value", c)) for c in choices)
    base = {"integer": "int", "float": "float", "boolean": "bool", "text": "text", "path": "path",
            "file": "file"}.get(getattr(kind, "name", ""), "")
    if not base:
        for word in ("int", "float", "path"):
            if word in type(kind).__name__.lower():
                base = word
        base = base or "text"
    if hasattr(kind, "min") or hasattr(kind, "max"):
        return f"{base} ({_range(kind)})"
    return base


def _default(param: Any) -> str:
    if param.required:
        return "required"
    value = param.default
    if callable(value) or value is None or value == () or value == []:
        return ""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, bool) and getattr(param, "is_flag", False):
        if param.secondary_opts:
            return code(param.opts[0] if value else param.secondary_opts[0])
        return "on" if value else "off"
    return code(value)


def _usage(path: str, command: Any) -> str:
    arguments = []
    for param in command.params:
        if param.param_type_name == "argument":
            name = param.human_readable_name.upper()
            arguments.append(name if param.required else f"[{name}]")
    return " ".join([path, *arguments, "[OPTIONS]" if any(p.param_type_name == "option" for p in command.params)
                     else ""]).strip()


def _help(command: Any) -> str:
    text = (command.help or "").split("\n\n")[0]
    return markdown_text(" ".join(text.split()))


def cli_section(app: Any) -> list[str]:
    """Every command of ``app``: usage, its help's first paragraph, its arguments and options."""
    commands = list(walk(command_tree(app)))
    lines = ["## Command line", "",
             f"{len(commands)} commands. Every option also in `gradleak COMMAND --help`; errors are one line.", ""]
    lines += table(["command", "what it does"], [
        (f"[`{path}`](#{path.replace(' ', '-')})", _help(command)) for path, command in commands])
    for path, command in commands:
        lines += ["", f"### `{path}`", "", f"`{_usage(path, command)}`", ""]
        help_text = _help(command)
        if help_text:
            lines += [help_text, ""]
        params = [p for p in command.params if not getattr(p, "hidden", False)]
        rows = [(code(option_name(p)) + (" (repeatable)" if getattr(p, "multiple", False) else ""), type_name(p),
                 _default(p), markdown_text(getattr(p, "help", None) or "")) for p in params]
        lines += table(["argument / option", "value", "default", "what it sets"], rows) if rows else ["No options."]
    return lines
