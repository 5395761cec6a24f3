"""CLI for the integration pieces: ``bootseer stack …``, ``bootseer images …``, ``bootseer quickstart``,
``bootseer config containerd`` and ``bootseer dev …``."""

from __future__ import annotations

import contextlib
import json
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.table import Table

from bootseer import log
from integration import containerd_config, images
from integration.stack import DEFAULT_ROOT, Stack, StackConfig, StackError

err = log.console(stderr=True)
stack_app = typer.Typer(help="The local stack: containerd + registry + BootSeer daemons in a scratch dir.",
                        no_args_is_help=True)
images_app = typer.Typer(help="Build and push the test and benchmark images (offline).", no_args_is_help=True)
config_app = typer.Typer(help="Print configuration for other systems.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tasks.", no_args_is_help=True)

RootOpt = typer.Option(DEFAULT_ROOT, "--root", help="Scratch dir of the stack (env BOOTSEER_STACK_DIR).")


def _fail(msg: str, code: int = 1) -> None:
    from rich.markup import escape

    err.print(f"[red]error:[/red] {escape(msg)}")
    raise typer.Exit(code)


@stack_app.command("up")
def stack_up(
    root: Path = RootOpt,
    rate: str = typer.Option(None, help="Shape the registry link, e.g. 1gbit or 200mbit."),
    registry_port: int = typer.Option(0, help="Registry port (0: pick a free one)."),
    cri_snapshotter: str = typer.Option("overlayfs", help="Snapshotter containerd's CRI plugin uses."),
    as_json: bool = typer.Option(False, "--json", help="Print the stack's addresses as JSON."),
) -> None:
    """Start containerd, a registry (optionally shaped) and the BootSeer daemons."""
    try:
        with err.status("starting the local stack…"):
            st = Stack.up(StackConfig(root=root, rate=rate, registry_port=registry_port,
                                      cri_snapshotter=cri_snapshotter))
    except StackError as e:
        _fail(str(e))
    _print_status(st, as_json)


@stack_app.command("down")
def stack_down(root: Path = RootOpt,
               keep: bool = typer.Option(False, help="Keep the scratch dir (logs, storage).")) -> None:
    """Stop the stack and remove every mount, loop device, namespace and process it made."""
    try:
        st = Stack.load(root)
    except StackError:
        from integration.stack import StackInfo  # no state file: clean up by the root path alone

        st = Stack(StackInfo(root=str(root.resolve()), containerd_socket="", containerd_config="", registry="",
                             registry_url="", registry_storage="", sandbox_image=""))
    st.down(remove=not keep)
    err.print(f"stack at {root} is down")


