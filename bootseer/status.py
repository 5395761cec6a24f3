"""``bootseer status`` and ``bootseer pull``: the node-side commands of the lazy path.

``status`` asks the snapshotter's control socket (see :mod:`bootseer.control`) for its lazy layers
and prints, per layer, the blob, the repository it comes from, its size, how much of it is local, how much
was fetched by whom (demand reads, prefetch of recorded hot blocks, background fill) and whether the layer
left FUSE (swapped to its local file).  ``--json`` prints the same for scripts: ``{"layers": [{"digest",
"size", "bytes_local", "fetched": {"demand", "prefetch", "background"}, "swapped", "mounted", "repository",
"needs_registry", "registry_down", ...}]}`` (``needs_registry``: not all of the layer is local, so its reads
still go to the registry; ``registry_down``: why its endpoints are marked down, or null);
with ``--image IMAGE`` only that image's layers, each also with ``image``, ``layer`` (the image's layer digest, as
``bootseer pull`` prints it) and ``position``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from bootseer import log
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
            "repository": doc.get("repository"),  # host/path the blob is served from
            # reads of this layer still go to the registry (not all of it is local): what an outage breaks
            "needs_registry": bool(doc.get("needs_registry", int(doc.get("bytes_local", 0)) < int(doc.get("size", 0)))),
            "registry_down": doc.get("registry_down"),  # why its endpoints are marked down now, or None
            "detail": doc,
        })
    return rows


def image_blobs(image: str, hosts_dir: str | None, plain_http: bool,
                platform: str | None) -> dict[str, dict[str, Any]]:
    """EROFS blob digest → ``{"image", "layer" (the image's layer digest, as `pull` prints it), "position"}``
    from ``image``'s BootSeer index, so the snapshotter's blobs can be matched to the image's layers."""
    from bootseer.index import find_index
    from bootseer.reference import Reference
    from bootseer.registry import Platform, RegistryClient

    client = RegistryClient(hosts_dir=default_hosts_dir(hosts_dir), plain_http=plain_http)
    ref = Reference.parse(image)
    manifest, _ = client.resolve_image(ref, Platform.parse(platform) if platform else None)
    found = find_index(client, ref, manifest.digest)
    if found is None:
        raise ValueError(f"{image} ({manifest.digest}) has no BootSeer index: none of its layers is lazy")
    out: dict[str, dict[str, Any]] = {}
    for i, desc in enumerate(manifest.layers):
        lb = found[1].layers.get(desc.digest)
        if lb is not None:
            out.setdefault(lb.blob.digest, {"image": image, "layer": desc.digest, "position": i + 1})
    return out


def status(control: str | None = typer.Option(None, "--control", help="The snapshotter's control socket "
                                                "(default: the local stack's, else " + DEFAULT_CONTROL + ")."),
           image: str | None = typer.Option(None, "--image", help="Only this image's layers, each with its "
                                            "position and layer digest (as `bootseer pull` prints them)."),
           hosts_dir: str | None = typer.Option(None, "--hosts-dir", help="containerd-style certs.d for --image "
                                                "(default as pull)."),
           plain_http: bool = typer.Option(False, "--plain-http", help="--image's registry over http:// without a "
                                           "hosts.toml."),
           platform: str | None = typer.Option(None, "--platform", help="os/arch of --image's index; default: "
                                               "the host."),
           as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Show the snapshotter's lazy layers: blob, repository, size, bytes local, bytes fetched by kind, swapped;
    with --image, only that image's, matched to its layers."""
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
    if image is not None:
        from bootseer.registry import RegistryError

        try:
            blobs = image_blobs(image, hosts_dir, plain_http, platform)
        except (RegistryError, ValueError) as e:
            typer.echo(f"error: {log.error_text(e)}", err=True)
            raise typer.Exit(1) from None
        rows = sorted((dict(r, **blobs[r["digest"]]) for r in rows if r["digest"] in blobs),
                      key=lambda r: r["position"])
    if as_json:
        typer.echo(json.dumps({"layers": rows}, indent=1))
        return
    from rich.table import Table

    what = f"lazy layers of {image}" if image is not None else "lazy layers"
    table = Table(title=f"{what} ({len(rows)}), sizes in MiB; fetched: demand / prefetch / background",
                  title_justify="left")
    if image is not None:
        table.add_column("#", justify="right", no_wrap=True)
        table.add_column("layer", no_wrap=True, min_width=19)
    table.add_column("blob", no_wrap=True, min_width=19)
    if image is None:
        table.add_column("repository", no_wrap=True)
    for col in ("size", "local", "demand", "prefetch", "backgr.", "state", "registry", "users"):
        table.add_column(col, justify="left" if col in ("state", "registry") else "right", no_wrap=True)
    for r in rows:
        state = "swapped" if r["swapped"] else ("FUSE" if r["mounted"] else "cached")
        registry = ("DOWN" if r["registry_down"] else "needed") if r["needs_registry"] else "not needed"
        f = r["fetched"]
        head = [str(r["position"]), r["layer"][:19]] if image is not None else []
        repo = [] if image is not None else [r["repository"] or "?"]
        table.add_row(*head, r["digest"][:19], *repo, _n(r["size"]), _n(r["bytes_local"]), _n(f["demand"]),
                      _n(f["prefetch"]), _n(f["background"]), state, registry, str(len(r["owners"])))
    log.console().print(table)


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
    # rich (a spinner, bold modes) only for a person at a terminal: importing it costs every pull time on the
    # path to the container's start (docs/bench/design-measurements.md)
    console = None
    if not as_json and sys.stderr.isatty():

        console = log.console(stderr=True)

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
        typer.echo(f"error: {log.error_text(e)}", err=True)
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
