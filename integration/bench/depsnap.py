"""depsnap benchmark: time until a job's environment is ready, with a dependency snapshot hit vs running
the install at job start.

``bootseer bench depsnap [--json FILE] [--md FILE] [--runs N] [--rate 1gbit]`` (or
``python -m integration.bench.depsnap``); ``--render FILE.json --md FILE`` redraws the table of an earlier run.

Set-up, all local: a stack (containerd + BootSeer's snapshotter; docker-registry in a network namespace behind a
``tbf``-shaped veth, as ``bench startup``, so a pull pays for a real link; no sidecar, whose conversions would load
the CPU during the runs), the realistic base image (Debian + python3 + numpy + torch) and a package index of
real wheels — numpy plus 14 pure-Python packages, downloaded once into the wheel cache — mounted into the
install container (no network).  Snapshots are built with depsnap's containerd engine and indexed by depsnap
itself (only the new layer is converted; the base's EROFS blobs are reused).

Each round builds a snapshot of its own (one marker file more, so another layer digest): no round finds an
earlier round's layer anywhere.  Node state at the start of every run: the base image is present in containerd
(nodes keep their base images), the snapshot image is not — removed from containerd and garbage-collected, its
lazy chunks dropped — and the page cache is dropped (the base's files, the wheels and the registry's blobs are
read from disk: every run is cold).  Modes, each ending when ``python3 -c "import numpy, requests, …"`` inside
the container has printed ``ready``:

* ``install``: run the install command in a container from the base, then import — what a job does today.
* ``hit_lazy``: ``bootseer pull`` of the snapshot image into BootSeer's snapshotter (its new layer mounted
  lazily from its EROFS blob), run, import.
* ``hit``: pull the snapshot image with ``ctr image pull`` (containerd's overlayfs path: only its one new
  layer travels, gunzipped and unpacked in full), run, import.
* ``floor``: the snapshot image already unpacked on the node (pulled untimed, then the page cache dropped):
  run, import — the part every mode shares (container start, interpreter start, the imports themselves).

The modes' order rotates from round to round, so no mode always follows another (the old fixed order ran the
floor right after a full pull of the same image, on a warm page cache).  JSON: ``runs`` (seconds per mode, in
round order), ``rounds`` (each run with its round and position), ``run_counts`` (what was measured; ``runs_asked``
is what was asked), ``seconds`` (median, min, max, n per mode), ``ratios`` with ``ratio_spreads`` (the ratio of
the medians; min–max of the per-round ratios), ``goal`` with its verdict (met, not met, or inconclusive when
the per-round spread straddles the bound: :mod:`integration.bench.stats`).  ``ratios.hit_vs_install`` is the
lazy hit when measured, else the full-pull hit (``hit_mode`` says which); ``prep_*`` compare only the part above
the floor, i.e. what getting the dependencies in place costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from integration.bench.stats import Spread, ratio_spread, spread, verdict

PACKAGES = ["numpy==2.2.6", "six==1.17.0", "idna==3.10", "attrs==25.3.0", "packaging==25.0", "pyparsing==3.2.3",
            "python-dateutil==2.9.0.post0", "pytz==2025.2", "certifi==2025.4.26", "charset-normalizer==3.4.2",
            "urllib3==2.4.0", "requests==2.32.3", "jinja2==3.1.6", "markupsafe==3.0.2", "click==8.2.1"]
IMPORTS = "numpy, six, idna, attrs, packaging, pyparsing, dateutil, pytz, certifi, charset_normalizer, urllib3, " \
          "requests, jinja2, markupsafe, click"
PIP_WHEEL = "pip==24.3.1"
GOAL = 0.05
NS = "bench-depsnap"
MODES = ("install", "hit_lazy", "hit", "floor")
LABELS = {"install": "install at start", "hit_lazy": "**snapshot hit, lazy**", "hit": "snapshot hit, full pull",
          "floor": "floor"}
WHAT = {"install": "`pip install -r requirements.txt` (15 wheels from a local dir) in a container from the base, "
                   "then import",
        "hit_lazy": "`bootseer pull` of the snapshot (its new layer mounted lazily from its EROFS blob), run, import",
        "hit": "`ctr image pull` of the snapshot (only its new layer travels, gunzipped and unpacked), run, import",
        "floor": "the snapshot image already unpacked on the node: run, import"}
MD_BEGIN = "<!-- depsnap.json table: `bootseer bench depsnap --render docs/bench/depsnap.json --md -` -->"
MD_END = "<!-- end of depsnap.json table -->"


def fetch_wheels(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / ("bench-" + hashlib.sha256(" ".join([PIP_WHEEL, *PACKAGES]).encode()).hexdigest()[:12] + ".ok")
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(cache),
                        PIP_WHEEL, *PACKAGES], check=True)
        stamp.write_text("ok")
    return cache


def rotation(modes: list[str], i: int) -> list[str]:
    """Round ``i``'s order: the modes rotated by ``i``, so each mode runs first, second, … in turn."""
    k = i % len(modes)
    return modes[k:] + modes[:k]


