"""``bootseer depsnap …``"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import typer

from depsnap.key import DepSpec, SpecError

app = typer.Typer(help="Dependency snapshots: the install step kept as an image layer.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """depsnap sub-commands."""


def resolve_digest(image: str, plain_http: bool = False) -> str:
    """The manifest digest a reference points at now (a digest reference is returned as is)."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    args = ["skopeo", "inspect", "--raw", "--retry-times", "2"]
    if plain_http:
        args.append("--tls-verify=false")
    proc = subprocess.run([*args, f"docker://{image}"], capture_output=True)
    if proc.returncode != 0:
        raise SpecError(f"cannot resolve {image}: {proc.stderr.decode(errors='replace').strip()}")
    return "sha256:" + hashlib.sha256(proc.stdout).hexdigest()


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
        spec = DepSpec(resolve_digest(base, plain_http), platform, list(requirements),
                       [a for a in apt.replace(",", " ").split() if a], list(file), run)
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
