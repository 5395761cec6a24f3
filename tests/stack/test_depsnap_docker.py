"""depsnap through a real Docker engine: build once, reuse, failures push nothing; the result runs in
containerd with the packages importable and the install's deletions applied."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from depsnap import build, image
from depsnap.key import DepSpec
from integration import dockerd
from integration.stack import Stack
from tests.conftest import scratch_root

WHEEL_CACHE = Path(os.environ.get("BOOTSEER_WHEEL_CACHE", "/var/cache/bootseer/wheels"))


@pytest.fixture(scope="module")
def engine(stack: Stack) -> Iterator[dockerd.Dockerd]:
    d = dockerd.start(scratch_root("dk"), [stack.info.registry])
    yield d
    d.stop()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local package index: pip itself plus a package this test builds."""
    out = tmp_path_factory.mktemp("wheels")
    WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
    if not list(WHEEL_CACHE.glob("pip-*.whl")):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "pip==24.3.1", "-d", str(WHEEL_CACHE)], check=True)
    for w in WHEEL_CACHE.glob("pip-*.whl"):
        (out / w.name).write_bytes(w.read_bytes())
    src = tmp_path_factory.mktemp("src")
    (src / "bs_hello").mkdir()
    (src / "bs_hello" / "__init__.py").write_text('GREETING = "hello from a dependency snapshot"\n')
    (src / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\nbuild-backend = '
                                        '"setuptools.build_meta"\n[project]\nname = "bs-hello"\nversion = "1.0"\n')
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src),
                    "-w", str(out)], check=True)
    return out


def pip_cmd(wheels: Path, extra: str = "") -> str:
    pip = next(wheels.glob("pip-*.whl")).name
    return (f"python3 /wheels/{pip}/pip install -q --no-index --find-links /wheels --break-system-packages "
            f"-r requirements.txt{extra}")


def test_build_reuse_and_run(stack: Stack, engine: dockerd.Dockerd, realistic_image: str, wheels: Path,
                             scratch: Path) -> None:
    (scratch / "requirements.txt").write_text("bs-hello==1.0\n")
    base_digest = image.exists(realistic_image, plain_http=True)
    assert base_digest
    cmd = pip_cmd(wheels, " && rm /etc/debian_version && rm -r /usr/share/doc/python3")
    spec = DepSpec(base_digest, requirements=[scratch / "requirements.txt"], command=cmd)
    repo = f"{stack.info.registry}/bootseer/depsnap-{os.urandom(3).hex()}"
    assert build.resolve(repo, spec, plain_http=True) is None
    res = build.build_docker(engine.client(), realistic_image, spec, repo, scratch, wheels, plain_http=True)
    assert res.built and res.image == f"{repo}:{spec.tag()}"

    # a second machine-state: same inputs resolve to the same image, nothing is built
    again = build.build_docker(engine.client(), realistic_image,
                               DepSpec(base_digest, requirements=[scratch / "requirements.txt"], command=cmd),
                               repo, scratch, wheels, plain_http=True)
    assert (again.built, again.digest) == (False, res.digest)

    cli = [sys.executable, "-m", "bootseer.cli", "depsnap", "resolve", "--base", realistic_image, "--repo", repo,
           "-r", str(scratch / "requirements.txt"), "--run", cmd, "--plain-http", "--json"]
    doc = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)
    assert doc == {"image": res.image, "digest": res.digest, "hit": True, "key": spec.key(), "install_needed": False}
    (scratch / "requirements.txt").write_text("bs-hello==1.1\n")  # another key: a miss, start from the base
    doc = json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)
    assert (doc["hit"], doc["image"]) == (False, realistic_image)

    stack.ctr("image", "pull", "--plain-http", res.image, timeout=600)
    probe = ("import bs_hello, os; print(bs_hello.GREETING); "
             "print(os.path.exists('/etc/debian_version'), os.path.exists('/usr/share/doc/python3'))")
    out = stack.ctr("run", "--rm", res.image, "t-depsnap-" + os.urandom(3).hex(), "python3", "-c", probe).stdout
    assert out == "hello from a dependency snapshot\nFalse False\n"


def test_failed_install_pushes_nothing_and_says_why(stack: Stack, engine: dockerd.Dockerd, realistic_image: str,
                                                    wheels: Path, scratch: Path) -> None:
    (scratch / "requirements.txt").write_text("does-not-exist==9.9\n")
    spec = DepSpec(image.exists(realistic_image, plain_http=True) or "", requirements=[scratch / "requirements.txt"],
                   command=pip_cmd(wheels))
    repo = f"{stack.info.registry}/bootseer/depsnap-fail-{os.urandom(3).hex()}"
    with pytest.raises(build.BuildError) as ei:
        build.build_docker(engine.client(), realistic_image, spec, repo, scratch, wheels, plain_http=True)
    assert "does-not-exist" in ei.value.log_tail
    assert build.resolve(repo, spec, plain_http=True) is None
