"""``bootseer depsnap …``"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bootseer import events
from depsnap import build
from depsnap.key import DepSpec, SpecError

PHASE = "dependency_resolve"  # the start-up phase `bootseer profile` shows for resolve/run
app = typer.Typer(help="Dependency snapshots: the install step kept as an image layer.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """depsnap sub-commands."""


def resolve_digest(ref: str, plain_http: bool = False) -> str:
    """The manifest digest a reference points at now (a digest reference is returned as is)."""
    if "@sha256:" in ref:
        return ref.split("@", 1)[1]
    from depsnap import image

    try:
        digest = image.exists(ref, plain_http)
    except (image.ImageError, ValueError) as e:
        raise SpecError(f"cannot resolve {ref}: {e}") from e
    if not digest:
        raise SpecError(f"cannot resolve {ref}: no such image in the registry")
    return digest


def _spec(base: str, requirements: list[Path], apt: str, file: list[Path], run: str, platform: str,
          plain_http: bool) -> DepSpec:
    return DepSpec(resolve_digest(base, plain_http), platform, list(requirements),
                   [a for a in apt.replace(",", " ").split() if a], list(file), run)


@app.command("key")
def key(
    base: str = typer.Option(..., help="Base image (a tag is resolved to its manifest digest first)."),
    requirements: list[Path] = typer.Option([], "--requirements", "-r", help="requirements.txt (repeatable)."),
    apt: str = typer.Option("", help="Space- or comma-separated apt packages."),
    file: list[Path] = typer.Option([], "--file", help="Other input files the install reads (repeatable)."),
    run: str = typer.Option("", help="The install command."),
    platform: str = typer.Option("linux/amd64"),
    plain_http: bool = typer.Option(False, help="The registry speaks plain HTTP (loopback)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the key of a dependency snapshot and the inputs it was computed from."""
    try:
        spec = _spec(base, requirements, apt, file, run, platform, plain_http)
        inputs, k = spec.inputs(), spec.key()
    except SpecError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    if as_json:
        typer.echo(json.dumps({"key": k, "tag": spec.tag(), "inputs": inputs}, indent=1))
        return
    typer.echo(k)
    for name, value in inputs.items():
        typer.echo(f"  {name}: {value}", err=True)
    if inputs["unpinned"]:
        typer.echo(f"  note: {len(inputs['unpinned'])} unpinned requirement(s): the same key may install "
                   "different versions as the index moves", err=True)


