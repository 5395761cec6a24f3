"""``bootseer record`` and ``bootseer hotblocks show`` (mounted by :mod:`bootseer.cli`)."""

from __future__ import annotations

import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

from bootseer import log
from bootseer.hosts import default_hosts_dir
from recorder.record import EXIT_CODES, EXIT_ERROR, EXIT_IMAGE, Recorder, RecordError, RecordOptions

hotblocks_app = typer.Typer(help="Hot-block manifests: what an image's start-up reads, for prefetch.",
                            no_args_is_help=True)

_EXITS = "; ".join(f"{k}: {v}" for k, v in EXIT_CODES.items())


def record(
    image: str = typer.Argument(..., help="Image reference (indexed by the registry sidecar)."),
    command: list[str] = typer.Argument(None, help="The command to run (after `--`); default: the image's own."),
    ready_line: str | None = typer.Option(None, "--ready-line", help="Stop when a line of the command's output "
                                          "matches this regular expression (then the command is killed)."),
    timeout: float = typer.Option(300.0, "--timeout", help="Stop after this many seconds (a failure when "
                                  "--ready-line is given and did not match)."),
    env: list[str] = typer.Option([], "--env", "-e", help="K=V for the container (repeatable)."),
    runs: int = typer.Option(1, "--runs", min=1, max=20, help="Record this many runs and keep their union: the "
                             "first run reads every chunk from the registry, later ones from local chunks, and "
                             "the kernel's read-ahead differs a little between the two; 2 gives a steadier set."),
    merge: bool = typer.Option(False, "--merge", help="Fold this recording into the image's existing manifest "
                               "(union, ordered by earliest first access)."),
    push: bool = typer.Option(True, "--push/--no-push", help="Push the manifest as a referrer of the image."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the Parquet manifest here."),
    address: str | None = typer.Option(None, "--address", "-a", help="containerd's socket (default: the local "
                                       "stack's, else /run/containerd/containerd.sock)."),
    control: str | None = typer.Option(None, "--control", help="The snapshotter's control socket (default: the "
                                       "local stack's, else /run/bootseer/snapshotter.sock.ctl)."),
    snapshotter: str = typer.Option("bootseer", "--snapshotter", help="containerd's name of BootSeer's snapshotter."),
    hosts_dir: str | None = typer.Option(None, "--hosts-dir", help="containerd-style certs.d (default: env "
                                         "BOOTSEER_HOSTS_DIR, else the local stack's, else /etc/containerd/certs.d)."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Registries without hosts.toml over http://."),
    platform: str | None = typer.Option(None, "--platform", help="os/arch of an index; default: the host."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Run IMAGE once on the lazy path from cold caches, record which blocks its start-up reads (until the
    command exits, prints the ready line, or the time limit), and push them as the image's hot-block
    manifest: `bootseer record IMG --ready-line 'listening' -- python3 serve.py`.  Progress goes to stderr."""
    from bootseer.containerd import default_address
    from bootseer.control import default_control

    if ready_line is not None:
        try:
            re.compile(ready_line)
        except re.error as e:
            typer.echo(f"error: --ready-line {ready_line!r}: {e}", err=True)
            raise typer.Exit(2) from None
    for kv in env:
        if "=" not in kv or kv.startswith("="):
            typer.echo(f"error: --env {kv!r}: expected K=V", err=True)
            raise typer.Exit(2)
    if timeout <= 0:
        typer.echo("error: --timeout must be positive", err=True)
        raise typer.Exit(2)
    opts = RecordOptions(image=image, command=list(command or []), ready_line=ready_line, timeout=timeout,
                         env=list(env), merge=merge, runs=runs, push=push, output=output,
                         address=address or default_address(), control=control or default_control(),
                         snapshotter=snapshotter,
                         hosts_dir=default_hosts_dir(hosts_dir), plain_http=plain_http, platform=platform)
    console = log.console(stderr=True, highlight=False)

    def progress(msg: str) -> None:
        console.print(msg, markup=False)

    try:
        result = Recorder(opts, progress).run()
    except RecordError as e:
        typer.echo(f"error: {log.error_text(e)}", err=True)
        if as_json:
            typer.echo(json.dumps({**e.result, "error": str(e), "exit_code_meaning": EXIT_CODES.get(e.code)},
                                  indent=1))
        raise typer.Exit(e.code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except Exception as e:
        typer.echo(f"error: {type(e).__name__}: {e}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    if as_json:
        typer.echo(json.dumps(result, indent=1))
    else:
        _print_summary(result["summary"], console_out=True)
        where = result["artifact"] or result.get("output") or "(not pushed)"
        typer.echo(f"{result['reads']} reads recorded ({result['stop']} after {result['run_seconds']:.1f}s) → {where}")


record.__doc__ = inspect.cleandoc(record.__doc__ or "") + f"\n\nExit codes: {_EXITS}."


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _print_summary(s: dict[str, Any], console_out: bool = True) -> None:
    from rich.table import Table

    table = Table(title=f"hot blocks of {s['subject'][:19]}: {_mib(s['hot_bytes'])} in {s['ranges']} ranges, "
                        f"{s['share_of_image'] * 100:.1f}% of {_mib(s['image_blob_bytes'])} "
                        f"({s['recordings']} recording(s); the reads asked for {_mib(s['read_bytes'])})")
    for col in ("layer", "blob", "ranges", "hot", "of layer", "of hot set"):
        table.add_column(col, justify="left" if col in ("layer", "blob") else "right")
    for ly in s["layers"]:
        table.add_row(ly["layer"][:19], ly["blob"][:19], str(ly["ranges"]), _mib(ly["hot_bytes"]),
                      f"{ly['share_of_layer'] * 100:.1f}%", f"{ly['share_of_hot_set'] * 100:.1f}%")
    spread = Table(title=f"first access over the recording ({s['duration_s']:.2f}s)")
    spread.add_column("until", justify="right")
    spread.add_column("hot bytes read", justify="right")
    spread.add_column("share", justify="right")
    for p in s["spread"]:
        spread.add_row(f"{p['until_s']:.2f}s", _mib(p["hot_bytes"]), f"{p['share'] * 100:.0f}%")
    con = log.console(file=sys.stdout if console_out else sys.stderr)
    con.print(table)
    con.print(spread)


@hotblocks_app.command("show")
def show(
    image: str | None = typer.Argument(None, help="Image reference; its newest hot-block manifest is shown."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Show a local Parquet manifest instead."),
    hosts_dir: str | None = typer.Option(None, "--hosts-dir", help="containerd-style certs.d (default as record)."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Registries without hosts.toml over http://."),
    platform: str | None = typer.Option(None, "--platform", help="os/arch of an index; default: the host."),
    buckets: int = typer.Option(10, "--buckets", min=1, max=1000, help="Time buckets of the spread."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Layers, ranges, bytes, the share of each layer and of the image, and how the hot set spreads over time.
    Exit code 3 when the image has no usable manifest (none, corrupt, or not matching the image)."""
    from bootseer.hotblocks import BadManifest, HotBlockManifest

    if (image is None) == (file is None):
        typer.echo("error: give IMAGE or --file", err=True)
        raise typer.Exit(2)
    extra: dict[str, Any] = {}
    if file is not None:
        try:
            hb = HotBlockManifest.from_parquet(file.read_bytes())
        except (OSError, BadManifest) as e:
            typer.echo(f"error: {file}: {e}", err=True)
            raise typer.Exit(EXIT_IMAGE) from None
    else:
        assert image is not None
        hb, extra = _fetch(image, default_hosts_dir(hosts_dir), plain_http, platform)
    summary = {**hb.summary(buckets), **extra}
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
    else:
        _print_summary(summary)


def _fetch(image: str, hosts_dir: str, plain_http: bool, platform: str | None) -> tuple[Any, dict[str, Any]]:
    import logging

    from bootseer import hotblocks
    from bootseer.index import BadIndex, find_index
    from bootseer.reference import Reference
    from bootseer.registry import Platform, RegistryClient, RegistryError

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="warning: %(message)s")
    client = RegistryClient(hosts_dir=hosts_dir, plain_http=plain_http)
    try:
        ref = Reference.parse(image)
        manifest, _ = client.resolve_image(ref, Platform.parse(platform) if platform else None)
        try:
            idx = find_index(client, ref, manifest.digest)
        except BadIndex:
            idx = None
        index_blobs = {d: lb.blob.digest for d, lb in idx[1].layers.items()} if idx else None
        index_sizes = {lb.blob.digest: lb.blob.size for lb in idx[1].layers.values()} if idx else None
        found = hotblocks.fetch(client, ref, manifest.digest, image_layers=[d.digest for d in manifest.layers],
                               index_blobs=index_blobs, index_sizes=index_sizes)
    except (ValueError, RegistryError) as e:
        typer.echo(f"error: {image}: {log.error_text(e)}", err=True)
        raise typer.Exit(EXIT_IMAGE) from None
    if found is None:
        typer.echo(f"error: {image} ({manifest.digest}) has no usable hot-block manifest", err=True)
        raise typer.Exit(EXIT_IMAGE)
    return found.manifest, {"artifact": found.digest, "image": image}
