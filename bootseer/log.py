"""Logging set-up shared by every daemon and command: text for people, JSON lines for collectors.

Credentials must never reach a log: ``redact`` is applied to every formatted record, so a URL with
``user:password@`` or an ``Authorization`` header value that slips into a message is masked anyway.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

_SECRET_PATTERNS = [
    (re.compile(r"(?i)(authorization:\s*)(bearer|basic)\s+[^\s'\",]+"), r"\1\2 ***"),
    (re.compile(r"(?i)(\"?(?:password|secret|token|auth|identitytoken)\"?\s*[:=]\s*)\"?[^\s'\",}]+\"?"), r"\1***"),
    (re.compile(r"(https?://)[^/\s:@]+:[^/\s@]+@"), r"\1***:***@"),
]


def redact(text: str) -> str:
    """Mask credentials in ``text`` (basic/bearer headers, password fields, user:pass@ in URLs)."""
    for pattern, repl in _SECRET_PATTERNS:
        text = pattern.sub(repl, text)
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class _JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra={"event": ..., ...}`` fields are carried through."""

    _RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in self._RESERVED and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(doc, default=str))


def setup(level: str = "info", fmt: str = "text", stream: object = None) -> None:
    """Configure the root logger once for a process (idempotent: replaces earlier handlers)."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
        logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


# Width of a console that is not a terminal: wide enough that no table or line of ours wraps, so a pipe or a
# CI log gets whole lines (rich would wrap at 80 columns, splitting digests, URIs and addresses).
NOT_A_TERMINAL_WIDTH = 1000


def console(stderr: bool = False, file: Any = None, **kw: Any) -> Any:
    """A rich Console for command output: the terminal's width on a terminal; off a terminal (pipe, file, CI
    log) no wrapping unless ``COLUMNS`` asks for a width."""
    from rich.console import Console

    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if not tty and not os.environ.get("COLUMNS"):
        kw.setdefault("width", NOT_A_TERMINAL_WIDTH)
        kw.setdefault("soft_wrap", True)
    return Console(file=file, stderr=stderr, **kw)


_OS_REASON = re.compile(r"\[Errno -?\d+\] ([^'\"\)\]]+)")


def error_text(e: BaseException) -> str:
    """``str(e)`` for a person: when the cause is a host that cannot be reached (refused, unknown name, timed
    out), say that and the system's reason instead of the nested repr of requests and urllib3."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        kind = type(cause).__name__
        if type(cause).__module__.startswith("requests") and kind in ("ConnectionError", "ConnectTimeout",
                                                                        "ReadTimeout", "Timeout", "SSLError",
                                                                        "ProxyError"):
            url = getattr(getattr(cause, "request", None), "url", None) or ""
            m = re.match(r"^[a-z]+://([^/]+)", url)
            host = m.group(1) if m else "the registry"
            text = str(cause)
            if kind == "SSLError":
                reason = "TLS handshake failed (an http:// registry needs --plain-http or a hosts.toml)"
            elif "Timeout" in kind or "timed out" in text:
                reason = "timed out"
            else:
                found = _OS_REASON.search(text)
                reason = found.group(1).strip().lower() if found else "connection failed"
            return f"cannot reach {host}: {reason}"
        cause = cause.__cause__ or cause.__context__
    return str(e)
