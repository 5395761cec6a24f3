"""``/etc/bootseer/config.toml`` for ``bootseer snapshotter serve``.  Every key is optional::

    root = "/var/lib/bootseer/snapshotter"
    address = "/run/bootseer/snapshotter.sock"
    log_level = "info"          # debug | info | warning | error
    log_format = "text"         # text | json
    metrics_address = ""        # host:port for Prometheus /metrics; empty = off

(the same keys may instead sit in a ``[snapshotter]`` table of a config file shared with other daemons).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


@dataclass
class Config:
    """The daemon's settings; the defaults are the paths the systemd unit and containerd snippet use."""

    root: Path = Path("/var/lib/bootseer/snapshotter")
    address: Path = Path("/run/bootseer/snapshotter.sock")
    log_level: str = "info"
    log_format: str = "text"
    metrics_address: str = ""

    @classmethod
    def load(cls, path: Path | None, **overrides: Any) -> Config:
        """Read ``path`` (None: defaults only), then apply non-None ``overrides`` (the CLI flags).  Unknown
        keys are an error: a typo in a config file should not silently fall back to a default."""
        doc: dict[str, Any] = {}
        if path is not None:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ValueError(f"config {path}: {e}") from e
        # one file may configure several BootSeer daemons: other parts' tables are theirs to check, and a
        # [snapshotter] table overrides the top-level keys
        section = doc.get("snapshotter", {})
        doc = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        if isinstance(section, dict):
            doc.update(section)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"config {path}: unknown keys {', '.join(unknown)}")
        doc.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**doc)
        cfg.root, cfg.address = Path(cfg.root), Path(cfg.address)
        if cfg.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(f"log_level must be debug, info, warning or error, not {cfg.log_level!r}")
        if cfg.metrics_address and not cfg.metrics_address.rpartition(":")[2].isdigit():
            raise ValueError(f"metrics_address must be host:port, not {cfg.metrics_address!r}")
        if cfg.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {cfg.log_format!r}")
        return cfg
