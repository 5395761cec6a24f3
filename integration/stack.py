"""The local stack: containerd, a registry and the BootSeer daemons on loopback, all in one scratch dir.

``Stack.up(StackConfig(...))`` starts it, ``Stack.load(root).down()`` removes every trace of it, and
``stack.info`` is the machine-readable description scripts use (sockets, addresses, log files).  The CLI
(``bootseer stack up|down|status``), the pytest fixture and the benchmarks all go through this module.

``down`` does not trust the state file alone: it kills every process whose command line names the
scratch dir (daemons, containerd shims), unmounts everything below it, detaches loop devices backed by
files below it and deletes the stack's network namespace — so it also cleans up after an ``up`` that
crashed half-way.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from bootseer.localstack import DEFAULT_ROOT, STATE_FILE, StackInfo, read_info
from bootseer.testkit import free_port
from integration import containerd_config, images
from integration.netns import ShapedLink, parse_rate

if TYPE_CHECKING:
    from bootseer.trust import Signer


class StackError(RuntimeError):
    pass


def _importable(module: str) -> bool:
    """Whether an optional part of the project is installed (its parent package may be absent too)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


@dataclass
class StackConfig:
    root: Path = DEFAULT_ROOT
    registry_port: int = 0  # 0: a free loopback port (5000 inside a shaped namespace)
    rate: str | None = None  # e.g. "1gbit": registry behind a shaped veth link
    cri_snapshotter: str = "overlayfs"
    snapshotter: bool = True  # start BootSeer's snapshotter when the package provides it
    sidecar: bool = True  # start the registry sidecar when the package provides it
    lazy: bool = True  # the snapshotter serves indexed images' layers lazily (remote snapshots)
    lazy_config: dict[str, Any] = field(default_factory=dict)  # its [lazy] table (LazyConfig knobs)
    snapshotter_config: dict[str, Any] = field(default_factory=dict)  # its top-level keys (lookup_timeout, ...)
    timeout: float = 60.0


EVENTS_FILE = "events.jsonl"  # below the stack's root


