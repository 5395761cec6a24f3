"""``bootseer snapshotter …`` — the daemon's command line (mounted by :mod:`bootseer.cli`)."""

from __future__ import annotations

from pathlib import Path

import typer

from snapshotter.config import Config

app = typer.Typer(help="The containerd proxy snapshotter.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Keep `serve` a sub-command even while it is the only one."""


@app.command("serve")
def serve(
    config: Path = typer.Option(None, "--config", help="TOML config (root, address, log_level, log_format, "
                                                       "metrics_address)."),
    root: Path = typer.Option(None, help="Override: state directory."),
    address: Path = typer.Option(None, help="Override: unix socket path."),
    log_level: str = typer.Option(None, help="Override: debug|info|warning|error."),
    metrics_address: str = typer.Option(None, help="Override: host:port for /metrics ('' = off)."),
) -> None:
    """Serve containerd's snapshots API on a unix socket (register it as [proxy_plugins.bootseer])."""
    try:
        cfg = Config.load(config, root=root, address=address, log_level=log_level, metrics_address=metrics_address)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    from bootseer import events
    from snapshotter.server import serve as run  # grpc is imported only when serving

    events.use_config(config)  # the start-up event log's [events] path may be in this daemon's config

    run(cfg)
