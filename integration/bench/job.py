"""Job-start benchmark: the whole start of a training job — image, dependencies, checkpoint, first step —
today's way, BootSeer's way and with everything local, on one stack and one stated network.

``bootseer bench job [--runs N] [--rates 1gbit,200mbit] [--modes …] [--json F] [--md F] [--png F]
[--layers N --d-model N …]`` (or ``python -m integration.bench.job``).  Needs root.

The network (what docs/job-start.md states):

* the registry **and the package index** (a PEP 503 simple index of real wheels, ``python3 -m http.server``)
  in one network namespace behind one ``tbf``-shaped veth: ``--rates`` (1 Gbit/s and 200 Mbit/s);
* the checkpoint store: nginx in a second namespace, every response paced by ``limit_rate``
  (``--per-conn-rate``, 50 MiB/s: one HDFS datanode stream), behind a veth shaped to ``--store-rate``
  (10 Gbit/s aggregate).  It serves the checkpoint file itself (today's single stream) and its striped
  ckptfs store (``--stripes``, ``--chunk-size``).

Modes, each one run of :mod:`integration.job.launch` (the recipe of docs/job-start.md, its exact commands):

* ``baseline``: ``ctr image pull`` of the base, ``pip install -r requirements.txt`` from the index at start,
  the checkpoint as one HTTP stream, the step.
* ``bootseer``: ``bootseer depsnap resolve`` (a hit: the snapshot built and recorded in the set-up, as CI
  does), ``bootseer ckptfs mount`` beside ``bootseer pull`` (hot blocks prefetched), the step on the mount.
* ``bootseer-unrecorded``: the same with a second snapshot of the same dependencies that has no hot-block
  manifest of its own (its base has one): a new depsnap image's first start before it is recorded.
* ``floor``: the snapshot image unpacked on the node, the checkpoint on local disk, page cache dropped.

Every run is cold: containerd and the snapshotter stopped, their state wiped, page cache dropped.  Each run's
``loss=`` line is checked against the loss measured when the checkpoint was made (and every run against the
others).  Phases come from the event log through ``bootseer profile``: the moments the image was ready, the
dependencies ready, torch and the dependencies imported in the container, the checkpoint loaded and the first
step done, plus the launcher's start before its first
line and the output after the step; they add up to the measured total (the launcher's start to its loss line).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from integration.bench.cpu import MachineCpu, cpu_table, median_split, trainer_phases
from integration.bench.jobcharts import write_png
from integration.bench.stats import ratio_spread, verdict

MODES = ("baseline", "bootseer", "bootseer-unrecorded", "floor")
DEFAULT_MODES = MODES
DEFAULT_RATES = ("1gbit", "200mbit")
NS = "bench-job"
# issue 19: BootSeer's whole start ≤ 0.25 of today's at 1 Gbit/s, ≤ 0.35 at 200 Mbit/s, ≤ 1.5× the floor at 1 Gbit/s
GOALS = {"job_vs_baseline_1g": 0.25, "job_vs_baseline_200m": 0.35, "job_vs_floor_1g": 1.5}
# the phases of a start, in the order of a job that reaches its milestones one after the other
PHASES = ("launcher", "dependencies_ready", "image_ready", "imports_done", "checkpoint_loaded", "first_step_done",
          "output")
LABELS = {"baseline": "today (pull + pip install + one-stream checkpoint)",
          "bootseer": "BootSeer (depsnap + lazy pull + prefetch + ckptfs)",
          "bootseer-unrecorded": "BootSeer, snapshot not yet recorded",
          "floor": "floor (all local, cold page cache)"}
JOB_DIR = Path(__file__).resolve().parent.parent / "job"
PROBE = ("import torch, numpy, six, idna, attrs, packaging, pyparsing, dateutil, pytz, certifi, charset_normalizer,"
         " urllib3, requests, jinja2, markupsafe, click; print('ready')")


# ----------------------------------------------------------------------------------------- pure parts
def milestones(profile: dict[str, Any]) -> dict[str, float]:
    """Seconds from the profile's t0 at which the job reached each milestone, from ``bootseer profile --json``:
    image ready (the last ``image_pull`` ended), dependencies ready (the install or the depsnap resolve ended),
    imports done (the container started, the interpreter imported torch and the dependencies), checkpoint loaded
    and first step done (the trainer's phases).  A milestone without a line (the floor pulls
    nothing) is absent."""
    ends: dict[str, float] = {}

    def last_end(pred: Any) -> float | None:
        xs = [e["offset_s"] + e["duration"] for e in profile.get("events", []) if pred(e)]
        return max(xs) if xs else None

    rules = {
        "image_ready": lambda e: e["phase"] == "image_pull",
        "dependencies_ready": lambda e: e["phase"] in ("dependency_install", "dependency_resolve"),
        "imports_done": lambda e: e["phase"] == "imports" and e["component"] == "trainer",
        "checkpoint_loaded": lambda e: e["phase"] == "checkpoint_load" and e["component"] == "trainer",
        "first_step_done": lambda e: e["phase"] == "first_step",
    }
    for name, pred in rules.items():
        v = last_end(pred)
        if v is not None:
            ends[name] = round(v, 6)
    return ends


def phases_of(marks: dict[str, float], launcher_s: float, total_s: float) -> dict[str, float]:
    """Contiguous phases that add up to ``total_s``: ``launcher`` (from the launch to the profile's t0), then
    from one milestone to the next in the order they were reached (each phase named by the milestone that ends
    it; a milestone reached before an earlier one costs 0), then ``output`` (the step's end to the loss line).
    Raises ValueError when the milestones do not fit in the total (a clock or log error)."""
    if "first_step_done" not in marks:
        raise ValueError("no first_step line in the job's profile")
    out = {p: 0.0 for p in PHASES}
    out["launcher"] = round(launcher_s, 6)
    prev = 0.0
    for name, t in sorted(marks.items(), key=lambda kv: kv[1]):
        out[name] = round(max(0.0, t - prev), 6)
        prev = max(prev, t)
    out["output"] = round(total_s - launcher_s - prev, 6)
    if out["output"] < -0.05 or launcher_s < -0.05:
        raise ValueError(f"phases exceed the measured total: launcher {launcher_s:.3f} s + milestones up to "
                         f"{prev:.3f} s > {total_s:.3f} s")
    return out


def rate_key(rate: str) -> str:
    from integration.bench.startup import rate_key as rk

    return rk(rate)


def parse_modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none given)'}: choose from {', '.join(MODES)}")
    return list(dict.fromkeys(modes))


def check_losses(runs: list[dict[str, Any]], expected: float | None, tol: float = 1e-3) -> list[str]:
    """Problems with the runs' loss lines: a run whose loss differs from the others' or from the loss measured
    when the checkpoint was made (relative ``tol``: another build of torch may round differently)."""
    bad = []
    losses = {r["loss"] for r in runs}
    if len(losses) > 1:
        bad.append(f"runs printed different losses: {sorted(losses)}")
    for r in runs:
        if expected is not None and abs(r["loss"] - expected) > tol * max(1.0, abs(expected)):
            bad.append(f"{r['mode']} at {r['rate']}: loss={r['loss']} but the checkpoint's next step gives {expected}")
    return bad


def summarize(runs: list[dict[str, Any]], rates: list[str], modes: list[str]) -> dict[str, Any]:
    """Medians (and min–max) of the total and of every phase per rate and mode; ratios and goals."""
    med: dict[str, dict[str, dict[str, Any]]] = {}
    for rate in rates:
        rk = rate_key(rate)
        for mode in modes:
            rs = [r for r in runs if r["rate"] == rate and r["mode"] == mode]
            if not rs:
                continue
            tot = [r["total_s"] for r in rs]
            ph = {p: round(statistics.median(r["phases"][p] for r in rs), 3) for p in PHASES}
            med.setdefault(rk, {})[mode] = {"total_s": round(statistics.median(tot), 3),
                                            "min_s": round(min(tot), 3), "max_s": round(max(tot), 3),
                                            "n": len(rs), "phases_s": ph, "cpu": median_split(rs)}
    ratios: dict[str, float] = {}
    for rk, m in med.items():
        job = m.get("bootseer")
        for ref, name in (("baseline", "baseline"), ("floor", "floor")):
            if job and m.get(ref) and m[ref]["total_s"]:
                ratios[f"job_vs_{name}_{rk}"] = round(job["total_s"] / m[ref]["total_s"], 4)
                for p in PHASES:
                    d = m[ref]["phases_s"][p]
                    if d > 0.05:  # a ratio to a phase of a few milliseconds says nothing
                        ratios[f"{p}_vs_{name}_{rk}"] = round(job["phases_s"][p] / d, 4)
        unrec = m.get("bootseer-unrecorded")
        if unrec and m.get("baseline"):
            ratios[f"unrecorded_vs_baseline_{rk}"] = round(unrec["total_s"] / m["baseline"]["total_s"], 4)
        if unrec and job:
            ratios[f"unrecorded_vs_job_{rk}"] = round(unrec["total_s"] / job["total_s"], 4)
    spreads = {}
    for rk in med:
        rate = next(r for r in rates if rate_key(r) == rk)
        for ref in ("baseline", "floor"):
            num, den = _totals(runs, rate, "bootseer"), _totals(runs, rate, ref)
            if num and den and min(t for _, t in den) > 0:
                paired = [r for r, _ in num] == [r for r, _ in den] and None not in [r for r, _ in num]
                spreads[f"job_vs_{ref}_{rk}"] = ratio_spread([t for _, t in num], [t for _, t in den], paired)
    goals = {}
    for k, b in GOALS.items():
        sp = spreads.get(k)
        v = verdict(sp, b)
        goals[k] = {"bound": b, "value": ratios.get(k), "verdict": v, "met": None if sp is None else v == "met",
                    "spread": sp.as_dict() if sp else None}
    return {"median": med, "ratios": ratios, "ratio_spreads": {k: sp.as_dict() for k, sp in spreads.items()},
            "goals": goals}


def _totals(runs: list[dict[str, Any]], rate: str, mode: str) -> list[tuple[int | None, float]]:
    """(round, total) of a mode's runs at a rate, in round order: rounds pair a mode's runs with another's."""
    rs = [(r.get("round"), r["total_s"]) for r in runs if r["rate"] == rate and r["mode"] == mode]
    return sorted(rs, key=lambda x: -1 if x[0] is None else x[0])


def misses(result: dict[str, Any]) -> list[str]:
    """For each goal not met: which phase of BootSeer's start holds the most time above the reference's."""
    out = []
    for k, g in result.get("goals", {}).items():
        if g.get("verdict", "not met" if g.get("met") is False else "met") not in ("not met", "inconclusive"):
            continue
        ref, rk = k.split("_vs_")[1].rsplit("_", 1)
        m = result["median"].get(rk, {})
        job, base = m.get("bootseer"), m.get(ref)
        if not job or not base:
            continue
        excess = {p: job["phases_s"][p] - (base["phases_s"][p] if ref == "floor" else 0.0) for p in PHASES}
        worst = max(excess, key=lambda p: excess[p])
        how = "misses" if g.get("verdict") != "inconclusive" else "may miss (its spread straddles)"
        out.append(f"`{k}` = {g['value']:.3f} {how} ≤ {g['bound']}: the largest part of BootSeer's start "
                   f"{'above the floor ' if ref == 'floor' else ''}is `{worst}` ({excess[worst]:.2f} s).")
    return out


def markdown(result: dict[str, Any]) -> str:
    out = [f"# Job-start benchmark: {result.get('model', {}).get('params', 0) / 1e6:.0f} M-parameter transformer, "
           f"{result.get('checkpoint_bytes', 0) / 2**30:.2f} GiB checkpoint", "",
           f"Produced by `{result.get('command_line', 'bootseer bench job')}`; {result.get('runs')} cold run(s) per "
           "mode and rate; seconds from the launcher's start to its `loss=` line: median (min–max).", ""]
    for rk, per in result.get("median", {}).items():
        out += [f"## Registry and package index at {rk}bit/s", "",
                "| mode | total s | " + " | ".join(PHASES) + " |", "|---|---:|" + "---:|" * len(PHASES)]
        for mode in MODES:
            m = per.get(mode)
            if not m:
                continue
            out.append(f"| {LABELS[mode]} | {m['total_s']:.2f} ({m['min_s']:.2f}–{m['max_s']:.2f}) | "
                       + " | ".join(f"{m['phases_s'][p]:.2f}" for p in PHASES) + " |")
        out.append("")
    out += ["| ratio | value | goal |", "|---|---:|---|"]
    goals = result.get("goals", {})
    sps = result.get("ratio_spreads", {})
    for k, v in sorted(result.get("ratios", {}).items()):
        g = goals.get(k)
        gtxt = f"≤ {g['bound']} ({g.get('verdict') or ('met' if g['met'] else 'not met')})" \
            if g and g.get("met") is not None else ""
        sp = sps.get(k)
        vtxt = f"{v:.3f} [{sp['min']:.3f}–{sp['max']:.3f}]" if sp and sp["n"] > 1 else f"{v:.3f}"
        out.append(f"| `{k}` | {vtxt} | {gtxt} |")
    out += cpu_table(result, MODES)
    for note in [*misses(result), *result.get("notes", [])]:
        out += ["", note]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------ the machine parts
def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _cli(*args: str, timeout: float = 1800, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"bootseer {shlex.join(args)} (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc


@dataclass
class Sizes:
    layers: int = 12
    d_model: int = 1024
    heads: int = 16
    ff: int = 4096
    vocab: int = 32000
    seq: int = 64
    batch: int = 2
    seed: int = 1234


def make_checkpoint(cache: Path, sizes: Sizes) -> dict[str, Any]:
    """The checkpoint (model + AdamW state) of these sizes, made once and kept in ``cache``."""
    # the checkpoint's bytes follow from the sizes, the model code and torch's version
    key = hashlib.sha256(json.dumps([asdict(sizes), hashlib.sha256((JOB_DIR / "train.py").read_bytes()).hexdigest(),
                                     _torch_version()]).encode()).hexdigest()[:12]
    d = cache / f"ckpt-{key}"  # model.pt only: the directory is what `ckptfs put` stores
    meta = cache / f"ckpt-{key}.json"
    if not meta.exists():
        _log(f"making the checkpoint ({sizes}) ...")
        tmp = cache / f"ckpt-{key}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        args = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(sizes).items()]
        out = subprocess.run([sys.executable, str(JOB_DIR / "train.py"), "make", str(tmp / "model.pt"), *args],
                             check=True, capture_output=True, text=True).stdout
        doc = json.loads(out.strip().splitlines()[-1])
        doc["path"] = str(d / "model.pt")
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
        meta.write_text(json.dumps(doc))
    return dict(json.loads(meta.read_text()))


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def write_simple_index(wheels: Path, names: list[str], dest: Path) -> None:
    """A PEP 503 simple index of ``wheels`` (only the distributions in ``names``) under ``dest``."""
    import re

    def norm(n: str) -> str:
        return re.sub(r"[-_.]+", "-", n).lower()

    want = {norm(n.split("==")[0]) for n in names}
    files = dest / "files"
    files.mkdir(parents=True, exist_ok=True)
    by: dict[str, list[str]] = {}
    for whl in sorted(wheels.glob("*.whl")):
        dist = norm(whl.name.split("-")[0])
        if dist in want:
            shutil.copy2(whl, files / whl.name)
            sha = hashlib.sha256(whl.read_bytes()).hexdigest()
            by.setdefault(dist, []).append(f'<a href="../../files/{whl.name}#sha256={sha}">{whl.name}</a><br>')
    lacking = want - set(by)
    if lacking:
        raise RuntimeError(f"no wheel for {', '.join(sorted(lacking))} in {wheels}")
    simple = dest / "simple"
    for dist, links in by.items():
        (simple / dist).mkdir(parents=True, exist_ok=True)
        page = "<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n"
        (simple / dist / "index.html").write_text(page)
    (simple / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "".join(
        f'<a href="{d}/">{d}</a><br>\n' for d in sorted(by)) + "</body></html>\n")


# workers as root: the store's files may sit below a 0700 directory (a test's tmp dir)
NGINX_CONF = """
user root;
worker_processes 2;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    sendfile_max_chunk 256k;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {root}/tmp;
    proxy_temp_path {root}/tmp;
    fastcgi_temp_path {root}/tmp;
    uwsgi_temp_path {root}/tmp;
    scgi_temp_path {root}/tmp;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {host}:{port};
        root {docroot};
        limit_rate {rate};
        limit_rate_after 0;
    }}
}}
"""


def _wait_port(host: str, port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    from integration.stack import wait_for

    def up() -> bool:
        socket.create_connection((host, port), timeout=0.5).close()
        return True

    wait_for(what, up, timeout, proc)


@contextlib.contextmanager
def serving(argv: list[str], host: str, port: int, what: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_port(host, port, proc, what)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT if "nginx" in " ".join(argv) else signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Env:
    """What the runs need: the stack's bench helper, image refs, URLs, paths."""

    bench: Any
    root: Path
    base: str = ""
    snap: dict[str, str] = field(default_factory=dict)  # repo kind → snapshot image
    index_url: str = ""
    store_http: str = ""
    ckpt: dict[str, Any] = field(default_factory=dict)
    pip_dir: Path = Path()


def launch_args(env: Env, mode: str, job_id: str, events: Path) -> list[str]:
    """The launcher's command line for ``mode`` (the recipe of docs/job-start.md)."""
    st = env.bench.st
    common = ["--job-id", job_id, "--events", str(events), "--address", st.info.containerd_socket,
              "--namespace", NS, "--plain-http", "--wheels", str(env.pip_dir), "--job-dir", str(JOB_DIR),
              "--bootseer", f"{sys.executable} -m bootseer.cli"]
    if mode == "baseline":
        return ["baseline", "--image", env.base, "--index-url", env.index_url,
                "--ckpt-url", f"{env.store_http}/raw/model.pt", *common]
    if mode == "floor":
        return ["floor", "--image", env.snap["recorded"], "--ckpt-dir", str(Path(env.ckpt["path"]).parent), *common]
    repo = env.snap["recorded" if mode == "bootseer" else "unrecorded"].rsplit(":", 1)[0]
    return ["bootseer", "--image", env.base, "--deps-repo", repo, "--index-url", env.index_url,
            "--store", f"{env.store_http}/striped", "--mountpoint", str(env.root / "ckpt-mnt"),
            "--control", st.info.snapshotter_control or "", *common]


def run_once(env: Env, mode: str, rate: str, n: int) -> dict[str, Any]:
    b = env.bench
    job_id = f"job-{mode}-{rate_key(rate)}-{n}-{secrets.token_hex(2)}"
    events_dir = env.root / "events"
    events_dir.mkdir(exist_ok=True)
    events = events_dir / f"{job_id}.jsonl"
    # one log per run for the whole start-up: the snapshotter, restarted by the reset, inherits it
    os.environ["BOOTSEER_EVENTS"] = str(events)
    b.reset()
    if mode == "floor":  # not timed: the floor starts with the image unpacked on the node
        b.st.ctr("image", "pull", "--plain-http", env.snap["recorded"], namespace=NS, timeout=900)
        b.reset(wipe=False)
    argv = [sys.executable, str(JOB_DIR / "launch.py"), *launch_args(env, mode, job_id, events)]
    rx0 = b.link_rx()
    errlog = events_dir / f"{job_id}.stderr"
    t0 = time.monotonic()
    with open(errlog, "w") as errfh, MachineCpu() as cpu:  # a file, not a pipe: warnings must not fill a pipe
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errfh, text=True,
                                env={**os.environ, "BOOTSEER_HOSTS_DIR": str(b.cdir / "certs.d")})
        assert proc.stdout is not None
        loss_line, t_loss = None, 0.0
        for line in proc.stdout:
            if line.startswith("loss="):
                loss_line, t_loss = line.strip(), time.monotonic()
                break
    rx = b.link_rx() - rx0
    rest = proc.stdout.read()
    rc = proc.wait(timeout=600)
    err = errlog.read_text(errors="replace")
    if rc != 0 or loss_line is None:
        raise RuntimeError(f"{mode}: launcher exit {rc}, loss line {loss_line!r}; stdout {rest[-1000:]!r}; "
                           f"stderr {err.strip()[-3000:]}")
    total = t_loss - t0
    prof = json.loads(_cli("profile", "--events", str(events), "--job", job_id, "--json").stdout)
    start_mono = min(json.loads(ln)["start_mono"] for ln in events.read_text().splitlines()
                     if '"job_start"' in ln and job_id in ln)
    marks = milestones(prof)
    phases = phases_of(marks, start_mono - t0, total)
    busy = {p["phase"]: p["busy_s"] for p in prof.get("phases", [])}
    return {"mode": mode, "rate": rate, "round": n, "job": job_id, "total_s": round(total, 3),
            "loss": float(loss_line[5:]),
            "phases": phases, "milestones": marks, "busy_s": busy, "registry_link_bytes": rx,
            "cpu": trainer_phases(events, job_id, cpu), "events": str(events)}


def setup(env: Env, args: argparse.Namespace, sizes: Sizes) -> None:
    from integration import images

    b, root = env.bench, env.root
    reg = b.st.info.registry
    env.base = images.push_realistic(reg)
    # the indexes convert and depsnap push are signed with the stack's key: its snapshotter requires that
    hosts = {"BOOTSEER_HOSTS_DIR": str(b.cdir / "certs.d"), "BOOTSEER_SIGNING_KEY": str(b.st.info.signing_key)}
    _log(f"indexing the base {env.base} (bootseer convert) ...")
    _cli("convert", "--plain-http", "--state-dir", str(root / "convert-state"), env.base, env=hosts)
    modes = set(args.modes_list)
    if "bootseer-unrecorded" in modes:
        _log("recording the base's hot blocks (bootseer record, fresh node) ...")
        b.reset()
        _cli("record", env.base, "--address", b.st.info.containerd_socket, "--control",
             b.st.info.snapshotter_control, "--plain-http", "--json", "--", *images.REALISTIC_CMD, env=hosts)
    from integration.job.launch import install_command

    install = install_command(env.index_url)
    kinds = [k for k, need in (("recorded", bool(modes & {"bootseer", "floor"})),
                               ("unrecorded", "bootseer-unrecorded" in modes)) if need]
    for kind in kinds:
        repo = f"{reg}/bootseer/train-deps" + ("" if kind == "recorded" else "-new")
        _log(f"CI: depsnap build → {repo} (pip from the index over the shaped link) ...")
        b.reset()
        out = _cli("depsnap", "build", "--base", env.base, "--push", repo, "-r", str(JOB_DIR / "requirements.txt"),
                   "--run", install, "--wheels", str(env.pip_dir), "--network", "host", "--address",
                   b.st.info.containerd_socket, "--namespace", NS + "-build", "--plain-http", "--json",
                   env=hosts).stdout
        env.snap[kind] = json.loads(out)["image"]
        if kind == "recorded":
            # record on fresh mounts: after the build the base's layers are mounted and local on this node,
            # which `bootseer record` refuses (their reads would not reach FUSE); a wiped node is a fresh one
            b.reset()
            _log(f"CI: bootseer record {env.snap[kind]} ...")
            _cli("record", env.snap[kind], "--address", b.st.info.containerd_socket, "--control",
                 b.st.info.snapshotter_control, "--plain-http", "--ready-line", "^ready$", "--json", "--",
                 "python3", "-c", PROBE, env=hosts)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from integration.bench.ckpt import nginx_binary
    from integration.bench.depsnap import PACKAGES, fetch_wheels
    from integration.bench.startup import Bench
    from integration.netns import ShapedLink, parse_rate
    from integration.stack import StackConfig, free_port, running

    sizes = Sizes(**{k: getattr(args, k) for k in asdict(Sizes())})
    rates = [r.strip() for r in args.rates.split(",") if r.strip()]
    for r in rates:
        rate_key(r)  # a bad rate fails here, before anything starts
    root = args.root or Path("/tmp") / f"bs-job-{secrets.token_hex(3)}"
    root.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    ckpt = make_checkpoint(cache, sizes)
    _log(f"checkpoint: {ckpt['params'] / 1e6:.0f} M parameters, {ckpt['bytes'] / 2**30:.2f} GiB")
    wheels = fetch_wheels(Path(args.wheel_cache))
    pip_dir = root / "pip"
    pip_dir.mkdir()
    from integration.job.launch import PIP_WHEEL

    shutil.copy2(wheels / PIP_WHEEL, pip_dir / PIP_WHEEL)
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    notes: list[str] = []
    store = ShapedLink(secrets.token_hex(3), parse_rate(args.store_rate))
    cfg = StackConfig(root=root / "stack", rate=rates[0], sidecar=False)
    try:
        store.create()
        with contextlib.ExitStack() as es:
            st = es.enter_context(running(cfg))
            bench = Bench(st, cfg, [], None, _log)
            env = Env(bench, root, pip_dir=pip_dir, ckpt=ckpt)
            # package index behind the registry's link
            write_simple_index(wheels, PACKAGES, root / "index")
            reg_ns = ShapedLink(st.info.netns_id or "", 0)
            iport = free_port()
            es.enter_context(serving([*reg_ns.exec_prefix(), sys.executable, "-m", "http.server", str(iport),
                                      "--bind", reg_ns.inner_ip, "--directory", str(root / "index")],
                                     reg_ns.inner_ip, iport, "package index", root / "index.log"))
            env.index_url = f"http://{reg_ns.inner_ip}:{iport}/simple/"
            # checkpoint store: the file (one stream) and its striped store, nginx pacing every connection
            www = root / "www"
            (www / "raw").mkdir(parents=True)
            os.link(ckpt["path"], www / "raw" / "model.pt")
            _cli("ckptfs", "put", str(Path(ckpt["path"]).parent), f"file://{www / 'striped'}", "--stripes",
                 str(args.stripes), "--chunk-size", args.chunk_size)
            nroot = root / "nginx"
            (nroot / "tmp").mkdir(parents=True)
            sport = 8080
            (nroot / "nginx.conf").write_text(NGINX_CONF.format(root=nroot, docroot=www, rate=args.per_conn_rate,
                                                               host=store.inner_ip, port=sport))
            es.enter_context(serving([*store.exec_prefix(), nginx_binary(), "-c", str(nroot / "nginx.conf"), "-p",
                                      str(nroot)], store.inner_ip, sport, "checkpoint store", root / "nginx.log"))
            env.store_http = f"http://{store.inner_ip}:{sport}"
            setup(env, args, sizes)
            for rate in rates:
                reg_ns.set_rate(parse_rate(rate))
                for i in range(args.runs):
                    order = args.modes_list[i % len(args.modes_list):] + args.modes_list[:i % len(args.modes_list)]
                    for mode in order:
                        r = run_once(env, mode, rate, i)
                        runs.append(r)
                        _log(f"{rate} run {i + 1}/{args.runs} {mode:20s} {r['total_s']:7.2f} s  "
                             + " ".join(f"{p} {r['phases'][p]:.2f}" for p in PHASES) + f"  {r['loss']:.6f}")
                    write_outputs(result(runs, rates, args, ckpt, sizes, t_start, notes, partial=True), args)
    finally:
        store.destroy()
        for big in ("www", "index", "pip", "convert-state"):  # GBs; the event logs (small) stay for the charts
            shutil.rmtree(root / big, ignore_errors=True)
    bad = check_losses(runs, ckpt.get("expected_loss"))
    if bad:
        raise RuntimeError("loss check failed: " + "; ".join(bad))
    return result(runs, rates, args, ckpt, sizes, t_start, notes, partial=False)


def result(runs: list[dict[str, Any]], rates: list[str], args: argparse.Namespace, ckpt: dict[str, Any],
           sizes: Sizes, t_start: float, notes: list[str], partial: bool) -> dict[str, Any]:
    out = {"benchmark": "job", "rates": rates, "modes": args.modes_list, "runs": args.runs, "partial": partial,
           "model": {**asdict(sizes), "params": ckpt["params"]}, "checkpoint_bytes": ckpt["bytes"],
           "expected_loss": ckpt.get("expected_loss"),
           "network": {"registry_and_index": rates, "store_per_connection": args.per_conn_rate,
                       "store_aggregate": args.store_rate, "stripes": args.stripes, "chunk_size": args.chunk_size},
           **summarize(runs, rates, args.modes_list), "all_runs": runs,
           "cores": os.cpu_count(), "wall_seconds": round(time.time() - t_start, 1),
           "notes": list(notes)}
    for r in runs:
        r["loss_ok"] = not check_losses([r], ckpt.get("expected_loss"))
    return out


def write_outputs(res: dict[str, Any], args: argparse.Namespace) -> None:
    if getattr(args, "command_line", None):
        res["command_line"] = args.command_line
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(res, indent=1) + "\n")
    if args.md_path:
        Path(args.md_path).write_text(markdown(res))
    if args.png_path and res.get("median"):
        write_png(res, Path(args.png_path), PHASES)
        if not res.get("partial"):
            gantt_charts(res, Path(args.png_path))


def gantt_charts(res: dict[str, Any], png: Path) -> None:
    """``bootseer profile --png`` of the first rate's last baseline and BootSeer runs, beside ``png``
    (``NAME-baseline.png``, ``NAME-bootseer.png``), with their event logs (``.jsonl``) for the record."""
    rate = res["rates"][0]
    for mode in ("baseline", "bootseer"):
        rs = [r for r in res.get("all_runs", []) if r["mode"] == mode and r["rate"] == rate]
        if not rs:
            continue
        stem = png.with_name(f"{png.stem}-{mode}")
        try:
            _cli("profile", "--events", rs[-1]["events"], "--job", rs[-1]["job"], "--png", str(stem) + ".png")
            shutil.copyfile(rs[-1]["events"], str(stem) + ".jsonl")
        except (RuntimeError, OSError) as e:  # a chart is extra: the figures are written already
            _log(f"no Gantt chart for {mode}: {e}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bootseer bench job", description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="cold runs per mode and rate (median; ≥ 5 for quoted results)")
    p.add_argument("--rates", default=",".join(DEFAULT_RATES), help="registry + package index link rates")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"subset of {','.join(MODES)}")
    p.add_argument("--json", dest="json_path")
    p.add_argument("--md", dest="md_path")
    p.add_argument("--png", dest="png_path")
    p.add_argument("--per-conn-rate", default="50m", help="checkpoint store: nginx limit_rate per connection")
    p.add_argument("--store-rate", default="10gbit", help="checkpoint store: aggregate link rate")
    p.add_argument("--stripes", type=int, default=16)
    p.add_argument("--chunk-size", default="8MiB")
    for k, v in asdict(Sizes()).items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=v, help="model size" if k != "seed" else None)
    p.add_argument("--root", type=Path, default=None)
    p.add_argument("--cache", default="/var/cache/bootseer/job", help="where checkpoints are kept")
    p.add_argument("--wheel-cache", default=os.environ.get("BOOTSEER_WHEEL_CACHE", "/var/cache/bootseer/wheels"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.modes_list = parse_modes(args.modes)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: the job benchmark needs root (network namespaces, mounts, drop_caches)", file=sys.stderr)
        return 2
    if args.runs < 1:
        print("error: --runs must be at least 1", file=sys.stderr)
        return 2
    args.command_line = "bootseer bench job " + shlex.join(argv if argv is not None else sys.argv[1:])
    res = run(args)
    write_outputs(res, args)
    for rk, per in res["median"].items():
        print(f"at {rk}: " + ", ".join(f"{mode} {m['total_s']:.2f} s" for mode, m in per.items()))
    for k, v in sorted(res["ratios"].items()):
        g = res["goals"].get(k)
        print(f"  {k} = {v:.3f}" + (f"  (goal ≤ {g['bound']}: {g['verdict']})" if g else ""))
    for m in misses(res):
        print("  " + m)
    return 0


if __name__ == "__main__":
    sys.exit(main())
