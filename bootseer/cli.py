"""The one ``bootseer`` command.  Each part owns its sub-commands in its own ``cli`` module; this file
only mounts them, so a part can be changed without touching the others."""

from __future__ import annotations

import typer

from bootseer import __version__

app = typer.Typer(
    name="bootseer",
    help="BootSeer: lazy image pull, hot-block prefetch, dependency snapshots and striped checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _mount() -> None:
    # Each part's sub-commands; imports are local so a part's import error names that part.
    from bootseer import cri_cli
    from bootseer import status as status_cli
    from ckptfs import cli as ckptfs_cli
    from depsnap import cli as depsnap_cli
    from integration import cli as integration_cli
    from integration.bench import cli as bench_cli
    from registry_sidecar import cli as sidecar_cli
    from snapshotter import cli as snapshotter_cli

    app.add_typer(integration_cli.stack_app, name="stack")
    app.add_typer(integration_cli.images_app, name="images")
    app.command("quickstart")(integration_cli.quickstart)
    app.add_typer(integration_cli.dev_app, name="dev")
    app.add_typer(integration_cli.config_app, name="config")
    app.add_typer(bench_cli.app, name="bench")
    app.add_typer(ckptfs_cli.app, name="ckptfs")
    app.add_typer(cri_cli.app, name="cri")
    app.add_typer(depsnap_cli.app, name="depsnap")
    app.add_typer(sidecar_cli.app, name="sidecar")
    app.command("convert")(sidecar_cli.convert)
    app.add_typer(snapshotter_cli.app, name="snapshotter")
    from bootseer import profile as profile_cli

    app.command("profile")(profile_cli.profile)
    app.command("pull")(status_cli.pull_cmd)
    app.command("status")(status_cli.status)
    from recorder import cli as recorder_cli

    app.command("record")(recorder_cli.record)
    app.add_typer(recorder_cli.hotblocks_app, name="hotblocks")


_mount()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
