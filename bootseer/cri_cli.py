"""``bootseer cri …``: run an image once through the CRI, the way the kubelet starts a pod.

Meant for checking a node (or the local stack) by hand: ``bootseer cri run IMAGE -- CMD…`` goes through the
same CRI pull and start path that BootSeer accelerates, which ``ctr run`` does not.
"""

from __future__ import annotations

import sys

import typer

from bootseer.containerd import DEFAULT_ADDRESS, default_address
from bootseer.cri import CRIClient, CRIError, RegistryAuth

app = typer.Typer(help="Talk to the container runtime over CRI (runtime.v1), like the kubelet.",
                  no_args_is_help=True)

AddressOpt = typer.Option(
    None, "--address", "-a", show_default=False,
    help="CRI endpoint: containerd's socket.  Default: env CONTAINER_RUNTIME_ENDPOINT (as for crictl), else the "
         f"local stack's containerd if `bootseer stack up` runs one, else {DEFAULT_ADDRESS}.")


def _auth(user: str | None) -> RegistryAuth | None:
    if not user:
        return None
    name, _, password = user.partition(":")
    return RegistryAuth(username=name, password=password)


@app.command("version")
def version(address: str | None = AddressOpt) -> None:
    """Print the runtime's name and versions."""
    try:
        with CRIClient(address or default_address()) as cri:
            v = cri.version()
    except CRIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version})")


@app.command("pull")
def pull(image: str, address: str | None = AddressOpt,
         user: str = typer.Option(None, "--user", help="Registry credentials USER:PASSWORD.")) -> None:
    """Pull IMAGE through CRI and print its image ID."""
    try:
        with CRIClient(address or default_address()) as cri:
            typer.echo(cri.pull_image(image, _auth(user)))
    except CRIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


@app.command("run")
def run(
    image: str,
    command: list[str] = typer.Argument(None, help="Command and arguments (after --); default: the image's."),
    address: str | None = AddressOpt,
    timeout: float = typer.Option(300.0, help="Seconds to wait for the container to exit."),
    env: list[str] = typer.Option([], "--env", "-e", help="KEY=VALUE, repeatable."),
    user: str = typer.Option(None, "--user", help="Registry credentials USER:PASSWORD."),
    pull: bool = typer.Option(True, help="Pull the image if the runtime doesn't have it."),
) -> None:
    """Run IMAGE once in a fresh host-network pod; print its output and exit with its exit code."""
    envs = dict(e.partition("=")[::2] for e in env)
    try:
        with CRIClient(address or default_address()) as cri:
            r = cri.run(image, command or [], timeout, env=envs, auth=_auth(user), pull=pull)
    except CRIError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(125) from None
    sys.stdout.buffer.write(r.stdout)
    sys.stdout.flush()
    sys.stderr.buffer.write(r.stderr)
    sys.stderr.flush()
    raise typer.Exit(r.exit_code)
