"""``bootseer depsnap …``"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bootseer import events
from bootseer.log import error_text
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
        raise SpecError(f"cannot resolve {ref}: {error_text(e)}") from e
    if not digest:
        raise SpecError(f"cannot resolve {ref}: no such image in the registry")
    return digest


def _spec(base: str, requirements: list[Path], apt: str, file: list[Path], run: str, platform: str,
          plain_http: bool, context: Path | None = None) -> DepSpec:
    return DepSpec(resolve_digest(base, plain_http), platform, list(requirements),
                   [a for a in apt.replace(",", " ").split() if a], list(file), run, context)


REQUIREMENTS = typer.Option([], "--requirements", "-r", help="A requirements file (repeatable); its content and "
                            "everything it includes (-r/-c) are part of the key, its name is not.")
APT = typer.Option("", "--apt", help="apt packages the install needs, space- or comma-separated (part of the key; "
                   "the install command installs them).")
FILE = typer.Option([], "--file", help="Another input file the install reads, below the context (repeatable; "
                    "keyed by its path in the context and its content).")
PLATFORM = typer.Option("linux/amd64", "--platform", help="os/arch of the snapshot (part of the key).")
PLAIN_HTTP = typer.Option(False, "--plain-http", help="The registry speaks plain HTTP (a loopback registry, e.g. "
                          "the local stack's).")
JSON = typer.Option(False, "--json", help="Print one JSON object (for a launcher) instead of plain text.")
CONTEXT = typer.Option(None, "--context", help="Directory mounted read-only at /depsnap, where the install runs "
                       "(default: the first requirements file's directory, else the current one).")
WHEELS = typer.Option(None, "--wheels", help="A directory of wheels mounted read-only at /wheels: an offline "
                      "package index for `pip install --no-index --find-links /wheels` (not part of the key, like "
                      "a package index).")


@app.command("key")
def key(
    base: str = typer.Option(..., help="Base image (a tag is resolved to its manifest digest first)."),
    requirements: list[Path] = REQUIREMENTS,
    apt: str = APT,
    file: list[Path] = FILE,
    run: str = typer.Option("", "--run", help="The install command (part of the key, as its argument list)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    platform: str = PLATFORM,
    plain_http: bool = PLAIN_HTTP,
    as_json: bool = JSON,
) -> None:
    """Print the key of a dependency snapshot and the inputs it was computed from (takes the options of `run`,
    so one command line can be checked before it runs)."""
    del wheels  # accepted so that `run`'s command line works here; not an input of the key
    try:
        spec = _spec(base, requirements, apt, file, run, platform, plain_http, context)
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
    requirements: list[Path] = REQUIREMENTS,
    apt: str = APT,
    file: list[Path] = FILE,
    run: str = typer.Option("", "--run", help="The install command (part of the key)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    platform: str = PLATFORM,
    plain_http: bool = PLAIN_HTTP,
    as_json: bool = JSON,
) -> None:
    """Print the image a job should start from: the snapshot if it exists, else the base (install will run)."""
    del wheels  # accepted so that `run`'s command line works here
    try:
        with events.span(PHASE, component="bootseer depsnap", base=base, mode="resolve") as attrs:
            spec = _spec(base, requirements, apt, file, run, platform, plain_http, context)
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
                  address: str | None, namespace: str, snapshotter: str, docker_host: str,
                  network: str) -> build.Result:
    if engine == "containerd":
        from bootseer.containerd import default_address
        from depsnap import engine_containerd

        return engine_containerd.build_containerd(address or default_address(), base, spec, repo, ctx, wheels,
                                                  plain_http, namespace, snapshotter, network=network)
    if engine == "docker":
        import docker

        return build.build_docker(docker.DockerClient(base_url=docker_host, timeout=600), base, spec, repo, ctx,
                                  wheels, plain_http, network=network)
    raise SpecError(f"unknown engine {engine!r} (containerd or docker)")


ENGINE = typer.Option("containerd", help="Build with containerd (a node) or docker (a CI pipeline).")
ADDRESS = typer.Option(None, "--address", "-a", help="containerd's socket (engine containerd; default: env "
                       "CONTAINER_RUNTIME_ENDPOINT, else the local stack's, else /run/containerd/containerd.sock).")
NAMESPACE = typer.Option("default", help="containerd namespace (engine containerd).")
SNAPSHOTTER = typer.Option("bootseer", help="containerd snapshotter the base is unpacked into (engine containerd).")
DOCKER_HOST = typer.Option("unix:///var/run/docker.sock", help="Docker engine (engine docker).")
NETWORK = typer.Option("none", help="The install's network: none (hermetic: give pip --wheels) or host (to reach a "
                       "package index; the result then depends on the index at build time).")


INDEX = typer.Option("auto", "--index", help="Make the image lazily loadable: auto (use the sidecar's index or "
                     "convert here), wait (for the registry sidecar), none.")


SIGNING_KEY = typer.Option(None, "--signing-key", envvar="BOOTSEER_SIGNING_KEY",
                           help="PKCS#8 PEM key signing an index converted here (as `bootseer convert`; nodes that "
                           "require signatures ignore unsigned indexes). Default: env BOOTSEER_SIGNING_KEY, else "
                           "the local stack's key when one is up.")


def _check_index_mode(mode: str) -> None:
    from depsnap.index import MODES

    if mode not in MODES:
        typer.echo(f"error: --index {mode}: one of {', '.join(MODES)}", err=True)
        raise typer.Exit(2)


def _indexed(res: build.Result, base: str, plain_http: bool, mode: str, signing_key: Path | None) -> build.Result:
    from bootseer.trust import TrustError, default_signer
    from depsnap import index

    try:
        signer = default_signer(signing_key) if mode == "auto" else None
    except TrustError as e:
        raise SpecError(str(e)) from e
    if mode == "auto" and signer is None:
        typer.echo("warning: no --signing-key: an index converted here is pushed unsigned (nodes that require "
                   "signatures will pull this image the ordinary way)", err=True)
    res.index = index.ensure_indexed(res.image, res.digest, base, plain_http, mode, signer=signer)
    return res


def _emit(res: build.Result, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"image": res.image, "digest": res.digest, "key": res.key, "built": res.built,
                               "index": res.index}))
    else:
        typer.echo(res.image)  # stdout: the image alone, for $(…); what happened goes to stderr
        how = "built and pushed" if res.built else "reused (a snapshot with this key exists)"
        typer.echo(f"snapshot {how}; {'indexed for lazy pull' if res.index else 'not indexed'}", err=True)


@app.command("build")
def build_cmd(
    base: str = typer.Option(..., help="Base image."),
    push: str = typer.Option(..., "--push", help="Repository to push the snapshot to (host/path)."),
    requirements: list[Path] = REQUIREMENTS,
    apt: str = APT,
    file: list[Path] = FILE,
    run: str = typer.Option(..., "--run", help="The install command, run by /bin/sh -c in the context (/depsnap)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
    docker_host: str = DOCKER_HOST,
    network: str = NETWORK,
    index_mode: str = INDEX,
    signing_key: Path | None = SIGNING_KEY,
    platform: str = PLATFORM,
    plain_http: bool = PLAIN_HTTP,
    as_json: bool = JSON,
) -> None:
    """Build the snapshot (reused if it exists) and push it; prints the image."""
    _check_index_mode(index_mode)
    try:
        spec = _spec(base, requirements, apt, file, run, platform, plain_http, context)
        res = _engine_build(engine, base, spec, push, spec.context_dir(), wheels, plain_http, address,
                            namespace, snapshotter, docker_host, network)
        res = _indexed(res, base, plain_http, index_mode, signing_key)
    except (SpecError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    _emit(res, as_json)


@app.command("run")
def run_cmd(
    base: str = typer.Option(..., help="Base image."),
    repo: str = typer.Option(..., help="Repository snapshots live in (host/path)."),
    requirements: list[Path] = REQUIREMENTS,
    apt: str = APT,
    file: list[Path] = FILE,
    run: str = typer.Option(..., "--run", help="The install command, run by /bin/sh -c in the context (/depsnap)."),
    context: Path = CONTEXT,
    wheels: Path = WHEELS,
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    namespace: str = NAMESPACE,
    snapshotter: str = SNAPSHOTTER,
    docker_host: str = DOCKER_HOST,
    network: str = NETWORK,
    index_mode: str = INDEX,
    signing_key: Path | None = SIGNING_KEY,
    platform: str = PLATFORM,
    plain_http: bool = PLAIN_HTTP,
    as_json: bool = JSON,
) -> None:
    """What a job launcher calls: the snapshot image for these dependencies, built first if missing, and
    indexed so that it starts lazily."""
    _check_index_mode(index_mode)
    try:
        with events.span(PHASE, component="bootseer depsnap", base=base, mode="run") as attrs:
            spec = _spec(base, requirements, apt, file, run, platform, plain_http, context)
            attrs["key"] = spec.key()
            found = build.resolve(repo, spec, plain_http)
            attrs["hit"] = found is not None
            res = found or _engine_build(engine, base, spec, repo, spec.context_dir(), wheels,
                                         plain_http, address, namespace, snapshotter, docker_host, network)
            res = _indexed(res, base, plain_http, index_mode, signing_key)
            attrs.update(image=res.image, digest=res.digest, built=res.built, indexed=res.index is not None)
    except (SpecError, RuntimeError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    _emit(res, as_json)
