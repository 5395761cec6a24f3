"""``bootseer status`` and ``bootseer pull``: the node-side commands of the lazy path.

``status`` asks the snapshotter's control socket (see :mod:`bootseer.control`) for its lazy layers
and prints, per layer, the blob, its size, how much of it is local, how much was fetched by whom (demand
reads, prefetch of recorded hot blocks, background fill) and whether the layer left FUSE (swapped to its
local file).  ``--json`` prints the same for scripts: ``{"layers": [{"digest", "size", "bytes_local",
"fetched": {"demand", "prefetch", "background"}, "swapped", "mounted", ...}]}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from bootseer.control import DEFAULT_CONTROL, Control, ControlError, default_control, send_pull_hint
from bootseer.hosts import default_hosts_dir


def layer_rows(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stable, documented shape of ``status --json`` (the daemon's own status has more, kept under
    ``detail``)."""
    rows = []
    for doc in layers:
        fetched = (doc.get("fetched") or {}).get("bytes") or {}
        rows.append({
            "digest": doc["digest"],
            "size": int(doc.get("size", 0)),
            "bytes_local": int(doc.get("bytes_local", 0)),
            "fetched": {k: int(fetched.get(k, 0)) for k in ("demand", "prefetch", "background")},
            "swapped": bool(doc.get("swapped")),
            "mounted": bool(doc.get("mounted")),
            "owners": list(doc.get("owners", [])),
            "detail": doc,
        })
    return rows


def status(control: str | None = typer.Option(None, "--control", help="The snapshotter's control socket "
                                                "(default: the local stack's, else " + DEFAULT_CONTROL + ")."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the snapshotter's lazy layers: blob, size, bytes local, bytes fetched by kind, swapped."""
    path = control or default_control()
    if not Path(path).exists():
        typer.echo(f"error: no snapshotter control socket at {path} (is the snapshotter running with "
                   "remote_snapshots = true?)", err=True)
        raise typer.Exit(1)
    try:
        layers = Control(path, timeout=30).call("status")["layers"]
    except (OSError, ControlError) as e:
        typer.echo(f"error: {path}: {e}", err=True)
        raise typer.Exit(1) from None
    rows = layer_rows(layers)
    if as_json:
        typer.echo(json.dumps({"layers": rows}, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lazy layers ({len(rows)}), sizes in MiB; fetched: demand / prefetch / background")
    table.add_column("blob", no_wrap=True, min_width=19)
    for col in ("size", "local", "demand", "prefetch", "backgr.", "state", "users"):
        table.add_column(col, justify="left" if col == "state" else "right", no_wrap=True)
    for r in rows:
        state = "swapped" if r["swapped"] else ("FUSE" if r["mounted"] else "cached")
        f = r["fetched"]
        table.add_row(r["digest"][:19], _n(r["size"]), _n(r["bytes_local"]), _n(f["demand"]), _n(f["prefetch"]),
                      _n(f["background"]), state, str(len(r["owners"])))
    Console().print(table)


def _n(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def pull_cmd(
    image: str = typer.Argument(..., help="Image reference, e.g. 127.0.0.1:5000/bootseer/realistic:v1."),
    address: str | None = typer.Option(None, "--address", "-a", help="containerd's socket (default: the local "
                                       "stack's, else /run/containerd/containerd.sock)."),
    namespace: str = typer.Option("default", "--namespace", "-n", help="containerd namespace."),
    snapshotter: str = typer.Option("bootseer", "--snapshotter", help="Snapshotter to unpack into."),
    platform: str | None = typer.Option(None, "--platform",
                                        help="os/arch (or os/arch/variant) of an index; default: the host."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Registries without hosts.toml over http://."),
    hosts_dir: str | None = typer.Option(None, "--hosts-dir", help="containerd-style certs.d (default: env "
                                         "BOOTSEER_HOSTS_DIR, else the local stack's, else /etc/containerd/certs.d)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    control: str | None = typer.Option(None, "--control", help="The snapshotter's control socket, told first "
                                       "so it sets the layers up while this command starts (default: the local "
                                       "stack's, else /run/bootseer/snapshotter.sock.ctl; skipped if absent)."),
) -> None:
    """Pull IMAGE into containerd with lazy layers where the image has a BootSeer index (like `ctr-remote
    image rpull`); then `ctr run --snapshotter bootseer IMAGE …` starts at once."""
    if snapshotter == "bootseer":
        send_pull_hint(control or default_control(), image, platform)
    from bootseer.containerd import default_address
    from bootseer.pull import PullError, pull
    from bootseer.registry import RegistryClient, RegistryError

    addr = address or default_address()
    hd = default_hosts_dir(hosts_dir)
    client = RegistryClient(hosts_dir=hd, plain_http=plain_http)
    # rich (a spinner, bold modes) only for a person at a terminal: importing it costs a script ~30 ms of
    # every pull, on the path to the container's start
    console = None
    if not as_json and sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)

    def progress(event: str, d: dict[str, Any]) -> None:
        if as_json:
            return
        head = f"layer {d['index'] + 1}/{d['count']} {d['digest'][:19]} {_mib(d['size'])}: "
        if console is not None:
            console.print(f"{head}[bold]{d['mode']}[/bold] ({d['seconds']:.2f}s)")
        else:
            typer.echo(f"{head}{d['mode']} ({d['seconds']:.2f}s)", err=True)

    try:
        with console.status(f"pulling {image}", spinner="dots") if console is not None else _null():
            res = pull(image, address=addr, namespace=namespace, snapshotter=snapshotter, client=client,
                       platform=platform, progress=progress)
    except (PullError, RegistryError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except Exception as e:  # grpc errors from containerd
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(res.to_dict(), indent=1))
    else:
        lazy = sum(lo.mode == "lazy" for lo in res.layers)
        typer.echo(f"{res.image}: {len(res.layers)} layers, {lazy} lazy, {_mib(res.downloaded_bytes)} downloaded, "
                   f"{res.seconds:.2f}s")


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
