"""depsnap benchmark: time until a job's environment is ready, with a dependency snapshot hit vs running
the install at job start.

``bootseer bench depsnap [--json FILE] [--repeats N]`` (or ``python -m integration.bench.depsnap``).

Set-up, all local: a stack (containerd + registry + BootSeer's snapshotter; no sidecar, whose conversions
would load the CPU during the runs), the realistic base image (Debian + python3 + numpy + torch) and a
package index of real wheels — numpy plus 14 pure-Python packages, downloaded once into the wheel cache —
mounted into the install container (no network).  Snapshots are built with depsnap's containerd engine and
indexed by depsnap itself (only the new layer is converted; the base's EROFS blobs are reused).

Each repeat builds a snapshot of its own (one marker file more, so another layer digest): no run finds a
previous run's layer in the snapshotter's cache — every hit is the first start of that snapshot on the node.
Node state for every run: the base image is present in containerd (nodes keep their base images), the
snapshot image is not.  Modes, each ending when ``python3 -c "import numpy, requests, …"`` inside the
container has printed ``ready``:

* ``install``: run the install command in a container from the base, then import — what a job does today.
* ``hit_lazy``: ``bootseer pull`` of the snapshot image into BootSeer's snapshotter (its new layer mounted
  lazily from its EROFS blob), run, import.
* ``hit``: pull the snapshot image with ``ctr image pull`` (containerd's overlayfs path: only its one new
  layer travels, gunzipped and unpacked in full), run, import.
* ``floor``: the snapshot image already unpacked on the node: run, import — the part every mode shares
  (container start, interpreter start, the imports themselves).

Medians over ``--repeats``.  JSON ``ratios.hit_vs_install`` is the lazy hit when measured, else the full-pull
hit (``hit_mode`` says which); ``ratios.prep_*`` compare only the part above the floor, i.e. what getting the
dependencies in place costs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from depsnap import engine_containerd, image, index
from depsnap.key import DepSpec
from integration import images
from integration.stack import Stack, StackConfig, running

PACKAGES = ["numpy==2.2.6", "six==1.17.0", "idna==3.10", "attrs==25.3.0", "packaging==25.0", "pyparsing==3.2.3",
            "python-dateutil==2.9.0.post0", "pytz==2025.2", "certifi==2025.4.26", "charset-normalizer==3.4.2",
            "urllib3==2.4.0", "requests==2.32.3", "jinja2==3.1.6", "markupsafe==3.0.2", "click==8.2.1"]
IMPORTS = "numpy, six, idna, attrs, packaging, pyparsing, dateutil, pytz, certifi, charset_normalizer, urllib3, " \
          "requests, jinja2, markupsafe, click"
PIP_WHEEL = "pip==24.3.1"
GOAL = 0.05
NS = "bench-depsnap"


def fetch_wheels(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / ("bench-" + hashlib.sha256(" ".join([PIP_WHEEL, *PACKAGES]).encode()).hexdigest()[:12] + ".ok")
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(cache),
                        PIP_WHEEL, *PACKAGES], check=True)
        stamp.write_text("ok")
    return cache


def run(args: argparse.Namespace) -> dict[str, Any]:
    wheels = fetch_wheels(Path(args.wheel_cache))
    pip = next(wheels.glob("pip-*.whl")).name
    root = Path(f"/tmp/bs-bd-{secrets.token_hex(3)}")
    ctx = root.with_name(root.name + "-ctx")
    ctx.mkdir(parents=True)
    (ctx / "requirements.txt").write_text("\n".join(PACKAGES) + "\n")
    install = (f"python3 /wheels/{pip}/pip install -q --no-index --find-links /wheels --break-system-packages "
               "-r requirements.txt")
    probe = f"import {IMPORTS}; print('ready')"
    lazy = not args.no_lazy
    out: dict[str, Any] = {"packages": PACKAGES, "runs": {"install": [], "hit": [], "floor": []}, "notes": [],
                           "build_seconds": [], "index_seconds": [], "pull_seconds": {"hit": [], "hit_lazy": []}}
    if lazy:
        out["runs"]["hit_lazy"] = []
    else:
        out["notes"].append("hit_lazy not measured (--no-lazy)")
    try:
        # no sidecar: its conversions would load the CPU during the runs; depsnap indexes what it needs itself
        with running(StackConfig(root=root, sidecar=False)) as st:
            base = images.push_realistic(st.info.registry)
            digest = image.exists(base, plain_http=True) or ""
            if lazy:  # the base's EROFS blobs, once (a cluster's sidecar has them long before any depsnap)
                t0 = time.monotonic()
                index.ensure_indexed(base, digest, None, plain_http=True)
                out["base_index_seconds"] = round(time.monotonic() - t0, 2)
            # node state: the base unpacked in both snapshotters
            st.ctr("image", "pull", "--plain-http", base, namespace=NS, timeout=900)
            st.ctr("image", "pull", "--plain-http", "--snapshotter", "bootseer", base, namespace=NS, timeout=900)
            mounts = ["--mount", f"type=bind,src={wheels},dst=/wheels,options=rbind:ro",
                      "--mount", f"type=bind,src={ctx},dst=/depsnap,options=rbind:ro", "--cwd", "/depsnap"]

            def ctr_run(img: str, name: str, *cmd: str, extra: tuple[str, ...] = ()) -> None:
                r = st.ctr("run", "--rm", *extra, img, name, *cmd, namespace=NS, timeout=1800)
                assert r.stdout.strip().endswith("ready"), r.stdout + r.stderr

            runs = out["runs"]
            for i in range(args.repeats):
                # a snapshot of its own per repeat (one marker file more: another layer digest), so that no
                # run finds the previous run's layer in the snapshotter's cache — every hit is a first start
                spec = DepSpec(digest, requirements=[ctx / "requirements.txt"],
                               command=f"{install} && echo {i} > /etc/depsnap-bench-run")
                t0 = time.monotonic()
                res = engine_containerd.build_containerd(st.info.containerd_socket, base, spec,
                                                         f"{st.info.registry}/bootseer/depsnap-bench", ctx, wheels,
                                                         plain_http=True, namespace=NS + "-build")
                out["build_seconds"].append(round(time.monotonic() - t0, 2))
                out["layer_bytes"] = _last_layer_size(res.image)
                if lazy:
                    t0 = time.monotonic()
                    index.ensure_indexed(res.image, res.digest, base, plain_http=True)
                    out["index_seconds"].append(round(time.monotonic() - t0, 2))

                t0 = time.monotonic()
                ctr_run(base, f"bi-{i}", "sh", "-c", f"{install} && python3 -c \"{probe}\"", extra=tuple(mounts))
                runs["install"].append(round(time.monotonic() - t0, 3))
                if lazy:
                    t0 = time.monotonic()
                    out["pull_seconds"]["hit_lazy"].append(_lazy_hit(st, res.image, probe, f"bl-{i}"))
                    runs["hit_lazy"].append(round(time.monotonic() - t0, 3))
                    st.ctr("image", "rm", "--sync", res.image, namespace=NS, check=False)
                t0 = time.monotonic()
                st.ctr("image", "pull", "--plain-http", res.image, namespace=NS, timeout=900)
                out["pull_seconds"]["hit"].append(round(time.monotonic() - t0, 3))
                ctr_run(res.image, f"bh-{i}", "python3", "-c", probe)
                runs["hit"].append(round(time.monotonic() - t0, 3))
                t0 = time.monotonic()
                ctr_run(res.image, f"bf-{i}", "python3", "-c", probe)
                runs["floor"].append(round(time.monotonic() - t0, 3))
                st.ctr("image", "rm", "--sync", res.image, namespace=NS, check=False)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in out["runs"].items() if v}
    out["median_seconds"] = med
    hit_mode = "hit_lazy" if "hit_lazy" in med else "hit"
    ratios = {"hit_vs_install": round(med[hit_mode] / med["install"], 4),
              "hit_full_vs_install": round(med["hit"] / med["install"], 4),
              "floor_vs_install": round(med["floor"] / med["install"], 4)}
    if "hit_lazy" in med:
        ratios["hit_lazy_vs_install"] = round(med["hit_lazy"] / med["install"], 4)
    above = med["install"] - med["floor"]
    for k in ("hit", "hit_lazy"):
        if k in med and above > 0:
            ratios[f"prep_{k}_vs_install"] = round(max(med[k] - med["floor"], 0.0) / above, 4)
    out["hit_mode"] = hit_mode
    out["ratios"] = ratios
    out["goal"] = {"hit_vs_install_max": GOAL, "met": ratios["hit_vs_install"] <= GOAL}
    return out


def _lazy_hit(st: Stack, ref: str, probe: str, name: str) -> float:
    """Lazy pull + run; returns the pull's share of the time."""
    from bootseer.pull import pull

    t0 = time.monotonic()
    res = pull(ref, address=st.info.containerd_socket, namespace=NS, snapshotter="bootseer", client=_client())
    pulled = round(time.monotonic() - t0, 3)
    assert [lo.mode for lo in res.layers][-1] == "lazy", res.to_dict()
    r = st.ctr("run", "--rm", "--snapshotter", "bootseer", ref, name, "python3", "-c", probe, namespace=NS,
               timeout=1800)
    assert r.stdout.strip() == "ready", r.stdout + r.stderr
    return pulled


def _client() -> Any:
    from bootseer.registry import RegistryClient

    return RegistryClient(plain_http=True)


def _last_layer_size(ref: str) -> int:
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
                         capture_output=True, check=True).stdout
    return int(json.loads(raw)["layers"][-1]["size"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootseer bench depsnap", description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-lazy", action="store_true", help="skip the lazy hit even when it is available")
    ap.add_argument("--wheel-cache", default=os.environ.get("BOOTSEER_WHEEL_CACHE", "/var/cache/bootseer/wheels"))
    args = ap.parse_args(argv)
    result = run(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    med = result["median_seconds"]
    line = f"install at start: {med['install']:.2f} s   hit (full pull): {med['hit']:.2f} s   "
    if "hit_lazy" in med:
        line += f"hit (lazy): {med['hit_lazy']:.2f} s   "
    print(line + f"floor: {med['floor']:.2f} s")
    print(f"hit/install = {result['ratios']['hit_vs_install']:.3f} ({result['hit_mode']}; goal <= {GOAL})")
    for note in result["notes"]:
        print("note:", note)
    print(json.dumps(result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