@app.command("resolve")
def resolve_cmd(
    base: str = typer.Option(..., help="Base image."),
    repo: str = typer.Option(..., help="Repository snapshots are pushed to (host/path)."),
    requirements: list[Path] = typer.Option([], "--requirements", "-r"),
    apt: str = typer.Option(""),
    file: list[Path] = typer.Option([], "--file"),
    run: str = typer.Option("", help="The install command."),
    platform: str = typer.Option("linux/amd64"),
    plain_http: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the image a job should start from: the snapshot if it exists, else the base (install will run)."""
    try:
        with events.span(PHASE, component="bootseer depsnap", base=base, mode="resolve") as attrs:
            spec = _spec(base, requirements, apt, file, run, platform, plain_http)
            found = build.resolve(repo, spec, plain_http)
            attrs.update(key=spec.key(), hit=found is not None, image=found.image if found else base)
    except (SpecError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from e
    doc = {"image": found.image if found else base, "digest": found.digest if found else spec.base_digest,
           "hit": found is not None, "key": spec.key(), "install_needed": found is None}
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        typer.echo(doc["image"])
        if not found:
            typer.echo("note: no snapshot for this key yet; the install will run at job start", err=True)


def _engine_build(engine: str, base: str, spec: DepSpec, repo: str, ctx: Path, wheels: Path | None, plain_http: bool,
                  address: str, namespace: str, snapshotter: str, docker_host: str, network: str) -> build.Result:
    if engine == "containerd":
        from depsnap import engine_containerd

        return engine_containerd.build_containerd(address, base, spec, repo, ctx, wheels, plain_http, namespace,
                                                  snapshotter, network=network)
    if engine == "docker":
        import docker

        return build.build_docker(docker.DockerClient(base_url=docker_host, timeout=600), base, spec, repo, ctx,
                                  wheels, plain_http, network=network)
    raise SpecError(f"unknown engine {engine!r} (containerd or docker)")


def _context(context: Path | None, requirements: list[Path]) -> Path:
    return context or (requirements[0].parent if requirements else Path.cwd())


ENGINE = typer.Option("containerd", help="Build with containerd (a node) or docker (a CI pipeline).")
ADDRESS = typer.Option("/run/containerd/containerd.sock", help="containerd socket (engine containerd).")
NAMESPACE = typer.Option("default", help="containerd namespace (engine containerd).")
SNAPSHOTTER = typer.Option("bootseer", help="containerd snapshotter the base is unpacked into (engine containerd).")
DOCKER_HOST = typer.Option("unix:///var/run/docker.sock", help="Docker engine (engine docker).")
CONTEXT = typer.Option(None, help="Directory mounted at /depsnap (default: the requirements' dir).")
WHEELS = typer.Option(None, help="A directory of wheels mounted at /wheels (offline package index).")
NETWORK = typer.Option("none", help="The install's network: none (hermetic) or host (to reach a package index).")


INDEX = typer.Option("auto", "--index", help="Make the image lazily loadable: auto (use the sidecar's index or "
                     "convert here), wait (for the registry sidecar), none.")


def _check_index_mode(mode: str) -> None:
    from depsnap.index import MODES

    if mode not in MODES:
        typer.echo(f"error: --index {mode}: one of {', '.join(MODES)}", err=True)
        raise typer.Exit(2)


def _indexed(res: build.Result, base: str, plain_http: bool, mode: str) -> build.Result:
    from depsnap import index

    res.index = index.ensure_indexed(res.image, res.digest, base, plain_http, mode)
    return res


def _emit(res: build.Result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"image": res.image, "digest": res.digest, "key": res.key, "built": res.built,
                               "index": res.index}))
    else:
        typer.echo(res.image)


@app.command("build")
def build_cmd(
    base: str = typer.Option(..., help="Base image."),
    push: str = typer.Option(..., "--push", help="Repository to push the snapshot to (host/path)."),
    requirements: list[Path] = typer.Option([], "--requirements", "-r"),
    apt: str = typer.Option(""),
    file: list[Path] = typer.Option([], "--file"),
    run: str = typer.Option(..., help="The install command (runs in the requirements' directory)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    engine: str = ENGINE,
    address: str = ADDRESS,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
    docker_host: str = DOCKER_HOST,
    network: str = NETWORK,
    index_mode: str = INDEX,
    platform: str = typer.Option("linux/amd64"),
    plain_http: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Build the snapshot (reused if it exists) and push it; prints the image."""
    _check_index_mode(index_mode)
    try:
        spec = _spec(base, requirements, apt, file, run, platform, plain_http)
        res = _engine_build(engine, base, spec, push, _context(context, requirements), wheels, plain_http, address,
                            namespace, snapshotter, docker_host, network)
        res = _indexed(res, base, plain_http, index_mode)
    except (SpecError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    _emit(res, as_json)


@app.command("run")
def run_cmd(
    base: str = typer.Option(..., help="Base image."),
    repo: str = typer.Option(..., help="Repository snapshots live in (host/path)."),
    requirements: list[Path] = typer.Option([], "--requirements", "-r"),
    apt: str = typer.Option(""),
    file: list[Path] = typer.Option([], "--file"),
    run: str = typer.Option(..., help="The install command (runs in the requirements' directory)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    engine: str = ENGINE,
    address: str = ADDRESS,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
    docker_host: str = DOCKER_HOST,
    network: str = NETWORK,
    index_mode: str = INDEX,
    platform: str = typer.Option("linux/amd64"),
    plain_http: bool = typer.Option(False),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What a job launcher calls: the snapshot image for these dependencies, built first if missing, and
    indexed so that it starts lazily."""
    _check_index_mode(index_mode)
    try:
        with events.span(PHASE, component="bootseer depsnap", base=base, mode="run") as attrs:
            spec = _spec(base, requirements, apt, file, run, platform, plain_http)
            attrs["key"] = spec.key()
            found = build.resolve(repo, spec, plain_http)
            attrs["hit"] = found is not None
            res = found or _engine_build(engine, base, spec, repo, _context(context, requirements), wheels,
                                         plain_http, address, namespace, snapshotter, docker_host, network)
            res = _indexed(res, base, plain_http, index_mode)
            attrs.update(image=res.image, digest=res.digest, built=res.built, indexed=res.index is not None)
    except (SpecError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    _emit(res, as_json)
