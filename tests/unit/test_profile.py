"""The start-up event log and ``bootseer profile``: what daemons and tools append is what the profile shows,
one job at a time, as tables, JSON and a PNG Gantt chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bootseer import events

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(events.ENV_PATH, str(path))
    monkeypatch.delenv(events.ENV_JOB, raising=False)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bootseer.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ROOT, timeout=120)


def test_span_writes_one_line_with_both_clocks_and_the_job(log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(events.ENV_JOB, "job-7")
    with events.span("image_pull", component="bootseer pull", image="r/x:1") as attrs:
        attrs["bytes"] = 123
    (line,) = _lines(log)
    assert line["phase"] == "image_pull" and line["job"] == "job-7" and line["status"] == "ok"
    assert line["component"] == "bootseer pull"
    assert line["attrs"] == {"image": "r/x:1", "bytes": 123}
    assert line["start"] <= line["end"] and line["start_mono"] <= line["end_mono"]
    assert line["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_a_failing_phase_is_logged_as_error_and_the_exception_goes_on(log: Path) -> None:
    with pytest.raises(KeyError), events.span("dependency_resolve", job="j"):
        raise KeyError("x")
    (line,) = _lines(log)
    assert line["status"] == "error" and line["attrs"]["error"] == "KeyError"


def test_path_comes_from_env_then_config_and_can_be_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'root = "/x"\n[events]\npath = "{tmp_path / "from-config.jsonl"}"\n')
    monkeypatch.setenv(events.ENV_CONFIG, str(cfg))
    monkeypatch.delenv(events.ENV_PATH, raising=False)
    assert events.path() == tmp_path / "from-config.jsonl"
    monkeypatch.setenv(events.ENV_PATH, "off")
    assert events.path() is None
    events.emit("prefetch", events.now(), events.now())  # nowhere to go: nothing written, nothing raised
    assert not (tmp_path / "from-config.jsonl").exists()
    monkeypatch.setenv(events.ENV_CONFIG, str(tmp_path / "missing.toml"))
    monkeypatch.delenv(events.ENV_PATH)
    assert events.path() is None
    daemon = tmp_path / "daemon.toml"  # a daemon started with --config FILE reads [events] from FILE
    daemon.write_text(f'[events]\npath = "{tmp_path / "daemon.jsonl"}"\n')
    events.use_config(daemon)
    try:
        assert events.path() == tmp_path / "daemon.jsonl"
    finally:
        events.use_config(None)
    assert events.path() is None


def test_an_unwritable_log_never_breaks_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(events.ENV_PATH, str(blocker / "sub" / "events.jsonl"))  # parent is a file
    with events.span("checkpoint_load") as attrs:
        attrs["ok"] = True
    assert blocker.read_text() == ""


def test_concurrent_writers_never_interleave_lines(log: Path) -> None:
    code = ("import sys; from bootseer import events\n"
            "for i in range(200):\n"
            "    events.emit('prefetch', events.now(), events.now(), job=sys.argv[1], i=i, pad='x' * 3000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{n}"], cwd=ROOT) for n in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    lines = _lines(log)  # every line parses: no torn or interleaved writes
    assert len(lines) == 800
    for n in range(4):
        assert sorted(x["attrs"]["i"] for x in lines if x["job"] == f"w{n}") == list(range(200))


def _write(path: Path, docs: list[dict]) -> None:
    with path.open("a") as fh:
        for d in docs:
            fh.write(json.dumps(d) + "\n")


def _ev(phase: str, start: float, end: float, job: str | None, **attrs: object) -> dict:
    # one host and boot; wall = mono + 1e9, as the kernel would give
    return {"v": 1, "phase": phase, "job": job, "component": "test", "status": "ok", "start": 1e9 + start,
            "end": 1e9 + end, "start_mono": start, "end_mono": end, "host": "node1", "boot_id": "b", "pid": 1,
            "attrs": attrs}


def _start_up(path: Path) -> None:
    """A job start as the parts would log it: the snapshotter's untagged mounts and prefetch of the job's
    image (two layers in parallel), the launcher's dependency resolve, the trainer's checkpoint load; plus
    an older start of the same image and another job that must stay out."""
    _write(path, [
        _ev("image_mount", 10.0, 11.0, None, image="reg/train:1", layer="sha256:" + "a" * 64),
        _ev("image_mount", 10.5, 12.0, None, image="reg/train:1", layer="sha256:" + "b" * 64),
        _ev("prefetch", 11.0, 14.0, None, image="reg/train:1", bytes=50 << 20),
        _ev("dependency_resolve", 13.0, 15.0, "job-1", image="reg/train:1", hit=True),
        _ev("checkpoint_load", 15.0, 20.0, "job-1", path="model.pt", bytes=1 << 30),
        _ev("image_mount", 10.0 - 5000, 11.0 - 5000, None, image="reg/train:1"),  # an older start
        _ev("image_mount", 12.0, 13.0, None, image="reg/other:2"),
        _ev("checkpoint_load", 30.0, 31.0, "job-0", path="other.pt"),
    ])


def test_profile_json_attributes_daemon_lines_by_image_and_counts_parallel_mounts_once(log: Path) -> None:
    _start_up(log)
    proc = _cli("profile", "--events", str(log), "--job", "job-1", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["job"] == "job-1"
    assert [e["phase"] for e in doc["events"]] == ["image_mount", "image_mount", "prefetch",
                                                     "dependency_resolve", "checkpoint_load"]
    assert doc["events"][0]["offset_s"] == 0 and doc["total_s"] == pytest.approx(10.0)
    phases = {p["phase"]: p for p in doc["phases"]}
    assert phases["image_mount"]["count"] == 2 and phases["image_mount"]["busy_s"] == pytest.approx(2.0)
    assert phases["checkpoint_load"]["first_start_s"] == pytest.approx(5.0)
    assert doc["covered_s"] == pytest.approx(10.0)


def test_profile_defaults_to_the_newest_job_and_prints_tables(log: Path) -> None:
    _start_up(log)
    with log.open("a") as fh:
        fh.write('{"phase": "image_pull", "start": 1\n')  # torn last line of a crashed writer
    proc = _cli("profile", env={events.ENV_PATH: str(log), "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "job-0" in proc.stdout and "other.pt" in proc.stdout and "model.pt" not in proc.stdout
    assert "1 unreadable lines skipped" in proc.stdout


def test_profile_writes_a_png_gantt_chart(log: Path, tmp_path: Path) -> None:
    _start_up(log)
    png = tmp_path / "out" / "startup.png"
    proc = _cli("profile", "--events", str(log), "--job", "job-1", "--png", str(png))
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and img.shape[0] > 200 and img.shape[1] == 1000


def test_profile_errors_are_clear(log: Path, tmp_path: Path) -> None:
    proc = _cli("profile", "--events", str(tmp_path / "nope.jsonl"))
    assert proc.returncode == 1 and "no event log at" in proc.stderr
    _start_up(log)
    proc = _cli("profile", "--events", str(log), "--job", "job-9")
    assert proc.returncode == 1 and "no events for job 'job-9'" in proc.stderr and "job-1" in proc.stderr
    proc = _cli("profile", env={events.ENV_PATH: "off"})
    assert proc.returncode == 2 and "--events" in proc.stderr


def test_ckptfs_reads_log_checkpoint_loads(log: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ckptfs
    from ckptfs.put import put

    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "model.pt").write_bytes(os.urandom(3 << 20))
    put(str(src), f"file://{tmp_path / 'store'}")
    monkeypatch.setenv(events.ENV_JOB, "job-c")
    with ckptfs.open(f"file://{tmp_path / 'store'}", "model.pt") as f:
        assert len(f.read()) == 3 << 20
    assert len(ckptfs.read_file(f"file://{tmp_path / 'store'}", "model.pt")) == 3 << 20
    lines = _lines(log)
    assert [(x["phase"], x["job"], x["attrs"]["path"], x["attrs"]["bytes"]) for x in lines] == [
        ("checkpoint_load", "job-c", "model.pt", 3 << 20)] * 2




def test_profile_joins_several_logs(tmp_path: Path) -> None:
    """The node's log (snapshotter) and the job container's own (ckptfs) give one timeline."""
    node, job = tmp_path / "node.jsonl", tmp_path / "job.jsonl"
    _write(node, [_ev("image_mount", 0.0, 1.0, None, image="reg/train:1"),
                  _ev("dependency_resolve", 1.0, 2.0, "job-2", image="reg/train:1")])
    _write(job, [_ev("checkpoint_load", 3.0, 4.0, "job-2", path="m.pt")])
    proc = _cli("profile", "--events", str(node), "--events", str(job), "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert [e["phase"] for e in doc["events"]] == ["image_mount", "dependency_resolve", "checkpoint_load"]
    assert doc["job"] == "job-2" and doc["total_s"] == pytest.approx(4.0)


