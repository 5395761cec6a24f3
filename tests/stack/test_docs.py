"""The docs say only what is true of this checkout.

- Every ``bootseer …`` command in a fenced block of README.md or docs/ names a sub-command that exists
  (``bootseer <sub> --help`` succeeds) and only options that sub-command has.  Commands that need a cluster,
  a registry or a GPU node are checked this far only.
- Blocks preceded by ``<!-- doc-test: run -->`` are cheap and self-contained: they are run as written, in a
  scratch directory holding a small checkpoint (``ckpt/``) and ``docs/``, and must succeed.
- Blocks preceded by ``<!-- doc-test: stack -->`` walk a flow on a local stack they start and stop themselves
  (``bootseer stack up`` … ``bootseer stack down``): run as written, as one shell script with ``bootseer`` on
  PATH and its own stack directory, every step must succeed, and nothing is left behind.
- Repository paths in any command exist; TOML/YAML/JSON blocks parse; Python blocks compile; a TOML block
  headed ``# bootseer config containerd …`` is exactly what that command prints; relative links resolve.
- docs/metrics.md lists exactly the metrics the code declares, with their types.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from bootseer.cli import app

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
RUN_MARK = "<!-- doc-test: run -->"
STACK_MARK = "<!-- doc-test: stack -->"
SHELL_INFOS = {"", "sh", "bash", "shell", "console"}
REPO_DIRS = ("integration/", "docs/", "tests/", ".ci/", "bootseer/", "snapshotter/", "ckptfs/", "depsnap/",
             "recorder/", "registry_sidecar/")


@dataclass
class Block:
    doc: Path
    line: int
    info: str
    text: str
    run: bool
    stack: bool = False

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def _blocks(doc: Path) -> list[Block]:
    out: list[Block] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\S*)", lines[i])
        if m:
            start, info = i, m.group(1).lower()
            body = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            prev = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            out.append(Block(doc, start + 1, info, "\n".join(body) + "\n", prev.strip() == RUN_MARK,
                             prev.strip() == STACK_MARK))
        i += 1
    return out


BLOCKS = [b for d in DOCS for b in _blocks(d)]


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``|``, ``;``), comments dropped."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:  # an unbalanced quote: leave it to the reader
        return []
    segs: list[list[str]] = [[]]
    for t in tokens:
        if t and set(t) <= set("&|;()<>"):
            segs.append([])
        else:
            segs[-1].append(t)
    return [s for s in segs if s]


@dataclass
class DocCommand:
    block: Block
    argv: list[str]


def _commands() -> tuple[list[DocCommand], list[DocCommand]]:
    bootseer, others = [], []
    for b in BLOCKS:
        if b.info not in SHELL_INFOS:
            continue
        for line in b.text.splitlines():
            for seg in _segments(line):
                (bootseer if seg[0] == "bootseer" else others).append(DocCommand(b, seg))
    return bootseer, others


BOOTSEER_CMDS, OTHER_CMDS = _commands()
ROOT_CMD = typer.main.get_command(app)


def _resolve(argv: list[str]) -> tuple[list[str], Any]:
    """The longest chain of sub-command names at the start of ``argv[1:]`` and the command it names (typer
    may carry its own copy of click, so groups are recognised by their ``commands``)."""
    cmd: Any = ROOT_CMD
    path: list[str] = []
    for tok in argv[1:]:
        if isinstance(getattr(cmd, "commands", None), dict) and tok in cmd.commands:
            cmd = cmd.commands[tok]
            path.append(tok)
        else:
            break
    return path, cmd


def test_the_docs_have_commands() -> None:
    assert len(BOOTSEER_CMDS) > 30 and any(b.run for b in BLOCKS)


@pytest.mark.parametrize("dc", BOOTSEER_CMDS, ids=lambda dc: " ".join(dc.argv[:3]))
def test_documented_subcommand_exists_with_its_options(dc: DocCommand) -> None:
    path, cmd = _resolve(dc.argv)
    rest = dc.argv[1 + len(path):]
    if not path:
        assert rest and rest[0] in ("--version", "--help"), f"{dc.block.where}: no sub-command in {dc.argv}"
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, f"{dc.block.where}: bootseer {' '.join(path)} --help: {res.output}"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    if (getattr(cmd, "context_settings", None) or {}).get("ignore_unknown_options"):
        # a pass-through command (bootseer bench NAME → the module's own argparse): its help lists its options
        known |= set(re.findall(r"(?<![\w-])(--[\w-]+|-\w)\b", res.output))
    for tok in rest:
        tok = tok.lstrip("[")
        if tok.startswith("-") and tok not in ("-", "--"):
            opt = tok.split("=", 1)[0].rstrip("]")
            if opt.startswith("--") or (len(opt) == 2 and opt[1].isalpha()):
                assert opt in known, f"{dc.block.where}: `bootseer {' '.join(path)}` has no option {opt}"
        if tok == "--":  # what follows is the user's command (bootseer record IMG -- CMD)
            break


def test_the_installed_entry_point_answers() -> None:
    exe = shutil.which("bootseer")
    assert exe, "the bootseer entry point is not on PATH (integration/install.sh links it)"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "profile" in proc.stdout, proc.stderr


def _repo_paths(dc: DocCommand) -> list[str]:
    return [tok for tok in dc.argv if tok.startswith(REPO_DIRS)]


@pytest.mark.parametrize("dc", [dc for dc in OTHER_CMDS if _repo_paths(dc)], ids=lambda dc: " ".join(dc.argv[:2]))
def test_repository_paths_in_commands_exist(dc: DocCommand) -> None:
    for tok in _repo_paths(dc):
        assert list(ROOT.glob(tok)), f"{dc.block.where}: {tok} does not exist"


def _mounts_below(path: str) -> list[str]:
    return [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines() if ln.split()[1].startswith(path)]


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.stack], ids=lambda b: b.where)
def test_stack_walks_run_as_written(block: Block, tmp_path: Path) -> None:
    """The guide's one-machine walk, on a stack of its own: every step succeeds, in order, as written."""
    import secrets

    lines = [ln.strip() for ln in block.text.splitlines() if ln.strip()]
    assert lines[0].startswith("bootseer stack up") and lines[-1].startswith("bootseer stack down"), block.where
    root = f"/tmp/bs-walk-{secrets.token_hex(3)}"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "bootseer").write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m bootseer.cli \"$@\"\n")
    (bindir / "bootseer").chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "CONTAINERD_ADDRESS", "BOOTSEER_EVENTS",
                                                             "CONTAINER_RUNTIME_ENDPOINT", "BOOTSEER_HOSTS_DIR",
                                                             "BOOTSEER_JOB_ID")}
    env.update(PATH=f"{bindir}:{env['PATH']}", BOOTSEER_STACK_DIR=root,
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    # each step echoed before it runs, so a failure names it
    script = "set -euo pipefail\n" + "".join(f"echo {shlex.quote('+ ' + ln)} >&2\n{ln}\n" for ln in lines)
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
                              timeout=900)
    finally:
        subprocess.run([sys.executable, "-m", "bootseer.cli", "stack", "down", "--root", root], env=env,
                       capture_output=True, timeout=300)
    steps = re.findall(r"^\+ (.*)$", proc.stderr, re.M)
    assert proc.returncode == 0, (f"{block.where}: step `{steps[-1] if steps else '?'}` failed (rc "
                                  f"{proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    assert steps == lines, f"{block.where}: not every step ran: {steps}"
    out = proc.stdout
    assert images_small_output() in out  # the container ran from the lazily pulled image
    assert re.search(r": 3 layers, 3 lazy,", out), out
    assert "built and pushed" in proc.stderr and "reused (a snapshot with this key exists)" in proc.stderr
    if "bootseer cache drop" in block.text:  # the start after the drop prefetched, and the profile shows it
        assert re.search(r"dropped the caches of [1-9]\d* layer", out), out
        table = out.split("lazy layers of", 1)[1].split("start-up of job", 1)[0]
        rows = [[c.strip() for c in ln.split("│")[1:-1]] for ln in table.splitlines() if ln.startswith("│ ")]
        assert len(rows) == 3 and [r[0] for r in rows] == ["1", "2", "3"], table  # the image's layers, in order
        assert sum(float(r[6]) for r in rows) > 0, f"nothing prefetched after the drop:\n{table}"
        for phase in ("image_pull", "image_mount", "prefetch"):
            assert re.search(rf"│ {phase} +│ +[1-9]", out), f"profile lacks {phase}:\n{out}"
    assert _mounts_below(root) == [], "the walk left mounts behind"
    assert not Path(root).exists()


def images_small_output() -> str:
    from integration import images

    return images.SMALL_OUTPUT


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.run], ids=lambda b: b.where)
def test_runnable_blocks_run(block: Block, tmp_path: Path) -> None:
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    (tmp_path / "ckpt" / "model.pt").write_bytes(os.urandom(3 << 20))
    (tmp_path / "ckpt" / "sub" / "meta.json").write_text('{"step": 1000}')
    (tmp_path / "docs").symlink_to(ROOT / "docs")
    script = ["set -euo pipefail"]
    for line in block.text.splitlines():
        if line.strip():
            script.append(re.sub(r"^bootseer\b", shlex.quote(sys.executable) + " -m bootseer.cli", line.strip()))
    env = {**os.environ, "BOOTSEER_EVENTS": "off", "COLUMNS": "160"}
    proc = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{block.where}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if "ckptfs get" in block.text:
        for rel in ("model.pt", "sub/meta.json"):
            assert (tmp_path / "restored" / rel).read_bytes() == (tmp_path / "ckpt" / rel).read_bytes()
    if "--png startup.png" in block.text:
        assert (tmp_path / "startup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.info in ("toml", "yaml", "yml", "json", "python")],
                         ids=lambda b: f"{b.where}-{b.info}")
