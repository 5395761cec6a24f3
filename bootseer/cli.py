"""The one ``bootseer`` command.  Each part owns its sub-commands in its own ``cli`` module; this file
only mounts them, so a part can be changed without touching the others.

Parts are imported only when needed: ``bootseer pull …`` mounts the ``pull`` command alone, so it does not
pay for importing pyarrow, numpy and the depsnap/ckptfs stacks it never uses (half a second of every
short command on this kind of machine — and ``pull`` sits on the start-up path).  A bare ``bootseer``,
``--help`` or an unknown name mounts everything, so help and error messages list every command.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
import typer.models

from bootseer import __version__
from bootseer.clihelp import tidy_help

# name → (module, attribute, is a sub-command group)
PARTS: dict[str, tuple[str, str, bool]] = {
    "stack": ("integration.cli", "stack_app", True),
    "images": ("integration.cli", "images_app", True),
    "quickstart": ("integration.cli", "quickstart", False),
    "dev": ("integration.cli", "dev_app", True),
    "config": ("integration.cli", "config_app", True),
    "bench": ("integration.bench.cli", "app", True),
    "ckptfs": ("ckptfs.cli", "app", True),
    "cri": ("bootseer.cri_cli", "app", True),
    "depsnap": ("depsnap.cli", "app", True),
    "sidecar": ("registry_sidecar.cli", "app", True),
    "convert": ("registry_sidecar.cli", "convert", False),
    "snapshotter": ("snapshotter.cli", "app", True),
    "profile": ("bootseer.profile", "profile", False),
    "pull": ("bootseer.status", "pull_cmd", False),
    "status": ("bootseer.status", "status", False),
    "cache": ("bootseer.cache_cli", "app", True),
    "record": ("recorder.cli", "record", False),
    "hotblocks": ("recorder.cli", "hotblocks_app", True),
}


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


def build(only: str | None = None) -> typer.Typer:
    """The command with every part mounted, or only the part ``only``."""
    app = typer.Typer(
        name="bootseer",
        help="BootSeer: lazy image pull, hot-block prefetch, dependency snapshots and striped checkpoints.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=False,
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                     callback=_version),
    ) -> None:
        return None

    for name, (module, attr, group) in PARTS.items():
        if only is not None and name != only:
            continue
        # imports are per part, so a part's import error names that part
        obj = getattr(importlib.import_module(module), attr)
        if group:
            app.add_typer(obj, name=name)
        else:
            app.command(name)(obj)
    tidy_help(app)
    return app


_full: typer.Typer | None = None

def __getattr__(name: str) -> Any:
    """``bootseer.cli.app``: the command with every part mounted (built on first use)."""
    global _full
    if name == "app":
        if _full is None:
            _full = build()
        return _full
    raise AttributeError(name)


# Commands that end the process without the interpreter's teardown once they are done (output flushed, logs
# closed): `pull` runs on the path to a container's start, and tearing down the grpc, requests and protobuf
# modules it loaded took a sixth of its run after its last line (docs/bench/design-measurements.md).  Only
# commands that leave nothing to atexit handlers or finalizers (temporary dirs, pools) belong here.
FAST_EXIT = frozenset({"pull"})


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    only = args[0] if args and args[0] in PARTS else None
    if only not in FAST_EXIT:
        build(only)(args=args, prog_name="bootseer")
        return
    try:
        build(only)(args=args, prog_name="bootseer")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    _fast_exit(code)


def _fast_exit(code: int) -> None:
    """Exit now, skipping module teardown — unless another non-daemon thread still runs (then it must finish)."""
    import logging
    import os
    import threading

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1  # a closed pipe: the output was lost, say so
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    main()
