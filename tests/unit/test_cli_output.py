"""The CLI reads well off a terminal (a pipe, a CI log): help shows every bracket it was written with, help
text is not indented by docstring leftovers, and output lines are not cut at 80 columns.

Run with ``COLUMNS`` unset and stdout a pipe, as a CI log sees the commands."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from bootseer.cli import app

ROOT = Path(__file__).resolve().parents[2]
# what rich's markup parser would take for a tag: '[' then a letter, '#', '/' or '@'
MARKUP_LIKE = re.compile(r"(?<!\\)\[([a-zA-Z#/@][^\[\]]*)\]")


def _commands(cmd: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, cmd
    for name, sub in sorted((getattr(cmd, "commands", None) or {}).items()):
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def _help(path: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    res = CliRunner().invoke(app, [*path, "--help"])
    assert res.exit_code == 0, res.output
    return res.output


def _flat(text: str) -> str:
    """Help output with box drawing and line breaks folded away (a wrapped phrase reads as one)."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


def test_the_tree_has_commands() -> None:
    assert len(COMMANDS) > 40


@pytest.mark.parametrize("path,cmd", COMMANDS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_help_shows_every_bracket_and_no_docstring_indent(path: tuple[str, ...], cmd: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = _help(path, monkeypatch)
    texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
    for text in texts:
        for inner in MARKUP_LIKE.findall(text.replace("\\[", "")):
            # the bracket and its words may wrap; they must all be there
            assert f"[{' '.join(inner.split())}]" in _flat(out), f"bootseer {' '.join(path)} --help dropped [{inner}]"
    if (getattr(cmd, "context_settings", None) or {}).get("ignore_unknown_options"):
        return  # a pass-through to a benchmark's own argparse, which prints its own help
    description = out.split("╭", 1)[0]
    for line in description.splitlines():
        assert not re.search(r"\S {3,}\S", line.strip()), f"bootseer {' '.join(path)} --help: indented text {line!r}"


def test_command_lists_give_each_summary_on_consecutive_filled_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """typer keeps a docstring's line breaks in command lists ('… checkpoint⏎ load) from …'): a summary line
    must not end while the next word would still fit."""
    out = _help((), monkeypatch)
    panel = out.split("Commands", 1)[1]
    lines = [ln for ln in panel.splitlines() if ln.startswith("│") and ln.endswith("│")]
    width = len(lines[0]) - 4  # inside '│ ' and ' │'
    rows = [ln[2:-2].rstrip() for ln in lines]
    for this, nxt in itertools.pairwise(rows):
        if nxt.startswith(" ") and nxt.strip():  # nxt continues this row's summary
            first_word = nxt.split()[0]
            assert len(this) + 1 + len(first_word) > width, f"summary broken early: {this!r} / {nxt!r}"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "TERMINAL_WIDTH")}
    env["BOOTSEER_EVENTS"] = "off"
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_output_to_a_pipe_is_not_wrapped(tmp_path: Path) -> None:
    """`ckptfs put`/`ls` with a long URI, and `profile`'s tables, into a pipe: whole lines, whole values."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "model-with-a-long-file-name-for-the-table.pt").write_bytes(os.urandom(1 << 16))
    uri = f"file://{tmp_path}/store/a-long-directory-name-for-the-checkpoint-store/run-0007/step-000012000"
    put = _run("ckptfs", "put", "ckpt", uri, cwd=tmp_path)
    assert put.returncode == 0, put.stderr
    ls = _run("ckptfs", "ls", uri, cwd=tmp_path)
    assert ls.returncode == 0, ls.stderr
    head = ls.stdout.splitlines()[0]
    assert head.startswith(uri + ": 1 files,") and head.rstrip().endswith("stripes"), ls.stdout
    assert re.search(r"│ 0644 │ +65536 │ model-with-a-long-file-name-for-the-table\.pt │", ls.stdout), ls.stdout
    prof = _run("profile", "--events", str(ROOT / "docs/examples/job-start-events.jsonl"), "--job",
                "job-bootseer-1g-2-c25d", cwd=tmp_path)
    assert prof.returncode == 0, prof.stderr
    assert re.search(r"^start-up span [\d.]+s, of which [\d.]+s inside a logged phase.*$", prof.stdout, re.M)
    assert "…" not in prof.stdout, prof.stdout  # no column cut short
    # the example's phases overlap: the shares add up to more than 100 %, and the output says why
    assert re.search(r"^shares add up to 1\d\d%: phases overlap", prof.stdout, re.M), prof.stdout


@pytest.mark.parametrize("argv", [["-m", "snapshotter", "--help"], ["-m", "bootseer.cli", "snapshotter", "--help"],
                                  ["-m", "snapshotter", "serve", "--help"]])
def test_every_entry_point_shows_the_brackets(argv: list[str]) -> None:
    """`python -m snapshotter` (what a systemd unit may run) printed "(register it as )": rich took
    ``[proxy_plugins.bootseer]`` for markup, since that entry point skipped the help tidying."""
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "250"})
    assert out.returncode == 0, out.stderr
    assert "[proxy_plugins.bootseer]" in out.stdout, out.stdout