# ------------------------------------------------------------------------------------------ summary
def summarize(rounds: list[dict[str, Any]], asked: int, modes: list[str]) -> dict[str, Any]:
    """Medians with their spread, per-round ratios and the goal's verdict from ``rounds`` (one dict per run:
    mode, round, seconds).  Pure: the unit tests feed it made-up rounds."""
    per_mode: dict[str, dict[int, float]] = {m: {} for m in modes}
    for r in rounds:
        per_mode.setdefault(r["mode"], {})[int(r["round"])] = float(r["seconds"])
    measured = [m for m in modes if per_mode.get(m)]
    seconds = {m: spread(list(per_mode[m].values())) for m in measured}
    out: dict[str, Any] = {
        "runs_asked": asked,
        "run_counts": {m: len(per_mode.get(m, {})) for m in modes},
        "runs": {m: [per_mode[m][i] for i in sorted(per_mode[m])] for m in measured},
        "seconds": {m: s.as_dict(3) for m, s in seconds.items()},
        "median_seconds": {m: round(s.median, 3) for m, s in seconds.items()},
    }

    def paired(a: str, b: str) -> tuple[list[float], list[float]]:
        common = sorted(set(per_mode.get(a, {})) & set(per_mode.get(b, {})))
        return [per_mode[a][i] for i in common], [per_mode[b][i] for i in common]

    spreads: dict[str, Spread] = {}
    for m in ("hit_lazy", "hit", "floor"):
        num, den = paired(m, "install")
        if num:
            spreads[f"{'hit_full' if m == 'hit' else m}_vs_install"] = ratio_spread(num, den)
    if "floor" in measured and "install" in measured:
        for m in ("hit_lazy", "hit"):
            common = sorted(set(per_mode.get(m, {})) & set(per_mode["floor"]) & set(per_mode["install"]))
            above = [per_mode["install"][i] - per_mode["floor"][i] for i in common]
            if common and min(above, default=0) > 0:
                spreads[f"prep_{m}_vs_install"] = ratio_spread(
                    [max(per_mode[m][i] - per_mode["floor"][i], 0.0) for i in common], above)
    num, den = paired("hit_lazy", "hit")
    if num:  # the two ways of getting the same layer onto the node, round by round
        spreads["hit_lazy_vs_hit_full"] = ratio_spread(num, den)
    hit_mode = "hit_lazy" if "hit_lazy_vs_install" in spreads else "hit"
    head = spreads.get("hit_lazy_vs_install") or spreads.get("hit_full_vs_install")
    if head is not None:
        spreads = {"hit_vs_install": head, **spreads}
    out["hit_mode"] = hit_mode
    out["ratios"] = {k: round(s.median, 4) for k, s in spreads.items()}
    out["ratio_spreads"] = {k: s.as_dict() for k, s in spreads.items()}
    out["goal"] = {"ratio": "hit_vs_install", "op": "<=", "bound": GOAL, "verdict": verdict(head, GOAL),
                   "spread": head.as_dict() if head else None}
    return out


def render_md(result: dict[str, Any]) -> str:
    """The results table of a run, between markers, as ``docs/bench/depsnap.md`` carries it (a unit test
    checks the committed doc against the committed JSON)."""
    sec, ratios = result["seconds"], result["ratio_spreads"]

    def fmt(d: dict[str, Any], f: str) -> str:
        s = Spread(d["median"], d["min"], d["max"], d["n"])
        return s.text(f)

    rows = [MD_BEGIN, "",
            f"Registry link {result.get('rate', '?')}; every run cold (page cache dropped, snapshot image removed); "
            f"mode order rotated per round; runs measured: "
            + ", ".join(f"{m} {n}" for m, n in result["run_counts"].items()) + f" (of {result['runs_asked']} asked).",
            "", "| mode | what runs | median s [min–max] | n | of install: median [min–max of rounds] |",
            "|---|---|---:|---:|---:|"]
    key = {"install": None, "hit_lazy": "hit_lazy_vs_install", "hit": "hit_full_vs_install",
           "floor": "floor_vs_install"}
    for m in MODES:
        if m not in sec:
            continue
        k = key[m]
        rel = "1" if k is None else (fmt(ratios[k], ".3f") if k in ratios else "—")
        rows.append(f"| {LABELS[m]} | {WHAT[m]} | {fmt(sec[m], '.2f')} | {sec[m]['n']} | {rel} |")
    rows.append("")
    for k, what in (("prep_hit_lazy_vs_install", "above the floor"), ("prep_hit_vs_install", "above the floor"),
                    ("hit_lazy_vs_hit_full", "lazy hit against full-pull hit, same layer")):
        if k in ratios:
            rows.append(f"- `{k}` ({what}): {fmt(ratios[k], '.3f')}")
    g = result["goal"]
    rows.append(f"- goal `{g['ratio']}` {g['op']} {g['bound']} ({result['hit_mode']}): **{g['verdict']}**")
    rows += ["", MD_END]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------- runs
