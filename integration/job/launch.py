"""The job launcher of docs/job-start.md: starts the training job on a node, today's way or BootSeer's.

    python3 launch.py baseline --image REG/team/train:v3 --index-url http://pypi.internal/simple/ \\
        --ckpt-url http://store/run7/model.pt ...
    python3 launch.py bootseer --image REG/team/train:v3 --deps-repo REG/team/train-deps \\
        --index-url http://pypi.internal/simple/ --store http://store/run7/step-12000 ...
    python3 launch.py floor --image REG/team/train-deps:KEY --ckpt-dir /local/step-12000 ...
    python3 launch.py MODE ... --print      # the commands, one per line, without running them

* ``baseline`` (how jobs start today): ``ctr image pull`` of the image; in the container, ``pip install -r
  requirements.txt`` from the package index, then ``train.py`` reading the checkpoint as one HTTP stream.
* ``bootseer``: ``bootseer depsnap resolve`` names the image with the dependencies installed (a hit; on a
  miss the container installs them as today); ``bootseer ckptfs mount`` of the striped checkpoint starts at
  once, beside the pull, on the host (a sidecar); ``bootseer pull`` mounts the image lazily, its hot blocks
  prefetched; the container runs ``train.py`` on the mount, bind-mounted read-only at /ckpt.
* ``floor``: nothing to fetch: the image (dependencies inside) already unpacked on the node, the checkpoint on
  local disk; ``ctr run`` only.

The container gets the job's files (``--job-dir``: train.py, requirements.txt) at /job and a directory with
the pip wheel at /wheels (the realistic image's Debian python3 has no pip), both read-only, host networking
(to reach the package index and the store), and ``BOOTSEER_JOB_ID``/``BOOTSEER_EVENTS`` so that its phases
join the launcher's in ``bootseer profile``.  The launcher logs ``job_start`` (its whole run) and, for
``ctr image pull``, ``image_pull``; depsnap, ``bootseer pull``, the snapshotter and the ckptfs mount log their
own phases.  Exit status: the container's (the loss line is on stdout).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODES = ("baseline", "bootseer", "floor")
PIP_WHEEL = "pip-24.3.1-py3-none-any.whl"


def install_command(index_url: str) -> str:
    """The dependency install, the same string at job start (today) and in the depsnap key (BootSeer): run in
    the requirements' directory, with pip from the wheel at /wheels."""
    host = index_url.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    return (f"python3 /wheels/{PIP_WHEEL}/pip install -q --no-cache-dir --disable-pip-version-check "
            f"--root-user-action=ignore --break-system-packages --index-url {index_url} --trusted-host {host} "
            "-r requirements.txt")


class Launcher:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.bootseer = shlex.split(a.bootseer)
        self.printed: list[list[str]] = []
        self.events = Path(a.events).resolve() if a.events else None

    # ------------------------------------------------------------------------------------- commands
    def ctr(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.a.address, "-n", self.a.namespace, *args]

    def run_container(self, image: str, snapshotter: str, mounts: list[tuple[str, str]], command: str) -> list[str]:
        a = self.a
        env = [f"BOOTSEER_JOB_ID={a.job_id}", f"BOOTSEER_NODE={socket.gethostname()}"]
        binds = [(str(Path(a.job_dir).resolve()), "/job"), (str(Path(a.wheels).resolve()), "/wheels"), *mounts]
        if self.events:
            env.append(f"BOOTSEER_EVENTS=/bootseer-events/{self.events.name}")
        args = ["run", "--rm", "--net-host", "--snapshotter", snapshotter, "--cwd", "/job"]
        for src, dst in binds:
            args += ["--mount", f"type=bind,src={src},dst={dst},options=rbind:ro"]
        if self.events:
            args += ["--mount", f"type=bind,src={self.events.parent},dst=/bootseer-events,options=rbind:rw"]
        for e in env:
            args += ["--env", e]
        return self.ctr(*args, image, a.job_id, "sh", "-c", command)

    def plan(self) -> list[tuple[str, list[str]]]:
        """(what, command) in order; ``mount`` runs in the background, ``image`` answers the image to run."""
        a = self.a
        install = install_command(a.index_url) if a.index_url else ""
        http = ["--plain-http"] if a.plain_http else []
        train = "python3 /job/train.py"
        if a.mode == "baseline":
            return [("pull", self.ctr("image", "pull", *http, a.image)),
                    ("run", self.run_container(
                        a.image, a.snapshotter, [],
                        f"python3 /job/jobevents.py span dependency_install -- sh -c {shlex.quote(install)} && "
                        f"{train} --ckpt-url {a.ckpt_url}"))]
        if a.mode == "floor":
            return [("run", self.run_container(a.image, a.snapshotter, [(str(Path(a.ckpt_dir).resolve()), "/ckpt")],
                                               f"{train} --ckpt /ckpt/{a.ckpt_file}"))]
        ctl = ["--control", a.control] if a.control else []
        return [
            ("mount", [*self.bootseer, "ckptfs", "mount", a.store, a.mountpoint, "--no-cache",
                       "--prefetch", a.ckpt_file]),
            ("resolve", [*self.bootseer, "depsnap", "resolve", "--base", a.image, "--repo", a.deps_repo,
                         "-r", str(Path(a.job_dir) / "requirements.txt"), "--run", install, *http, "--json"]),
            ("pull", [*self.bootseer, "pull", "--address", a.address, "--namespace", a.namespace, *http, *ctl,
                      "$IMAGE"]),
            ("run", self.run_container("$IMAGE", "bootseer", [(a.mountpoint, "/ckpt")],
                                       f"{train} --ckpt /ckpt/{a.ckpt_file}")),
        ]

    # ------------------------------------------------------------------------------------------ run
    def launch(self) -> int:
        from bootseer import events

        if self.events:
            os.environ["BOOTSEER_EVENTS"] = str(self.events)
        os.environ["BOOTSEER_JOB_ID"] = self.a.job_id
        with events.span("job_start", component="launcher", mode=self.a.mode, image=self.a.image) as attrs:
            rc = self._launch(attrs)
            attrs["exit_code"] = rc
        return rc

    def _launch(self, attrs: dict[str, object]) -> int:
        import json

        from bootseer import events

        image = self.a.image
        plan = self.plan()
        with contextlib.ExitStack() as stack:
            for what, cmd in plan:
                cmd = [image if c == "$IMAGE" else c for c in cmd]
                if what == "mount":
                    Path(self.a.mountpoint).mkdir(parents=True, exist_ok=True)
                    stack.enter_context(_background_mount(cmd, Path(self.a.mountpoint)))
                elif what == "resolve":
                    doc = json.loads(_check(cmd).stdout)
                    image, attrs["depsnap_hit"] = doc["image"], doc["hit"]
                    attrs["image"] = image
                    if not doc["hit"]:  # no snapshot yet: install at start, as today
                        print("launch: no dependency snapshot for this key; installing at start", file=sys.stderr)
                        plan[-1] = ("run", self.run_container(
                            image, "bootseer", [(self.a.mountpoint, "/ckpt")],
                            f"sh -c {shlex.quote(install_command(self.a.index_url))} && "
                            f"python3 /job/train.py --ckpt /ckpt/{self.a.ckpt_file}"))
                elif what == "pull":
                    if cmd[0] == "ctr":  # containerd logs no phase of its own
                        with events.span("image_pull", component="ctr", image=image):
                            _check(cmd)
                    else:
                        _check(cmd)
                else:
                    if self.a.mode == "bootseer":
                        _wait_mounted(Path(self.a.mountpoint), 120)
                    return subprocess.call(cmd)
        return 1

    def print_plan(self) -> None:
        for what, cmd in self.plan():
            line = shlex.join(cmd).replace("'$IMAGE'", '"$IMAGE"')
            if what == "mount":
                line += " &"
            if what == "resolve":
                line = "IMAGE=$(" + line + " | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"image\"])')"
            print(line)


