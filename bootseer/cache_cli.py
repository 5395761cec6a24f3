"""``bootseer cache …``: the snapshotter's local chunk caches of lazy layers.

``drop IMAGE`` deletes the cached chunks of the image's layers, so that the next start of the image on this
node fetches them again — what a start on a fresh node does, and the way to see hot-block prefetch at work
on one machine after a recording (a warm node has every chunk local and prefetches nothing).  Only layers
that no snapshot holds can be dropped: a held layer is served from its cache right now.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from bootseer import log

app = typer.Typer(help="The snapshotter's chunk caches of lazy layers.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """cache sub-commands."""


@app.command("drop")
def drop(
    image: str | None = typer.Argument(None, help="Drop the caches of this image's layers."),
    all_layers: bool = typer.Option(False, "--all", help="Drop every cache no snapshot holds (instead of IMAGE)."),
    control: str | None = typer.Option(None, "--control", help="The snapshotter's control socket (default: the "
                                       "local stack's, else /run/bootseer/snapshotter.sock.ctl)."),
    hosts_dir: str | None = typer.Option(None, "--hosts-dir", help="containerd-style certs.d (default as pull)."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Registries without hosts.toml over http://."),
    platform: str | None = typer.Option(None, "--platform", help="os/arch of an index; default: the host."),
) -> None:
    """Delete the local chunks of IMAGE's lazy layers (or --all unused ones): the next start fetches them
    again, with the recorded hot blocks prefetched, as on a fresh node.  Layers a snapshot holds are kept
    (remove the image first: `ctr image rm IMAGE`)."""
    from bootseer.control import Control, ControlError, default_control
    from bootseer.status import image_blobs

    if (image is None) == (not all_layers):
        typer.echo("error: give IMAGE or --all", err=True)
        raise typer.Exit(2)
    path = control or default_control()
    if not Path(path).exists():
        typer.echo(f"error: no snapshotter control socket at {path} (is the snapshotter running with "
                   "remote_snapshots = true?)", err=True)
        raise typer.Exit(1)
    digests: list[str] | None = None
    if image is not None:
        from bootseer.registry import RegistryError

        try:
            digests = list(image_blobs(image, hosts_dir, plain_http, platform))
        except (RegistryError, ValueError) as e:
            typer.echo(f"error: {log.error_text(e)}", err=True)
            raise typer.Exit(1) from None
    ctl = Control(path, timeout=60)
    try:
        ctl.call("housekeeping")  # unmounts released layers that were still busy, so their caches can go
        layers = {x["digest"]: x for x in ctl.call("status")["layers"]}
        dropped = ctl.call("evict", cap=0, digests=digests)["evicted"]
    except (OSError, ControlError) as e:
        typer.echo(f"error: {path}: {e}", err=True)
        raise typer.Exit(1) from None
    freed = sum(int(layers.get(d, {}).get("bytes_local", 0)) for d in dropped)
    typer.echo(f"dropped the caches of {len(dropped)} layer(s), {freed / (1 << 20):.1f} MiB")
    held: list[dict[str, Any]] = [x for d, x in layers.items() if (digests is None or d in digests)
                                  and d not in dropped and x.get("owners")]
    for x in held:
        typer.echo(f"kept {x['digest'][:19]}: held by {len(x['owners'])} snapshot(s) (remove the image, e.g. "
                   f"`ctr image rm {image or 'IMAGE'}`, and stop its containers first)", err=True)
    if image is not None and digests is not None:
        unknown = [d for d in digests if d not in layers]
        if unknown:
            typer.echo(f"{len(unknown)} layer(s) of {image} have no cache on this node", err=True)
