"""depsnap benchmark: time until a job's environment is ready, with a dependency snapshot hit vs running
the install at job start.

``bootseer bench depsnap [--json FILE] [--repeats N]`` (or ``python -m integration.bench.depsnap``).

Set-up, all local: a stack (containerd + registry), a private Docker engine, the realistic base image
(Debian + python3 + numpy + torch) and a package index of real wheels — numpy plus a dozen pure-Python
packages, downloaded once into the wheel cache — mounted into the install container (no network).

Each run starts from the same node state: the base image is present in containerd (nodes keep their
base images), everything else removed.

* ``install``: run the install command in a container from the base, then import the packages — what a job
  does today.
* ``hit``: pull the snapshot image (only its one new layer travels: the base layers are shared) and import
  the packages from it.

Medians over ``--repeats``; JSON ``ratios.hit_vs_install`` (time, hit over install).  Lazy pull of the
snapshot layer is not in this figure yet: its pull is a full layer download through containerd.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from depsnap import build, image
from depsnap.key import DepSpec
from integration import dockerd, images
from integration.stack import StackConfig, running

PACKAGES = ["numpy==2.2.6", "six==1.17.0", "idna==3.10", "attrs==25.3.0", "packaging==25.0", "pyparsing==3.2.3",
            "python-dateutil==2.9.0.post0", "pytz==2025.2", "certifi==2025.4.26", "charset-normalizer==3.4.2",
            "urllib3==2.4.0", "requests==2.32.3", "jinja2==3.1.6", "markupsafe==3.0.2", "click==8.2.1"]
IMPORTS = "numpy, six, idna, attrs, packaging, pyparsing, dateutil, pytz, certifi, charset_normalizer, urllib3, " \
          "requests, jinja2, markupsafe, click"
PIP_WHEEL = "pip==24.3.1"
GOAL = 0.05


def fetch_wheels(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    stamp = cache / ("bench-" + hashlib.sha256(" ".join([PIP_WHEEL, *PACKAGES]).encode()).hexdigest()[:12] + ".ok")
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
                        "--python-version", "3.11", "--platform", "manylinux2014_x86_64", "-d", str(cache),
                        PIP_WHEEL, *PACKAGES], check=True)
        stamp.write_text("ok")
    return cache


def run(args: argparse.Namespace) -> dict:
    wheels = fetch_wheels(Path(args.wheel_cache))
    pip = next(wheels.glob("pip-*.whl")).name
    root = Path(f"/tmp/bs-bd-{os.urandom(3).hex()}")
    ctx = root.with_name(root.name + "-ctx")
    ctx.mkdir(parents=True)
    (ctx / "requirements.txt").write_text("\n".join(PACKAGES) + "\n")
    install = (f"python3 /wheels/{pip}/pip install -q --no-index --find-links /wheels --break-system-packages "
               "-r requirements.txt")
    probe = f"import {IMPORTS}; print('ready')"
    out: dict = {"packages": PACKAGES, "runs": {"install": [], "hit": []}}
    try:
        with running(StackConfig(root=root)) as st:
            base = images.push_realistic(st.info.registry)
            eng = dockerd.start(Path(str(root) + "-dk"), [st.info.registry])
            try:
                digest = image.exists(base, plain_http=True) or ""
                spec = DepSpec(digest, requirements=[ctx / "requirements.txt"], command=install)
                repo = f"{st.info.registry}/bootseer/depsnap-bench"
                t0 = time.monotonic()
                res = build.build_docker(eng.client(), base, spec, repo, ctx, wheels, plain_http=True)
                out["build_seconds"] = round(time.monotonic() - t0, 2)
            finally:
                eng.stop()
            st.ctr("image", "pull", "--plain-http", base, timeout=900)
            # the install container needs the wheels and requirements: mount them like the build did
            mounts = ["--mount", f"type=bind,src={wheels},dst=/wheels,options=rbind:ro",
                      "--mount", f"type=bind,src={ctx},dst=/depsnap,options=rbind:ro", "--cwd", "/depsnap"]
            for i in range(args.repeats):
                st.ctr("image", "rm", "--sync", res.image, check=False)
                t0 = time.monotonic()
                r = st.ctr("run", "--rm", *mounts, base, f"bench-install-{i}", "sh", "-c",
                           f"{install} && python3 -c \"{probe}\"", timeout=1800)
                out["runs"]["install"].append(round(time.monotonic() - t0, 3))
                assert r.stdout.strip().endswith("ready"), r.stdout
                t0 = time.monotonic()
                st.ctr("image", "pull", "--plain-http", res.image, timeout=900)
                r = st.ctr("run", "--rm", res.image, f"bench-hit-{i}", "python3", "-c", probe, timeout=900)
                out["runs"]["hit"].append(round(time.monotonic() - t0, 3))
                assert r.stdout.strip() == "ready", r.stdout
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in out["runs"].items()}
    out["median_seconds"] = med
    out["ratios"] = {"hit_vs_install": round(med["hit"] / med["install"], 4)}
    out["goal"] = {"hit_vs_install_max": GOAL, "met": out["ratios"]["hit_vs_install"] <= GOAL}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bootseer bench depsnap", description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wheel-cache", default=os.environ.get("BOOTSEER_WHEEL_CACHE", "/var/cache/bootseer/wheels"))
    args = ap.parse_args(argv)
    result = run(args)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")
    med = result["median_seconds"]
    print(f"install at start: {med['install']:.2f} s   snapshot hit: {med['hit']:.2f} s   "
          f"hit/install = {result['ratios']['hit_vs_install']:.3f} (goal <= {GOAL})")
    print(json.dumps(result["ratios"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