def test_config_and_code_blocks_parse(block: Block) -> None:
    if block.info == "toml":
        tomllib.loads(block.text)
    elif block.info in ("yaml", "yml"):
        yaml.safe_load(block.text)
    elif block.info == "json":
        json.loads(block.text)
    else:
        compile(block.text, block.where, "exec")


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.info == "toml"
                                   and b.text.startswith("# bootseer config containerd")], ids=lambda b: b.where)
def test_shown_containerd_snippet_is_what_the_command_prints(block: Block) -> None:
    first, _, shown = block.text.partition("\n")
    argv = shlex.split(first.lstrip("# "))
    res = CliRunner().invoke(app, argv[1:])
    assert res.exit_code == 0, res.output
    assert shown == res.output, f"{block.where}: the snippet shown differs from `{first[2:]}`"


def test_relative_links_resolve() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (doc.parent / target.split("#", 1)[0]).resolve()
            # a link out of the repository is broken for everyone reading a clone or the forge's page
            assert path.is_relative_to(ROOT), f"{doc.relative_to(ROOT)}: link {target} leaves the repository"
            assert path.exists(), f"{doc.relative_to(ROOT)}: broken link {target}"


def _declared_metrics() -> dict[str, str]:
    """name as exposed → type, from the metric constructors in the code."""
    out: dict[str, str] = {}
    pattern = re.compile(r"\b(Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)"
                         r"\(\s*\"(bootseer_\w+)\"")
    for pkg in ("bootseer", "snapshotter", "registry_sidecar", "recorder", "depsnap", "ckptfs"):
        for src in (ROOT / pkg).rglob("*.py"):
            for kind, name in pattern.findall(src.read_text()):
                kind = {"GaugeMetricFamily": "Gauge", "CounterMetricFamily": "Counter"}.get(kind, kind).lower()
                if kind == "counter" and not name.endswith("_total"):
                    name += "_total"
                out[name] = kind
    return out


