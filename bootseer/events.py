"""The start-up event log: one JSON object per line, one line per finished phase, appended by every BootSeer
daemon and tool that takes part in starting a job (image pull and mount, prefetch, dependency resolve,
checkpoint load).  ``bootseer profile`` turns it into a per-phase timeline and a Gantt chart.

    from bootseer import events
    with events.span("image_pull", image=ref) as attrs:   # one line when the block ends (status ok/error)
        ...
        attrs["bytes"] = n                                 # attributes known only at the end

    events.emit("prefetch", start, end, image=ref)         # a phase timed elsewhere (events.now() stamps)

Why a file and not the metrics endpoint: a profile needs every individual phase of one job with its start
and end, across several processes (snapshotter, launcher, training process), while Prometheus keeps only
aggregates.  Appending a line is cheap enough for every pull and every checkpoint load.

Where lines go: ``$BOOTSEER_EVENTS`` if set (empty or ``off``: nowhere), else ``path`` in the ``[events]``
table of the daemon's config file (:func:`use_config`), or of ``$BOOTSEER_CONFIG`` (default
``/etc/bootseer/config.toml``), else nowhere.  Off by default, so a
library use of ckptfs on a laptop writes no surprise files.

Which job: ``job=`` if given, else ``$BOOTSEER_JOB_ID`` (set it in the job's environment: the launcher, the
training process and ``bootseer pull`` then tag their lines).  Daemons that serve many jobs (the
snapshotter) write untagged lines naming the ``image``; the profile attributes those to a job whose own lines
name that image.

A line records both clocks: wall time (``start``/``end``, seconds since the epoch) to order lines from
different hosts, and ``CLOCK_MONOTONIC`` (``start_mono``/``end_mono``) with the kernel's ``boot_id``, exact for
durations and, on one host within one boot, for ordering across processes even if the wall clock steps.

Writing never raises: a full disk or a read-only path costs the profile, not the pull or the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_PATH = "BOOTSEER_EVENTS"
ENV_JOB = "BOOTSEER_JOB_ID"
ENV_CONFIG = "BOOTSEER_CONFIG"
DEFAULT_CONFIG = Path("/etc/bootseer/config.toml")
VERSION = 1

# The phases the profile knows by name (others are shown as they come, after these).
PHASES = ("image_pull", "image_mount", "prefetch", "dependency_resolve", "checkpoint_load")

_lock = threading.Lock()
_warned: set[str] = set()
_boot_id: str | None = None


@dataclass(frozen=True)
class Stamp:
    """A moment on both clocks."""

    wall: float
    mono: float


def now() -> Stamp:
    return Stamp(time.time(), time.monotonic())


def boot_id() -> str:
    """The kernel's id of this boot: monotonic stamps compare only within one (host, boot)."""
    global _boot_id
    if _boot_id is None:
        try:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            _boot_id = ""
    return _boot_id


_config_file: Path | None = None


def use_config(path: str | os.PathLike[str] | None) -> None:
    """Read ``[events] path`` from this file (a daemon's ``--config``) instead of ``$BOOTSEER_CONFIG`` or the
    default; ``None`` goes back to those.  ``$BOOTSEER_EVENTS`` still wins."""
    global _config_file
    _config_file = Path(path) if path is not None else None


def _config_path() -> Path | None:
    cfg = _config_file or Path(os.environ.get(ENV_CONFIG) or DEFAULT_CONFIG)
    try:
        doc = tomllib.loads(cfg.read_text())
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as e:
        _warn_once(str(cfg), "event log: cannot read %s: %s", cfg, e)
        return None
    table = doc.get("events")
    if isinstance(table, dict) and isinstance(table.get("path"), str) and table["path"]:
        return Path(table["path"])
    return None


def path() -> Path | None:
    """Where this process appends events now (None: nowhere).  Read on every call, so a test or a launcher
    can set ``$BOOTSEER_EVENTS`` after import."""
    env = os.environ.get(ENV_PATH)
    if env is not None:
        return None if env.strip() in ("", "off") else Path(env)
    return _config_path()


def enabled() -> bool:
    return path() is not None


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg, *args)


