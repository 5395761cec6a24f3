"""``bootseer convert IMAGE`` and ``bootseer sidecar serve``: thin command-line adapters over
:mod:`registry_sidecar.convert` and :mod:`registry_sidecar.sidecar`."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from bootseer import log as bslog
from bootseer.index import DEFAULT_CHUNK_SIZE, FORMAT_VERSION
from bootseer.reference import Reference, ReferenceError
from bootseer.registry import Platform, RegistryClient, RegistryError
from bootseer.trust import TrustError, default_signer, generate_keypair
from registry_sidecar.convert import (
    ConvertError,
    ConvertOptions,
    ImageConverter,
    ImageResult,
    LayerMap,
    LayerResult,
    MemoryLayerMap,
    bind_image,
)

app = typer.Typer(help="The registry sidecar: converts pushed images into lazily loadable EROFS layers.",
                  no_args_is_help=True)

if TYPE_CHECKING:
    from rich.progress import TaskID

EXIT_SKIPPED = 3


class _RichProgress:
    """One progress bar per layer; its description names the phase (fetch, unpack, mkfs, push)."""

    def __init__(self, console: object) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(TextColumn("{task.fields[layer]}"), TextColumn("{task.description:>7}"),
                                 BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeElapsedColumn(),
                                 console=console, transient=False)  # type: ignore[arg-type]
        self.tasks: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def _task(self, layer: str) -> TaskID:
        with self.lock:
            if layer not in self.tasks:
                self.tasks[layer] = self.progress.add_task("wait", layer=layer.split(":")[-1][:12], total=None)
            return self.tasks[layer]

    def phase(self, layer: str, name: str, total: int | None) -> None:
        self.progress.update(self._task(layer), description=name, total=total, completed=0)

    def advance(self, layer: str, n: int) -> None:
        self.progress.advance(self._task(layer), n)

    def done(self, result: LayerResult) -> None:
        tid = self._task(result.digest)
        label = result.status if result.status != "skipped" else "skipped"
        size = result.blob.blob.size if result.blob else 0
        self.progress.update(tid, description=label, total=size or 1, completed=size or 1)


class _LineProgress:
    """Off a terminal (a pipe, a CI log): a line per layer phase and per finished layer, no redrawn bars."""

    def __init__(self, console: object) -> None:
        self.console = console
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def _say(self, text: str) -> None:
        with self.lock:
            self.console.print(f"{time.monotonic() - self.started:6.1f}s {text}", markup=False,  # type: ignore[attr-defined]
                               highlight=False)

    def phase(self, layer: str, name: str, total: int | None) -> None:
        size = f" ({total / 1e6:.1f} MB)" if total else ""
        self._say(f"layer {layer[:19]}: {name}{size}")

    def advance(self, layer: str, n: int) -> None:
        return None

    def done(self, result: LayerResult) -> None:
        size = f", blob {result.blob.blob.size / 1e6:.1f} MB" if result.blob else ""
        self._say(f"layer {result.digest[:19]}: {result.status}{size}")


def _client(plain_http: bool, hosts_dir: Path | None, docker_config: Path | None) -> RegistryClient:
    return RegistryClient(hosts_dir=hosts_dir, credentials=docker_config, plain_http=plain_http)


def convert(
    image: str = typer.Argument(..., help="Image reference, e.g. registry:5000/team/train:v3"),
    platform: list[str] = typer.Option([], "--platform", help="os/arch or os/arch/variant of an index (repeatable); "
                                       "default: this host's"),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON summary (layers, bytes in/out, seconds, MB/s)."),
    plain_http: bool = typer.Option(False, "--plain-http", help="Use http:// for registries without hosts.toml."),
    force: bool = typer.Option(False, "--force", help="Convert even if the image already has an index."),
    chunk_size: int = typer.Option(DEFAULT_CHUNK_SIZE, help="Chunk size of the index, bytes."),
    parallel: int = typer.Option(2, help="Layers converted at once."),
    index_version: int = typer.Option(FORMAT_VERSION, "--index-version", min=2, max=3,
                                      help="Index format: 3 sends each chunk as a zstd frame of a wire blob (the "
                                      "only blob pushed); 2 pushes the EROFS blob, fetched as stored (nodes that "
                                      "read only v2)."),
    wire_level: int = typer.Option(3, "--wire-level", min=1, max=22, help="zstd level of the v3 wire frames."),
    state_dir: Path | None = typer.Option(None, help="Share the sidecar's layer map (sqlite) in this directory."),
    hosts_dir: Path | None = typer.Option(None, help="containerd certs.d directory with hosts.toml files (default: "
                                          "env BOOTSEER_HOSTS_DIR, else the local stack's, else "
                                          "/etc/containerd/certs.d)."),
    docker_config: Path | None = typer.Option(None, help="docker config.json with credentials."),
    signing_key: Path | None = typer.Option(None, envvar="BOOTSEER_SIGNING_KEY",
                                            help="PKCS#8 PEM key signing the index (cosign format); nodes that "
                                            "require signatures ignore unsigned indexes. `bootseer sidecar keygen` "
                                            "makes one. Default: env BOOTSEER_SIGNING_KEY, else the local "
                                            "stack's key when one is up."),
    bind: str | None = typer.Option(None, "--bind", metavar="TAG",
                                    help="Also push the bound image as TAG: IMAGE's manifest plus an annotation "
                                    "naming its index, so that pinning its digest pins the index (no later "
                                    "referrer replaces it). A new digest: roll that one out. One platform only."),
    log_level: str = typer.Option("warning", help="Log level."),
) -> None:
    """Convert every layer of IMAGE into an EROFS blob and attach the index referrer.

    Exit status: 0 all layers indexed, 3 some layers skipped (reasons printed; the rest is indexed), 1 error.
    """
    from rich.markup import escape

    from bootseer.hosts import default_hosts_dir

    bslog.setup(log_level)
    err = bslog.console(stderr=True)
    try:
        ref = Reference.parse(image)
        platforms: list[Platform | None] = [Platform.parse(p) for p in platform] or [None]
    except (ReferenceError, ValueError) as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    layer_map: LayerMap = MemoryLayerMap()
    if state_dir is not None:
        from registry_sidecar.state import State

        layer_map = State(state_dir / "sidecar.sqlite")
    client = _client(plain_http, Path(default_hosts_dir(str(hosts_dir) if hosts_dir else None)), docker_config)
    try:
        signer = default_signer(signing_key)
    except TrustError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}")
        raise typer.Exit(1) from e
    if signer is None:
        err.print("[yellow]warning:[/yellow] no --signing-key: the index is pushed unsigned (nodes that require "
                  "signatures will pull this image the ordinary way)")
    opts = ConvertOptions(chunk_size=chunk_size, parallel=parallel, index_version=index_version,
                          wire_level=wire_level)
    converter = ImageConverter(client, opts, layer_map, signer)
    results: list[ImageResult] = []
    try:
        for p in platforms:
            if json_out:
                results.append(converter.convert(ref, platform=p, force=force))
            elif err.is_terminal:
                bars = _RichProgress(err)
                with bars.progress:
                    results.append(converter.convert(ref, platform=p, force=force, progress=bars))
            else:
                results.append(converter.convert(ref, platform=p, force=force, progress=_LineProgress(err)))
        if bind is not None:
            if len(results) != 1:
                raise ConvertError("--bind: one platform at a time (a bound image is one manifest)")
            bind_image(client, ref, results[0], bind)
    except (RegistryError, ConvertError, OSError) as e:
        err.print(f"[red]error:[/red] {escape(bslog.error_text(e))}")
        raise typer.Exit(1) from e
    summaries = [r.summary() for r in results]
    if json_out:
        out = summaries[0] if len(summaries) == 1 else summaries
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
    else:
        for s in summaries:
            if s["already_indexed"]:
                typer.echo(f"{s['ref']}: already indexed ({s['index']}); --force converts again")
                continue
            typer.echo(f"{s['ref']}: {s['converted']} converted, {s['reused']} reused, {len(s['skipped'])} skipped; "
                       f"{s['bytes_in'] / 1e6:.1f} MB in, {s['bytes_out'] / 1e6:.1f} MB out, {s['seconds']:.1f}s "
                       f"({s['mb_per_s']:.1f} MB/s); "
                       + (f"index {s['index']}" if s["index"] else "no layer convertible, no index attached"))
        for s in summaries:
            if s["bound"]:
                typer.echo(f"bound image: {s['bound']} (pin this digest)")
    skipped = [sk for s in summaries for sk in s["skipped"]]
    for sk in skipped:
        err.print(f"[yellow]skipped[/yellow] {sk['digest']}: {escape(sk['reason'])}")
    if skipped:
        raise typer.Exit(EXIT_SKIPPED)


@app.command("keygen")
def keygen_cmd(
    private_key: Path = typer.Argument(..., help="Where to write the private key (PKCS#8 PEM, mode 0600)."),
    public_key: Path = typer.Argument(..., help="Where to write the public key (PEM; what nodes' [trust] keys "
                                      "and `cosign verify --key` take)."),
) -> None:
    """Make an ECDSA P-256 key pair for signing indexes (the sidecar's signing_key, the nodes' trust keys)."""
    if private_key.exists():
        typer.echo(f"error: {private_key} exists; not overwriting a key", err=True)
        raise typer.Exit(1)
    kid = generate_keypair(private_key, public_key)
    typer.echo(f"wrote {private_key} (private, keep it on the converter) and {public_key} (public, for nodes); "
               f"key {kid}")


@app.command("serve")
def serve_cmd(
    config: Path | None = typer.Option(None, "--config", help="TOML file (listen, registry, state_dir, …)."),
    listen: str | None = typer.Option(None, help="host:port for /events, /healthz, /metrics."),
    registry: str | None = typer.Option(None, help="host:port of the registry it serves."),
    state_dir: str | None = typer.Option(None, help="Directory of the queue and layer map."),
    plain_http: bool | None = typer.Option(None, "--plain-http/--tls", help="http:// to the registry."),
    nice: int | None = typer.Option(None, help="Run mkfs.erofs with this nice value."),
    log_level: str = typer.Option("info", help="Log level."),
    log_format: str = typer.Option("text", help="text or json."),
) -> None:
    """Run the sidecar: receive the registry's notifications, convert every pushed image tag."""
    from registry_sidecar.sidecar import SidecarConfig, serve

    bslog.setup(log_level, log_format)
    try:
        cfg = SidecarConfig.load(config, listen=listen, registry=registry, state_dir=state_dir,
                                 plain_http=plain_http, nice=nice)
    except (ValueError, TypeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    logging.getLogger(__name__).info("starting with state in %s", cfg.state_dir)
    serve(cfg)


app.command("convert", help="Same as `bootseer convert`.")(convert)