def wait_for(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:
    """Poll ``check`` until true; fail early if ``proc`` died, with the tail of its log.

    An exception from ``check`` means "not ready yet" (connection refused, a half-written file), except an
    ``AssertionError``: that is a check saying the wait can never succeed (a conversion job failed), so it
    surfaces at once instead of as a timeout minutes later.  The last "not ready" error goes into the timeout
    message, so its reason is not lost either."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    last: Exception | None = None
    while True:
        try:
            if check():
                return
        except AssertionError:
            raise
        except Exception as e:
            last = e
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with {proc.returncode}: {_tail(log)}")
        if time.monotonic() > deadline:
            why = f" (last check: {type(last).__name__}: {last})" if last is not None else ""
            raise StackError(f"{what} not ready after {timeout:.0f}s{why}: {_tail(log)}")
        time.sleep(delay)  # polling a condition with a deadline, not synchronising by sleep
        delay = min(delay * 2, 0.2)


def _tail(log: Path | None, n: int = 15) -> str:
    if log is None or not log.exists():
        return "(no log)"
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


class Stack:
    def __init__(self, info: StackInfo) -> None:
        self.info = info
        self.root = Path(info.root)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, root: Path = DEFAULT_ROOT) -> Stack:
        if not (Path(root) / STATE_FILE).exists():
            raise StackError(f"no stack at {root} (no {STATE_FILE}); run `bootseer stack up`")
        return cls(read_info(root))

    def save(self) -> None:
        tmp = self.root / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self.info), indent=1))
        os.replace(tmp, self.root / STATE_FILE)

    # ------------------------------------------------------------------------------------------- up
    @classmethod
    def up(cls, cfg: StackConfig) -> Stack:
        root = Path(cfg.root).resolve()
        if (root / STATE_FILE).exists():
            raise StackError(f"a stack already exists at {root}: `bootseer stack down --root {root}` first")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        (root / "logs").mkdir(exist_ok=True)
        link: ShapedLink | None = None
        if cfg.rate:
            link = ShapedLink(secrets.token_hex(3), parse_rate(cfg.rate))
            host, port = link.inner_ip, cfg.registry_port or 5000
        else:
            host, port = "127.0.0.1", cfg.registry_port or free_port()
        registry = f"{host}:{port}"
        info = StackInfo(
            root=str(root),
            containerd_socket=str(root / "containerd.sock"),
            containerd_config=str(root / "containerd" / "config.toml"),
            registry=registry,
            registry_url=f"http://{registry}",
            registry_storage=str(root / "registry"),
            sandbox_image=f"{registry}/bootseer/pause:v1",
            netns=link.ns if link else None,
            netns_id=link.ident if link else None,
            rate_bps=link.rate_bps if link else None,
        )
        st = cls(info)
        st.save()  # before anything starts, so `down` can clean up a crashed `up`
        try:
            if link:
                link.create()
            if cfg.sidecar and _importable("registry_sidecar.sidecar"):
                st._start_sidecar(cfg, link)
            st._start_registry(link, cfg.timeout)
            images.push_pause(registry, workdir=root)
            if cfg.snapshotter and _importable("snapshotter.server"):
                st._start_snapshotter(cfg)
            st._start_containerd(cfg)
        except BaseException:
            st.down(remove=False)
            raise
        return st

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = self.root / "logs" / f"{name}.log"
        self.info.logs[name] = str(log)
        with open(log, "ab") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        self.info.pids[name] = proc.pid
        self.save()
        return proc

    def _start_registry(self, link: ShapedLink | None, timeout: float) -> None:
        storage = Path(self.info.registry_storage)
        storage.mkdir(exist_ok=True)
        cfg = self.root / "registry.yml"
        doc: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(storage)}, "delete": {"enabled": True},
                        "maintenance": {"uploadpurging": {"enabled": False}}},
            "http": {"addr": self.info.registry, "secret": secrets.token_hex(16)},
        }
        if self.info.sidecar_url:  # every push is announced to the sidecar, which converts the image
            from registry_sidecar.sidecar import notifications_config

            # behind a shaped link the registry posts from its own namespace, off the sidecar's loopback: the
            # stack's token goes with every notification (as an operator's would)
            token = (self.root / "sidecar.token").read_text().strip()
            doc["notifications"] = notifications_config(self.info.sidecar_url, token=token)
        cfg.write_text(json.dumps(doc, indent=1))  # YAML is a superset of JSON
        argv = ["docker-registry", "serve", str(cfg)]
        if link:
            argv = link.exec_prefix() + argv
        proc = self._spawn("registry", argv)
        url = self.info.registry_url + "/v2/"
        wait_for("registry", lambda: requests.get(url, timeout=1).status_code == 200, timeout, proc,
                 Path(self.info.logs["registry"]))

    def _start_sidecar(self, cfg: StackConfig, link: ShapedLink | None) -> None:
        """The registry sidecar, before the registry (whose notifications point at it); mkfs runs niced."""
        host = link.host_ip if link else "127.0.0.1"
        listen = f"{host}:{free_port(host)}"
        self.info.sidecar_url = f"http://{listen}"
        conf = self.root / "sidecar.toml"
        token = self.root / "sidecar.token"
        token.write_text(secrets.token_hex(24) + "\n")
        token.chmod(0o600)
        key = self._signing_keys()[0]
        conf.write_text(f"listen = {json.dumps(listen)}\nregistry = {json.dumps(self.info.registry)}\n"
                        f"token_file = {json.dumps(str(token))}\nsigning_key = {json.dumps(str(key))}\n"
                        f"state_dir = {json.dumps(str(self.root / 'sidecar'))}\nplain_http = true\nnice = 10\n")
        proc = self._spawn("sidecar", [sys.executable, "-m", "registry_sidecar", "serve", "--config", str(conf)])
        url = self.info.sidecar_url + "/healthz"
        wait_for("sidecar", lambda: requests.get(url, timeout=1).status_code == 200, cfg.timeout, proc,
                 Path(self.info.logs["sidecar"]))

    def _signing_keys(self) -> tuple[Path, Path]:
        """The stack's own index-signing key pair (made once per stack): the sidecar signs with the private
        key, the snapshotter trusts the public one (trust mode "require", as production configs)."""
        from bootseer.trust import generate_keypair

        priv, pub = self.root / "index-signing.key", self.root / "index-signing.pub"
        if not (priv.exists() and pub.exists()):
            generate_keypair(priv, pub)
        self.info.signing_key = str(priv)  # `bootseer convert` signs with it by default while the stack is up
        return priv, pub

    def index_signer(self) -> Signer:
        """A signer with the stack's key: what tests that push their own indexes sign them with."""
        from bootseer.trust import Signer

        return Signer(self._signing_keys()[0])

    def _start_snapshotter(self, cfg: StackConfig) -> None:
        """BootSeer's snapshotter, before containerd (which connects to its socket as a proxy plugin)."""
        sock, sroot = self.root / "snapshotter.sock", self.root / "snapshotter"
        self.info.snapshotter_socket, self.info.snapshotter_root = str(sock), str(sroot)
        conf = self.root / "snapshotter.toml"
        text = f"root = {json.dumps(str(sroot))}\naddress = {json.dumps(str(sock))}\n"
        text += "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.snapshotter_config.items())
        metrics = f"127.0.0.1:{free_port()}"
        self.info.snapshotter_metrics = metrics
        text += f"metrics_address = {json.dumps(metrics)}\n"
        if cfg.lazy:
            control = self.root / "snapshotter.ctl"
            self.info.snapshotter_control = str(control)
            text += (f"remote_snapshots = true\ncontrol_address = {json.dumps(str(control))}\nplain_http = true\n"
                     f"hosts_dir = {json.dumps(str(self.root / 'containerd' / 'certs.d'))}\n")
            text += "[lazy]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.lazy_config.items())
            pub = self._signing_keys()[1]
            text += f"[trust]\nmode = \"require\"\nkeys = [{json.dumps(str(pub))}]\n"
        # the start-up event log (image_mount, prefetch) for `bootseer profile`; `bootseer stack env` points
        # BOOTSEER_EVENTS of a shell at the same file, so its pulls and profiles share it
        text += f"[events]\npath = {json.dumps(str(self.root / EVENTS_FILE))}\n"
        conf.write_text(text)
        proc = self._spawn("snapshotter", [sys.executable, "-m", "bootseer.cli", "snapshotter", "serve",
                                           "--config", str(conf)])

        def ready() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return True

        wait_for("snapshotter", ready, cfg.timeout, proc, Path(self.info.logs["snapshotter"]))

    def _start_containerd(self, cfg: StackConfig) -> None:
        cdir = self.root / "containerd"
        certs = cdir / "certs.d"
        (certs / self.info.registry).mkdir(parents=True, exist_ok=True)
        (certs / self.info.registry / "hosts.toml").write_text(containerd_config.hosts_toml(self.info.registry))
        for d in ("cni/bin", "cni/conf"):
            (cdir / d).mkdir(parents=True, exist_ok=True)
        conf = containerd_config.stack_config(
            cdir, Path(self.info.containerd_socket), self.info.sandbox_image, certs,
            Path(self.info.snapshotter_socket) if self.info.snapshotter_socket else None,
            Path(self.info.snapshotter_root) if self.info.snapshotter_root else None,
            cfg.cri_snapshotter,
        )
        Path(self.info.containerd_config).write_text(conf)
        proc = self._spawn("containerd", ["containerd", "--config", self.info.containerd_config])
        wait_for("containerd", self._containerd_ready, cfg.timeout, proc, Path(self.info.logs["containerd"]))

    def _containerd_ready(self) -> bool:
        out = subprocess.run(["ctr", "-a", self.info.containerd_socket, "version"],
                             capture_output=True, text=True, timeout=5)
        return out.returncode == 0 and "Server:" in out.stdout

    # --------------------------------------------------------------------------------------- helpers
    def restart_snapshotter(self, *, probe: bool = True) -> None:
        """Start the snapshotter again with the stack's config (after it was killed); wait until it serves and
        containerd's proxy connection is back (it backs off after the refusals while we were down, and its
        garbage collector's Removes would fail meanwhile, and not be retried).  ``probe=False``: only until it
        serves — the probe (a snapshot prepared and removed through containerd) has containerd collect this
        snapshotter soon after, which a test of what the daemon does on its own at start must not have."""
        from bootseer.control import Control

        conf = self.root / "snapshotter.toml"
        proc = self._spawn("snapshotter", [sys.executable, "-m", "bootseer.cli", "snapshotter", "serve",
                                           "--config", str(conf)])
        ctl = self.info.snapshotter_control

        def ready() -> bool:
            return bool(ctl) and Control(str(ctl), timeout=5).call("ping")["pid"] == proc.pid

        wait_for("snapshotter (restarted)", ready, 60, proc, Path(self.info.logs["snapshotter"]))
        if not probe:
            return
        key = "probe-" + secrets.token_hex(3)

        def reconnected() -> bool:  # a Prepare reaches the backend (a List only reads containerd's metadata)
            return self.ctr("snapshots", "--snapshotter", "bootseer", "prepare", key, check=False,
                            timeout=30).returncode == 0

        wait_for("containerd reconnecting to the snapshotter", reconnected, 60)
        self.ctr("snapshots", "--snapshotter", "bootseer", "rm", key)

    def ctr(self, *args: str, namespace: str = "default", check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this stack's containerd."""
        proc = subprocess.run(["ctr", "-a", self.info.containerd_socket, "-n", namespace, *args],
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise StackError(f"ctr {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def status(self) -> dict[str, Any]:
        doc = asdict(self.info)
        doc["running"] = {name: _alive(pid) for name, pid in self.info.pids.items()}
        return doc

    # ------------------------------------------------------------------------------------------ down
    def down(self, remove: bool = True) -> None:
        """Stop everything this stack started and remove what it made; safe to call repeatedly."""
        sock = self.info.containerd_socket
        if os.path.exists(sock) and self.info.pids.get("containerd") and _alive(self.info.pids["containerd"]):
            with contextlib.suppress(Exception):
                self._kill_tasks()
        marker = str(self.root)
        for _round in range(3):
            victims = [p for p in _pids_mentioning(marker) if p != os.getpid()]
            if self.info.netns:
                victims += ShapedLink(self.info.netns_id or "000000", 0).pids()
            if not victims:
                break
            _terminate(victims)
        unmount_below(self.root)
        detach_loops_below(self.root)
        if self.info.netns_id:
            ShapedLink(self.info.netns_id, 0).destroy()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.root / STATE_FILE).unlink()

    def _kill_tasks(self) -> None:
        """Kill containers through containerd first, so shims and runc clean up their own state."""
        for ns in self.ctr("namespaces", "ls", "-q", check=False, timeout=10).stdout.split():
            for line in self.ctr("tasks", "ls", namespace=ns, check=False, timeout=10).stdout.splitlines()[1:]:
                tid = line.split()[0]
                self.ctr("tasks", "kill", "-s", "SIGKILL", tid, namespace=ns, check=False, timeout=10)
                self.ctr("tasks", "delete", "-f", tid, namespace=ns, check=False, timeout=20)


def _toml_value(v: Any) -> str:
    """A TOML value for plain data (JSON's scalars are TOML's; tables become inline tables)."""
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not alive
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


def _pids_mentioning(marker: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and _alive(int(d.name)):
            out.append(int(d.name))
    return out


def _terminate(pids: list[int], grace: float = 10.0) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # wait for the killed ones too: a daemon killed inside a mount(2) (erofs over its own loop/FUSE file)
    # finishes that call before it dies, and a mount made after our unmount pass would outlive the stack
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:  # reap our own children
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def mounts_below(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp.startswith(prefix) or mp == str(root):
            out.append(mp)
    return out


def unmount_below(root: Path) -> None:
    """Unmount everything at or below ``root``, deepest first (lazily if busy)."""
    for _ in range(5):
        mps = sorted(set(mounts_below(root)), key=lambda m: m.count("/"), reverse=True)
        if not mps:
            return
        for mp in mps:
            if subprocess.run(["umount", mp], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", mp], capture_output=True)


def loops_below(root: Path) -> list[str]:
    out = subprocess.run(["losetup", "-J", "-l"], capture_output=True, text=True).stdout
    if not out.strip():
        return []
    prefix = str(root).rstrip("/") + "/"
    return [d["name"] for d in json.loads(out).get("loopdevices", [])
            if (d.get("back-file") or "").split(" (deleted)")[0].startswith(prefix)]


def detach_loops_below(root: Path) -> None:
    for dev in loops_below(root):
        subprocess.run(["losetup", "-d", dev], capture_output=True)


@contextlib.contextmanager
def running(cfg: StackConfig) -> Iterator[Stack]:
    """``with running(StackConfig(root=...)) as st:`` — the stack for the duration of a block."""
    st = Stack.up(cfg)
    try:
        yield st
    finally:
        st.down()


if __name__ == "__main__":  # pragma: no cover - debugging aid
    print(json.dumps(Stack.load(Path(sys.argv[1])).status(), indent=1))
