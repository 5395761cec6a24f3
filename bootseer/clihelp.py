"""Help text that reads as written, whichever entry point prints it (``bootseer …``, ``python -m snapshotter``,
``python -m registry_sidecar``): typer hands docstrings to rich, which would read ``[proxy_plugins.bootseer]``
as a markup tag and drop it, and keeps their indentation and line breaks in command lists."""

from __future__ import annotations

import inspect
import re

import typer
import typer.models

# What rich would take for a markup tag in help text (``[events]``, ``[proxy_plugins.bootseer]``) and drop; help
# text here is plain prose, so every such bracket is escaped.  Idempotent: an escaped bracket stays as it is.
_MARKUP = re.compile(r"(?<!\\)\[(?=[a-zA-Z#/@])")


def _plain(text: str | None) -> str | None:
    return None if text is None else _MARKUP.sub(r"\\[", text)


def tidy_help(app: typer.Typer) -> None:
    """Make the help of ``app``'s commands read as written, in a terminal, a pipe or a CI log: docstrings
    dedented (an appended paragraph must not keep the rest indented), the one-line summary in command lists
    one line (typer keeps the docstring's line breaks there), and brackets shown, not read as rich markup."""
    for info in app.registered_commands:
        text = info.help if info.help is not None else (info.callback.__doc__ if info.callback else None)
        if text is not None:
            plain = _MARKUP.sub(r"\\[", inspect.cleandoc(text))
            info.help = plain
            if info.short_help is None:
                info.short_help = " ".join(plain.split("\n\n")[0].split())
        if info.callback is not None:
            for param in inspect.signature(info.callback).parameters.values():
                if isinstance(param.default, typer.models.ParameterInfo):
                    param.default.help = _plain(param.default.help)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            tidy_help(group.typer_instance)
    if app.info.help is not None and not isinstance(app.info.help, typer.models.DefaultPlaceholder):
        app.info.help = _plain(inspect.cleandoc(app.info.help))