def emit(phase: str, start: Stamp, end: Stamp, *, job: str | None = None, component: str | None = None,
         status: str = "ok", **attrs: Any) -> None:
    """Append one finished phase.  ``attrs`` must be JSON-serialisable (others are written with ``str``)."""
    target = path()
    if target is None:
        return
    if not phase or not isinstance(phase, str):
        raise ValueError("phase must be a non-empty string")
    doc = {
        "v": VERSION,
        "phase": phase,
        "job": job if job is not None else (os.environ.get(ENV_JOB) or None),
        "component": component or _component(),
        "status": status,
        "start": round(start.wall, 6),
        "end": round(end.wall, 6),
        "start_mono": round(start.mono, 6),
        "end_mono": round(end.mono, 6),
        "host": socket.gethostname(),
        "boot_id": boot_id(),
        "pid": os.getpid(),
        "attrs": attrs,
    }
    line = (json.dumps(doc, default=str, separators=(",", ":")) + "\n").encode()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND + one write(): lines from concurrent processes never interleave on a local filesystem
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            with _lock:
                os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        _warn_once(str(target), "event log %s not written: %s", target, e)


@contextlib.contextmanager
def span(phase: str, *, job: str | None = None, component: str | None = None,
         **attrs: Any) -> Iterator[dict[str, Any]]:
    """Time the block as ``phase``; yields the attribute dict so the block can add to it.  An exception
    is recorded as ``status: error`` with its type, then re-raised."""
    start = now()
    status = "ok"
    try:
        yield attrs
    except BaseException as e:
        status = "error"
        attrs.setdefault("error", type(e).__name__)
        raise
    finally:
        emit(phase, start, now(), job=job, component=component, status=status, **attrs)


def _component() -> str:
    """``bootseer <sub>`` for the CLI's daemons and tools, else the program's name (``python3``, ``torchrun``)."""
    import sys

    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog == "bootseer" and len(sys.argv) > 1:
        return f"bootseer {sys.argv[1]}"
    return prog


# -- reading ---------------------------------------------------------------------------------------------


@dataclass
class Event:
    phase: str
    start: float
    end: float
    start_mono: float | None
    end_mono: float | None
    job: str | None
    component: str
    status: str
    host: str
    boot_id: str
    pid: int | None
    attrs: dict[str, Any]

    @property
    def duration(self) -> float:
        """Monotonic duration when both stamps are there (immune to wall clock steps), else wall."""
        if self.start_mono is not None and self.end_mono is not None:
            return max(0.0, self.end_mono - self.start_mono)
        return max(0.0, self.end - self.start)

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase, "job": self.job, "component": self.component, "status": self.status,
                "start": self.start, "end": self.end, "duration": round(self.duration, 6), "host": self.host,
                "pid": self.pid, "attrs": self.attrs}


class EventLogError(ValueError):
    pass


def read(source: Path) -> tuple[list[Event], int]:
    """All events in ``source`` and the number of lines skipped as unreadable (a torn last line after a
    crash, a foreign line): a damaged log still gives a profile of what it holds."""
    try:
        text = source.read_text(errors="replace")
    except FileNotFoundError:
        raise EventLogError(f"no event log at {source} (set {ENV_PATH} or [events] path)") from None
    except OSError as e:
        raise EventLogError(f"cannot read event log {source}: {e}") from e
    out: list[Event] = []
    skipped = 0
    for raw in text.splitlines():
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
            attrs = d.get("attrs") or {}
            if not isinstance(attrs, dict):
                raise TypeError("attrs")
            ev = Event(phase=str(d["phase"]), start=float(d["start"]), end=float(d["end"]),
                       start_mono=_opt_float(d.get("start_mono")), end_mono=_opt_float(d.get("end_mono")),
                       job=d.get("job") or None, component=str(d.get("component") or "?"),
                       status=str(d.get("status") or "ok"), host=str(d.get("host") or ""),
                       boot_id=str(d.get("boot_id") or ""), pid=d.get("pid"), attrs=attrs)
        except (ValueError, KeyError, TypeError):
            skipped += 1
            continue
        out.append(ev)
    return out, skipped


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