def _check(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"launch: {shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


_mount_procs: dict[str, tuple[subprocess.Popen[bytes], Any]] = {}


@contextlib.contextmanager
def _background_mount(cmd: list[str], mountpoint: Path) -> Iterator[None]:
    """The ckptfs mount as a sidecar process for the job's lifetime (SIGTERM unmounts it)."""
    import tempfile

    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed when the mount ends; a file, not a pipe: a full pipe would stall the FUSE daemon
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    _mount_procs[str(mountpoint)] = (proc, log)
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _mount_procs.pop(str(mountpoint), None)
        log.close()


def _wait_mounted(mountpoint: Path, timeout: float) -> None:
    proc, log = _mount_procs[str(mountpoint)]
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mountpoint):
        if proc.poll() is not None:
            log.seek(0)
            err = log.read().decode(errors="replace")
            raise SystemExit(f"launch: ckptfs mount exited ({proc.returncode}): {err.strip()[-2000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"launch: {mountpoint} not mounted after {timeout:.0f} s")
        time.sleep(0.02)  # polling the mount table with a deadline


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=MODES)
    p.add_argument("--image", required=True, help="base image (baseline, bootseer) or the image to run (floor)")
    p.add_argument("--deps-repo", help="bootseer: repository of the dependency snapshots")
    p.add_argument("--index-url", help="package index (PEP 503 simple) of the install")
    p.add_argument("--ckpt-url", help="baseline: the checkpoint file over HTTP")
    p.add_argument("--store", help="bootseer: the ckptfs store of the checkpoint")
    p.add_argument("--ckpt-dir", help="floor: the checkpoint's directory on local disk")
    p.add_argument("--ckpt-file", default="model.pt", help="the checkpoint's file name in the store / directory")
    p.add_argument("--mountpoint", default="/run/bootseer/ckpt", help="bootseer: where ckptfs mounts the store")
    p.add_argument("--job-dir", default=str(Path(__file__).resolve().parent), help="train.py, requirements.txt")
    p.add_argument("--wheels", default="/var/cache/bootseer/pip", help=f"directory holding {PIP_WHEEL}")
    p.add_argument("--job-id", default=f"job-{os.getpid()}")
    p.add_argument("--events", help="event log (default: $BOOTSEER_EVENTS / the node's config)")
    p.add_argument("--address", default="/run/containerd/containerd.sock")
    p.add_argument("--namespace", default="default")
    p.add_argument("--snapshotter", default="overlayfs", help="baseline/floor: containerd's snapshotter")
    p.add_argument("--control", help="bootseer: the snapshotter's control socket")
    p.add_argument("--plain-http", action="store_true", help="registry over http:// (a test registry)")
    p.add_argument("--bootseer", default="bootseer", help="how to call BootSeer's CLI")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the commands, run nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    need = {"baseline": ["index_url", "ckpt_url"], "bootseer": ["deps_repo", "index_url", "store"],
            "floor": ["ckpt_dir"]}[a.mode]
    missing = [f"--{n.replace('_', '-')}" for n in need if not getattr(a, n)]
    if missing:
        print(f"launch.py {a.mode}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    launcher = Launcher(a)
    if a.print_only:
        launcher.print_plan()
        return 0
    return launcher.launch()


if __name__ == "__main__":
    sys.exit(main())