def test_metrics_doc_lists_exactly_the_declared_metrics() -> None:
    documented = dict(re.findall(r"^\| `(bootseer_\w+)` \| (\w+) \|", (ROOT / "docs" / "metrics.md").read_text(),
                                 re.MULTILINE))
    declared = _declared_metrics()
    assert declared, "no metrics found in the code"
    assert documented == declared


def _documented_series(section_prefix: str) -> list[str]:
    """Series of docs/metrics.md's sections whose heading starts with ``section_prefix``."""
    out, current = [], ""
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            current = line[3:]
        m = re.match(r"^\| `(bootseer_\w+)` \| (\w+) \|", line)
        if m and current.startswith(section_prefix):
            out.append(m.group(1) + ("_bucket" if m.group(2) == "histogram" else ""))
    return out


def test_a_running_snapshotter_serves_the_documented_series_after_a_lazy_pull(stack: Any, small_image: str) -> None:
    """The local stack's snapshotter (lazy layers on) after the sidecar indexed the small image, ``bootseer
    pull`` made its layers lazy and a container ran from them: /metrics has every documented series."""
    import secrets
    import time

    import requests

    from bootseer.index import find_index
    from bootseer.pull import pull
    from bootseer.registry import RegistryClient
    from integration import images

    if not (stack.info.sidecar_url and stack.info.snapshotter_metrics and stack.info.snapshotter_control):
        pytest.fail("the local stack runs without the sidecar or the lazy snapshotter")
    client = RegistryClient(hosts_dir=str(Path(stack.info.containerd_config).parent / "certs.d"))
    repo = small_image.rpartition(":")[0]
    digest = client.get_manifest(small_image).digest
    deadline = time.monotonic() + 180
    while find_index(client, repo, digest) is None:  # the sidecar converts after the push's notification
        assert time.monotonic() < deadline, "the sidecar did not index the small image in 180 s"
        time.sleep(0.2)  # polling a registry for another process's result, with a deadline
    ns = "docs-" + secrets.token_hex(3)
    try:
        res = pull(small_image, address=stack.info.containerd_socket, namespace=ns, client=client)
        assert [lo.mode for lo in res.layers].count("lazy") == len(res.layers), res
        out = stack.ctr("run", "--rm", "--snapshotter", "bootseer", small_image, "docs-" + secrets.token_hex(3),
                        namespace=ns).stdout
        assert out == images.SMALL_OUTPUT
        text = requests.get(f"http://{stack.info.snapshotter_metrics}/metrics", timeout=10).text
    finally:
        stack.ctr("image", "rm", small_image, namespace=ns, check=False)
    served = {ln.split("{")[0].split(" ")[0] for ln in text.splitlines() if ln and not ln.startswith("#")}
    expected = _documented_series("Snapshotter: Snapshots API") + _documented_series("Snapshotter: lazy layers")
    assert not set(expected) - served, f"documented but not served: {sorted(set(expected) - served)}"
    hot = _documented_series("Snapshotter: hot-block")
    if any(s.startswith("bootseer_hotblocks_") for s in served):  # the prefetcher is wired in: all of it
        assert not set(hot) - served, f"documented but not served: {sorted(set(hot) - served)}"
    assert re.search(r'^bootseer_snapshotter_grpc_calls_total\{code="OK",method="Prepare"\} [1-9]', text, re.M)
