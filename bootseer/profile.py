"""``bootseer profile``: where did a job's start-up time go?  Reads the event log (:mod:`bootseer.events`),
picks one job's phases, prints them as a timeline and per-phase totals, and draws a Gantt chart (PNG).

Which lines belong to a job: the lines tagged with its id (``$BOOTSEER_JOB_ID`` in the launcher, the
training process, ``bootseer pull``), plus untagged lines of the shared daemons (the snapshotter's mounts
and prefetches) that name an image the job's own lines name, on a host where the job ran, and that end no
earlier than ``--lookback`` seconds before the job's first tagged line (a kubelet pull happens before the
job's own processes exist; an older pull of the same image belongs to an older job).

Placing lines on one time axis: lines of one host and boot are placed by their monotonic stamps shifted by
that (host, boot)'s median wall-minus-monotonic offset, so a wall clock step in one process cannot reorder
them; lines from different hosts are placed by wall time.  Durations are always monotonic.
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from bootseer import events, log
from bootseer.events import PHASES, Event, EventLogError

DEFAULT_LOOKBACK = 900.0


@dataclass
class Placed:
    ev: Event
    offset: float  # seconds from the profile's t0
    duration: float

    @property
    def end(self) -> float:
        return self.offset + self.duration


@dataclass
class Profile:
    job: str | None
    t0: float  # wall time of the first phase's start
    placed: list[Placed]
    skipped_lines: int

    @property
    def total(self) -> float:
        return max((p.end for p in self.placed), default=0.0)

    def phases(self) -> list[dict[str, Any]]:
        """Per phase: how many lines, the union of their intervals (``busy``: parallel layer mounts are not
        counted twice), first start and last end."""
        names = sorted({p.ev.phase for p in self.placed}, key=_phase_order)
        out = []
        for name in names:
            ps = [p for p in self.placed if p.ev.phase == name]
            out.append({
                "phase": name,
                "count": len(ps),
                "errors": sum(1 for p in ps if p.ev.status != "ok"),
                "busy_s": round(_union(ps), 6),
                "first_start_s": round(min(p.offset for p in ps), 6),
                "last_end_s": round(max(p.end for p in ps), 6),
            })
        return out

    def covered(self) -> float:
        """Seconds of the start-up during which at least one phase ran (the rest: time nothing logged)."""
        return _union(self.placed)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "t0": self.t0,
            "total_s": round(self.total, 6),
            "covered_s": round(self.covered(), 6),
            "skipped_lines": self.skipped_lines,
            "phases": self.phases(),
            "events": [{**p.ev.to_json(), "offset_s": round(p.offset, 6)} for p in self.placed],
        }


def _phase_order(name: str) -> tuple[int, str]:
    return (PHASES.index(name) if name in PHASES else len(PHASES), name)


def _union(ps: list[Placed]) -> float:
    total, cur_start, cur_end = 0.0, None, None
    for p in sorted(ps, key=lambda p: p.offset):
        if cur_end is None or p.offset > cur_end:
            if cur_end is not None and cur_start is not None:
                total += cur_end - cur_start
            cur_start, cur_end = p.offset, p.end
        else:
            cur_end = max(cur_end, p.end)
    if cur_end is not None and cur_start is not None:
        total += cur_end - cur_start
    return total


def _images(ev: Event) -> set[str]:
    out = set()
    for key in ("image", "base_image", "resolved_image"):
        v = ev.attrs.get(key)
        if isinstance(v, str) and v:
            out.add(v)
    return out


def select(evs: list[Event], job: str | None, lookback: float = DEFAULT_LOOKBACK) -> tuple[str | None, list[Event]]:
    """The job's lines (see the module doc).  ``job=None``: the job of the newest tagged line; a log without
    any tagged line is one anonymous start-up and is taken whole."""
    tagged = [e for e in evs if e.job]
    if job is None:
        if not tagged:
            return None, list(evs)
        job = max(tagged, key=lambda e: e.end).job
    mine = [e for e in evs if e.job == job]
    if not mine:
        known = sorted({e.job for e in tagged if e.job})
        hint = f"; jobs in the log: {', '.join(known[-10:])}" if known else "; no line names a job"
        raise EventLogError(f"no events for job {job!r}{hint}")
    images = set().union(*(_images(e) for e in mine))
    hosts = {e.host for e in mine}
    first, last = min(e.start for e in mine), max(e.end for e in mine)
    shared = [e for e in evs if not e.job and e.host in hosts and _images(e) & images
              and e.end >= first - lookback and e.start <= last]
    return job, mine + shared


def place(evs: list[Event]) -> tuple[float, list[Placed]]:
    """Put the lines on one axis (see the module doc); returns t0 (wall) and the lines sorted by start."""
    offsets: dict[tuple[str, str], float] = {}
    for key in {(e.host, e.boot_id) for e in evs if e.boot_id and e.start_mono is not None}:
        offsets[key] = statistics.median(e.start - e.start_mono for e in evs
                                         if (e.host, e.boot_id) == key and e.start_mono is not None)

    def wall_start(e: Event) -> float:
        off = offsets.get((e.host, e.boot_id))
        return e.start_mono + off if off is not None and e.start_mono is not None else e.start

    if not evs:
        return 0.0, []
    t0 = min(wall_start(e) for e in evs)
    placed = [Placed(e, wall_start(e) - t0, e.duration) for e in evs]
    placed.sort(key=lambda p: (p.offset, _phase_order(p.ev.phase)))
    return t0, placed


def build(sources: Path | list[Path], job: str | None = None, lookback: float = DEFAULT_LOOKBACK) -> Profile:
    """The profile of one job from one or more event logs (say, the node's and the training container's)."""
    evs: list[Event] = []
    skipped = 0
    for source in [sources] if isinstance(sources, Path) else sources:
        got, bad = events.read(source)
        evs += got
        skipped += bad
    if not evs:
        names = ", ".join(str(x) for x in ([sources] if isinstance(sources, Path) else sources))
        raise EventLogError(f"event log {names} has no events" + (f" ({skipped} unreadable lines)" if skipped
                                                                  else ""))
    job, chosen = select(evs, job, lookback)
    t0, placed = place(chosen)
    return Profile(job, t0, placed, skipped)


# -- output ----------------------------------------------------------------------------------------------

_DETAIL_KEYS = ("image", "layer", "path", "bytes", "ranges", "key", "hit", "resolved_image", "error")


def _detail(ev: Event) -> str:
    parts = []
    for k in _DETAIL_KEYS:
        if k == "image" and "layer" in ev.attrs:
            continue  # a layer's line: the image is on the pull's line already
        if k in ev.attrs:
            v = ev.attrs[k]
            if k == "bytes" and isinstance(v, int):
                v = _human_bytes(v)
            elif k == "layer" and isinstance(v, str) and len(v) > 19:
                v = v[:19]
            parts.append(f"{k}={v}")
    return " ".join(parts)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render(prof: Profile, console: Console) -> None:
    title = f"start-up of job {prof.job}" if prof.job else "start-up (no job id in the log)"
    timeline = Table(title=title, title_justify="left")
    for col, just in (("start", "right"), ("dur", "right"), ("phase", "left"), ("component", "left"),
                      ("status", "left"), ("detail", "left")):
        timeline.add_column(col, justify=just)  # type: ignore[arg-type]
    for p in prof.placed:
        status = p.ev.status if p.ev.status == "ok" else f"[red]{p.ev.status}[/red]"
        timeline.add_row(f"+{p.offset:.3f}s", f"{p.duration:.3f}s", p.ev.phase, p.ev.component, status,
                         _detail(p.ev))
    console.print(timeline)
    summary = Table(title="per phase", title_justify="left")
    for col in ("phase", "count", "busy", "first start", "last end", "share of start-up"):
        summary.add_column(col, justify="left" if col == "phase" else "right")
    total = prof.total or 1.0
    for ph in prof.phases():
        summary.add_row(ph["phase"], str(ph["count"]), f"{ph['busy_s']:.3f}s", f"+{ph['first_start_s']:.3f}s",
                        f"+{ph['last_end_s']:.3f}s", f"{100 * ph['busy_s'] / total:.0f}%")
    shares = sum(ph["busy_s"] for ph in prof.phases()) / total
    if shares > 1.005:
        summary.caption = (f"shares add up to {100 * shares:.0f}%: phases overlap (they run in parallel, e.g. "
                           "prefetch during the pull); each share is that phase's busy time over the whole span")
        summary.caption_justify = "left"
    console.print(summary)
    console.print(f"start-up span {prof.total:.3f}s, of which {prof.covered():.3f}s inside a logged phase"
                  + (f"; {prof.skipped_lines} unreadable lines skipped" if prof.skipped_lines else ""))


_COLORS = {"image_pull": "#4C72B0", "image_mount": "#64B5CD", "prefetch": "#55A868",
           "dependency_resolve": "#DD8452", "checkpoint_load": "#C44E52"}


def gantt(prof: Profile, out: Path) -> None:
    """One bar per line, grouped by phase (rows in the timeline's phase order), x in seconds from t0.
    matplotlib's Agg backend: no display needed, and labels/axes without re-implementing a plotting
    library (imported here only, so the daemons never pay for it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted(prof.placed, key=lambda p: (_phase_order(p.ev.phase), p.offset))
    height = max(2.5, 0.32 * len(rows) + 1.4)
    fig, ax = plt.subplots(figsize=(10, height), dpi=100)
    try:
        labels = []
        for i, p in enumerate(rows):
            color = _COLORS.get(p.ev.phase, "#8172B3")
            ax.barh(i, max(p.duration, prof.total * 0.002), left=p.offset, color=color,
                    edgecolor="black" if p.ev.status != "ok" else color, hatch="//" if p.ev.status != "ok" else None)
            layer, path = p.ev.attrs.get("layer"), p.ev.attrs.get("path")
            extra = str(layer)[:19] if layer else ("…" + str(path)[-24:] if path and len(str(path)) > 25
                                                   else str(path or ""))
            labels.append(f"{p.ev.phase} {extra}".strip())
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the first phase started")
        ax.set_xlim(0, max(prof.total, 1e-3) * 1.02)
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(f"BootSeer start-up profile: job {prof.job}" if prof.job else "BootSeer start-up profile")
        present = [ph for ph in dict.fromkeys(p.ev.phase for p in rows)]
        ax.legend(handles=[Patch(color=_COLORS.get(ph, "#8172B3"), label=ph) for ph in present],
                  loc="upper right", fontsize=8)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        fig.savefig(tmp, format="png")
        tmp.replace(out)
    finally:
        plt.close(fig)


def profile(
    events_files: list[Path] = typer.Option(None, "--events", help="Event log, repeatable (the node's and a "
                                            "container's); default: $BOOTSEER_EVENTS, else [events] path."),
    job: str = typer.Option(None, "--job", help="Job id (default: the job of the newest tagged line)."),
    png: Path = typer.Option(None, "--png", help="Write a Gantt chart of the phases to this PNG file."),
    as_json: bool = typer.Option(False, "--json", help="Print the profile as JSON instead of tables."),
    lookback: float = typer.Option(DEFAULT_LOOKBACK, help="Seconds before the job's first line in which a "
                                   "daemon's untagged lines for the job's image still count."),
) -> None:
    """Per-phase timeline of a job's start-up (image pull/mount, prefetch, dependency resolve, checkpoint
    load) from the BootSeer event log, as tables and a PNG Gantt chart."""
    default = events.path()
    sources = list(events_files or ([default] if default is not None else []))
    if not sources:
        typer.echo(f"bootseer profile: no event log: pass --events FILE, or set {events.ENV_PATH}", err=True)
        raise typer.Exit(2)
    try:
        prof = build(sources, job, lookback)
    except EventLogError as e:
        typer.echo(f"bootseer profile: {e}", err=True)
        raise typer.Exit(1) from None
    if png is not None:
        gantt(prof, png)
    if as_json:
        doc = prof.to_json()
        if png is not None:
            doc["png"] = str(png)
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        console = log.console()
        render(prof, console)
        if png is not None:
            console.print(f"Gantt chart: {png}")