@stack_app.command("status")
def stack_status(root: Path = RootOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Addresses, paths and processes of the stack."""
    try:
        st = Stack.load(root)
    except StackError as e:
        _fail(str(e), 3)
    _print_status(st, as_json)


@stack_app.command("env")
def stack_env(root: Path = RootOpt) -> None:
    """Shell lines that point `ctr` and scripts at the stack: `eval "$(bootseer stack env)"` sets
    CONTAINERD_ADDRESS (ctr's socket), REGISTRY (its registry's host:port), BOOTSEER_STACK_DIR and
    BOOTSEER_EVENTS (the stack's start-up event log, which its snapshotter writes, for `bootseer profile`)."""
    import shlex

    from integration.stack import EVENTS_FILE

    try:
        st = Stack.load(root)
    except StackError as e:
        _fail(str(e), 3)
    for name, value in (("CONTAINERD_ADDRESS", st.info.containerd_socket), ("REGISTRY", st.info.registry),
                        ("BOOTSEER_STACK_DIR", st.info.root),
                        ("BOOTSEER_EVENTS", str(Path(st.info.root) / EVENTS_FILE))):
        typer.echo(f"export {name}={shlex.quote(value)}")


def _print_status(st: Stack, as_json: bool) -> None:
    doc = st.status()
    if as_json:
        typer.echo(json.dumps(doc, indent=1))
        return
    t = Table(title=f"local stack at {doc['root']}", show_header=False)
    for key in ("containerd_socket", "registry", "snapshotter_socket", "sidecar_url", "netns", "rate_bps",
                "sandbox_image"):
        if doc.get(key):
            t.add_row(key, str(doc[key]))
    for name, alive in doc["running"].items():
        t.add_row(f"process {name}", f"pid {doc['pids'][name]} {'running' if alive else '[red]dead[/red]'}")
    for name, path in doc["logs"].items():
        t.add_row(f"log {name}", path)
    log.console().print(t)


@images_app.command("push")
def images_push(
    which: str = typer.Argument(..., help="small | pause | realistic"),
    registry: str = typer.Option(None, help="host:port (default: the running stack's registry)."),
    root: Path = RootOpt,
) -> None:
    """Build (cached for realistic) and push a test image; prints its reference."""
    reg = registry or Stack.load(root).info.registry
    pushers: dict[str, Callable[[str], str]] = {"small": images.push_small, "pause": images.push_pause,
                                                "realistic": images.push_realistic}
    fn = pushers.get(which)
    if fn is None:
        _fail(f"unknown image {which!r}: small, pause or realistic")
        return
    typer.echo(fn(reg))


@images_app.command("build-realistic")
def images_build_realistic(cache: Path = typer.Option(images.DEFAULT_CACHE)) -> None:
    """Build the realistic benchmark image into the cache (minutes, once)."""
    img = images.build_realistic(cache)
    typer.echo(json.dumps({"layout": str(img.layout), "manifest": img.manifest_digest, "layers": img.layers}))


@config_app.command("containerd")
def config_containerd(
    containerd_version: str = typer.Option(None, "--containerd-version", help="1.6, 1.7 or 2.x (default: the "
                                           "installed containerd's, from `containerd --version`)."),
    address: str = typer.Option(containerd_config.DEFAULT_SOCKET, help="Snapshotter socket."),
    root: str = typer.Option(containerd_config.DEFAULT_ROOT, help="Snapshotter root dir."),
    no_cri: bool = typer.Option(False, "--no-cri", help="Only the proxy plugin, no CRI keys."),
    platform: str = typer.Option(None, help="Platform of the transfer service's unpack_config (1.7, 2.x); "
                                 "default: this machine's."),
    cri_pull: str = typer.Option("local", help="2.1+: 'transfer' sends CRI pulls through the transfer service "
                                 "(no disable_snapshot_annotations); 'local' keeps CRI's own pull path."),
) -> None:
    """Print the containerd config snippet that registers BootSeer (merge it, or add it to `imports`)."""
    if containerd_version is None:
        containerd_version = installed_containerd_version()
        if containerd_version is None:
            _fail("no containerd on PATH to take the version from: give --containerd-version 1.6, 1.7 or 2.x", 2)
        err.print(f"# for the installed containerd {containerd_version} (--containerd-version to choose)",
                  markup=False, highlight=False)
    try:
        typer.echo(containerd_config.snippet(containerd_version, address, root, cri=not no_cri, platform=platform,
                                             cri_pull=cri_pull), nl=False)
    except ValueError as e:
        _fail(str(e), 2)


def installed_containerd_version() -> str | None:
    """``major.minor`` of the containerd on PATH (``containerd --version``), or None."""
    import re
    import subprocess

    try:
        out = subprocess.run(["containerd", "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    # "containerd github.com/containerd/containerd 1.6.20~ds1 …" or "containerd containerd.io v2.1.3 …"
    m = re.search(r"\sv?(\d+)\.(\d+)\.\d+", out)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def quickstart(
    root: Path = typer.Option(Path("/var/tmp/bootseer-quickstart"), help="Scratch dir (removed at the end)."),
    keep: bool = typer.Option(False, help="Leave the stack running."),
    index_timeout: float = typer.Option(180.0, help="Seconds to wait for the sidecar to index the pushed image."),
) -> None:
    """Start a local stack, push the small test image, let the sidecar index it, pull it lazily and run it.

    The same steps an operator takes on a node: push (the registry notifies the sidecar, which converts the
    layers to EROFS blobs and attaches the index), `bootseer pull` (layers become lazy snapshots), `ctr run
    --snapshotter bootseer`.  Without the lazy-pull parts in the installation it falls back to an ordinary
    `ctr image pull` and says so.
    """
    cid = "quickstart-" + secrets.token_hex(3)
    with contextlib.suppress(StackError):
        Stack.load(root).down()  # a previous run that was interrupted
    try:
        with err.status("starting the local stack…"):
            st = Stack.up(StackConfig(root=root))
        err.print(f"stack up: containerd {st.info.containerd_socket}, registry {st.info.registry}")
    except StackError as e:
        _fail(str(e))
        return
    try:
        with err.status("building and pushing the small test image…"):
            ref = images.push_small(st.info.registry)
        err.print(f"pushed {ref}")
        lazy = bool(st.info.sidecar_url and st.info.snapshotter_socket)
        if lazy:
            _quickstart_lazy_pull(st, ref, index_timeout)
            run = st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, cid)
        else:
            err.print("[yellow]no sidecar/snapshotter in this installation: ordinary pull[/yellow]")
            with err.status(f"pulling {ref}…"):
                st.ctr("image", "pull", "--plain-http", ref)
            run = st.ctr("run", "--rm", ref, cid)
        out = run.stdout
        # the container's own output on stdout as it is; the label on stderr, so `quickstart | …` sees only it
        err.print(f"the container's output (ctr run --rm{' --snapshotter bootseer' if lazy else ''} {ref} {cid}):",
                  markup=False, highlight=False)
        sys.stdout.write(out)
        sys.stdout.flush()
        err.print("(end of the container's output)", markup=False, highlight=False)
        if out != images.SMALL_OUTPUT:
            _fail(f"unexpected container output {out!r}")
        err.print("[green]quickstart ok[/green]" + (" (lazily pulled)" if lazy else ""))
    finally:
        if not keep:
            st.down()


def _quickstart_lazy_pull(st: Stack, ref: str, timeout: float) -> None:
    """Wait for the sidecar's index of ``ref``, then ``bootseer pull`` it; fail unless every layer is lazy."""
    import time

    from bootseer.index import find_index
    from bootseer.pull import pull
    from bootseer.registry import RegistryClient

    client = RegistryClient(hosts_dir=str(Path(st.info.containerd_config).parent / "certs.d"))
    repo, _, _tag = ref.rpartition(":")
    digest = client.get_manifest(ref).digest
    deadline = time.monotonic() + timeout
    with err.status("waiting for the sidecar to convert and index the image…"):
        delay = 0.2
        while find_index(client, repo, digest) is None:
            if time.monotonic() > deadline:
                _fail(f"the sidecar did not index {ref} within {timeout:.0f}s (see {st.info.logs.get('sidecar')})")
            time.sleep(delay)  # polling the registry for the sidecar's result, with a deadline
            delay = min(delay * 1.5, 2.0)
    with err.status(f"pulling {ref} lazily…"):
        res = pull(ref, address=st.info.containerd_socket, client=client)
    modes = [lo.mode for lo in res.layers]
    err.print(f"pulled {ref}: {len(modes)} layers, {modes.count('lazy')} lazy, "
              f"{res.downloaded_bytes} bytes downloaded by containerd, {res.seconds:.2f}s")
    if modes.count("lazy") != len(modes):
        _fail(f"expected every layer to be lazy, got {modes}")


@dev_app.command("gen-protos")
def dev_gen_protos(check: bool = typer.Option(False, help="Only check the committed stubs are fresh.")) -> None:
    """Regenerate protos/ from containerd's .proto files (and the CRI subset)."""
    from protos import generate

    raise typer.Exit(generate.main(["--check"] if check else []))