def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    from bootseer.testkit import drop_caches
    from depsnap import engine_containerd, image, index
    from depsnap.key import DepSpec
    from integration import images
    from integration.stack import StackConfig, running

    wheels = fetch_wheels(Path(args.wheel_cache))
    pip = next(wheels.glob("pip-*.whl")).name
    root = Path(f"/tmp/bs-bd-{secrets.token_hex(3)}")
    ctx = root.with_name(root.name + "-ctx")
    ctx.mkdir(parents=True)
    (ctx / "requirements.txt").write_text("\n".join(PACKAGES) + "\n")
    install = (f"python3 /wheels/{pip}/pip install -q --no-index --find-links /wheels --break-system-packages "
               "-r requirements.txt")
    probe = f"import {IMPORTS}; print('ready')"
    modes = [m for m in MODES if not (m == "hit_lazy" and args.no_lazy)]
    extra: dict[str, Any] = {"packages": PACKAGES, "rate": args.rate, "notes": [], "build_seconds": [],
                             "index_seconds": [], "pull_seconds": {"hit": [], "hit_lazy": []}, "cold": True}
    if args.no_lazy:
        extra["notes"].append("hit_lazy not measured (--no-lazy)")
    rounds: list[dict[str, Any]] = []
    t_start = time.time()
    try:
        # no sidecar: its conversions would load the CPU during the runs; depsnap indexes what it needs itself
        with running(StackConfig(root=root, sidecar=False, rate=args.rate)) as st:
            plain = True
            signer = st.index_signer()  # the stack's snapshotter requires signed indexes, as production nodes
            base = images.push_realistic(st.info.registry)
            digest = image.exists(base, plain_http=plain) or ""
            if "hit_lazy" in modes:  # the base's EROFS blobs, once (a cluster's sidecar has them long before)
                t0 = time.monotonic()
                index.ensure_indexed(base, digest, None, plain_http=plain, signer=signer)
                extra["base_index_seconds"] = round(time.monotonic() - t0, 2)
            # node state: the base unpacked in both snapshotters
            st.ctr("image", "pull", "--plain-http", base, namespace=NS, timeout=900)
            st.ctr("image", "pull", "--plain-http", "--snapshotter", "bootseer", base, namespace=NS, timeout=900)
            mounts = ("--mount", f"type=bind,src={wheels},dst=/wheels,options=rbind:ro",
                      "--mount", f"type=bind,src={ctx},dst=/depsnap,options=rbind:ro", "--cwd", "/depsnap")
            control = st.info.snapshotter_control

            def ctr_run(img: str, name: str, *cmd: str, opts: tuple[str, ...] = ()) -> None:
                r = st.ctr("run", "--rm", *opts, img, name, *cmd, namespace=NS, timeout=1800)
                assert r.stdout.strip().endswith("ready"), r.stdout + r.stderr

            def cold(ref: str) -> None:
                """The snapshot image off the node (containerd's record, content and snapshots, BootSeer's lazy
                chunks), then the page cache dropped: the state every run starts from."""
                st.ctr("image", "rm", "--sync", ref, namespace=NS, check=False)
                if control:
                    drop = subprocess.run([sys.executable, "-m", "bootseer.cli", "cache", "drop", "--all",
                                           "--control", control], capture_output=True, text=True, timeout=120)
                    if drop.returncode != 0:  # the run is then less cold than claimed: say so in the result
                        extra["notes"].append(f"bootseer cache drop --all failed: {drop.stderr.strip()[-300:]}")
                if not drop_caches():
                    raise RuntimeError("cannot drop the page cache (not root?): the runs would not be cold")

            def one(mode: str, ref: str, i: int) -> float:
                cold(ref)
                if mode == "install":
                    t0 = time.monotonic()
                    ctr_run(base, f"bi-{i}", "sh", "-c", f"{install} && python3 -c \"{probe}\"", opts=mounts)
                    return time.monotonic() - t0
                if mode == "hit_lazy":
                    t0 = time.monotonic()
                    extra["pull_seconds"]["hit_lazy"].append(_lazy_pull(st.info.containerd_socket, ref))
                    ctr_run(ref, f"bl-{i}", "python3", "-c", probe, opts=("--snapshotter", "bootseer"))
                    return time.monotonic() - t0
                if mode == "hit":
                    t0 = time.monotonic()
                    st.ctr("image", "pull", "--plain-http", ref, namespace=NS, timeout=900)
                    extra["pull_seconds"]["hit"].append(round(time.monotonic() - t0, 3))
                    ctr_run(ref, f"bh-{i}", "python3", "-c", probe)
                    return time.monotonic() - t0
                st.ctr("image", "pull", "--plain-http", ref, namespace=NS, timeout=900)  # floor: untimed pull
                if not drop_caches():
                    raise RuntimeError("cannot drop the page cache")
                t0 = time.monotonic()
                ctr_run(ref, f"bf-{i}", "python3", "-c", probe)
                return time.monotonic() - t0

            for i in range(args.runs):
                # a snapshot of its own per round (one marker file more: another layer digest)
                spec = DepSpec(digest, requirements=[ctx / "requirements.txt"],
                               command=f"{install} && echo {i} {secrets.token_hex(4)} > /etc/depsnap-bench-run")
                t0 = time.monotonic()
                res = engine_containerd.build_containerd(st.info.containerd_socket, base, spec,
                                                         f"{st.info.registry}/bootseer/depsnap-bench", ctx, wheels,
                                                         plain_http=plain, namespace=NS + "-build")
                extra["build_seconds"].append(round(time.monotonic() - t0, 2))
                extra["layer_bytes"] = _last_layer_size(res.image)
                if "hit_lazy" in modes:
                    t0 = time.monotonic()
                    index.ensure_indexed(res.image, res.digest, base, plain_http=plain, signer=signer)
                    extra["index_seconds"].append(round(time.monotonic() - t0, 2))
                for pos, mode in enumerate(rotation(modes, i)):
                    secs = round(one(mode, res.image, i), 3)
                    rounds.append({"round": i, "position": pos, "mode": mode, "seconds": secs})
                    log(f"round {i + 1}/{args.runs} {mode:9s} {secs:7.2f} s")
                cold(res.image)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    out = summarize(rounds, args.runs, modes)
    out["rounds"] = rounds
    out.update(extra)
    out["wall_seconds"] = round(time.time() - t_start, 1)
    return out


def _lazy_pull(address: str, ref: str) -> float:
    """``bootseer pull`` into BootSeer's snapshotter; returns its seconds (the new layer must be lazy)."""
    from bootseer.pull import pull
    from bootseer.registry import RegistryClient

    t0 = time.monotonic()
    res = pull(ref, address=address, namespace=NS, snapshotter="bootseer", client=RegistryClient(plain_http=True))
    pulled = round(time.monotonic() - t0, 3)
    assert [lo.mode for lo in res.layers][-1] == "lazy", res.to_dict()
    return pulled


def _last_layer_size(ref: str) -> int:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, check=True).stdout
    return int(json.loads(raw)["layers"][-1]["size"])


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootseer bench depsnap", description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--md", dest="md_path", help="write the results table (Markdown) here; - for stdout")
    ap.add_argument("--render", metavar="JSON", help="only write --md from an earlier --json result")
    ap.add_argument("--runs", "--repeats", dest="runs", type=int, default=5,
                    help="rounds (each mode once per round, order rotated); ≥ 5 for figures that are quoted")
    ap.add_argument("--rate", default="1gbit", help="the registry link's rate (tc tbf), e.g. 1gbit, 200mbit")
    ap.add_argument("--no-lazy", action="store_true", help="skip the lazy hit even when it is available")
    ap.add_argument("--wheel-cache", default=os.environ.get("BOOTSEER_WHEEL_CACHE", "/var/cache/bootseer/wheels"))
    args = ap.parse_args(argv)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        _write(args.md_path or "-", render_md(result))
        return 0
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    if args.runs < 5:
        _log(f"{args.runs} rounds: fewer than 5 leave the spread meaningless; do not quote these figures")
    result = run(args, _log)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    if args.md_path:
        _write(args.md_path, render_md(result))
    sec = result["seconds"]
    print("  ".join(f"{m}: {Spread(d['median'], d['min'], d['max'], d['n']).text()} s (n={d['n']})"
                    for m, d in sec.items()))
    head = result["ratio_spreads"].get("hit_vs_install")
    if head:
        hs = Spread(head["median"], head["min"], head["max"], head["n"])
        print(f"hit/install = {hs.text('.3f')} ({result['hit_mode']}; goal <= {GOAL}: {result['goal']['verdict']})")
    for note in result["notes"]:
        print("note:", note)
    print(json.dumps(result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
