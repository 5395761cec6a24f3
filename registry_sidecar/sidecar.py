"""The registry sidecar service: distribution's notification webhooks in, EROFS blobs and index referrers out.

distribution (``notifications.endpoints``) POSTs envelopes of events
(``application/vnd.docker.distribution.events.v1+json``) for every push and pull.  We keep the ``push`` events of
*manifests with a tag* — a newly pushed image tag; child manifests of an index arrive untagged and are handled
through their index — and ignore our own writes (the ``sha256-<hex>`` referrers tags, untagged artifact
manifests, and anything with our User-Agent), so conversion cannot feed on itself.

Each kept event becomes a job in the persistent queue (:mod:`registry_sidecar.state`) *before* the webhook is
answered, so a crash after ``200`` loses nothing, and the registry's own retry covers a crash before it.
Workers take due jobs and run :class:`registry_sidecar.convert.ImageConverter`:

* an index is resolved to its platform manifests (``platforms``, default every real platform it lists);
* a manifest that already has an index is not converted again (the job, then the referrer, say so);
* transient failures (registry 5xx, network, mkfs) are retried with exponential backoff up to
  ``max_attempts``; layer-level problems (hostile, corrupt, unknown type) are not failures: the layer is
  listed as skipped in the index and the image is indexed for the rest.

The HTTP side (``/events``, ``/healthz``, ``/metrics``) is a thin adapter over :class:`Sidecar`'s methods.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import re
import signal
import sys
import threading
import time
import tomllib
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bootseer import __version__
from bootseer.index import DEFAULT_CHUNK_SIZE, FORMAT_VERSION
from bootseer.reference import Reference, is_loopback
from bootseer.registry import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    NotFound,
    Platform,
    RegistryClient,
    RegistryError,
)
from bootseer.trust import Signer
from registry_sidecar.convert import ConvertOptions, ImageConverter, ImageResult
from registry_sidecar.state import Job, QueueFull, State

log = logging.getLogger(__name__)

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
USER_AGENT = f"bootseer-sidecar/{__version__}"
_REFERRERS_TAG = re.compile(r"^[a-z0-9]+-[0-9a-f]{32,}(\.sig)?$")  # referrers tags and cosign signature tags


@dataclass
class SidecarConfig:
    listen: str = "127.0.0.1:8090"  # host:port for /events, /healthz, /metrics (port 0: any)
    registry: str = "127.0.0.1:5000"  # host:port the sidecar reads from and pushes to
    state_dir: str = "/var/lib/bootseer-sidecar"
    plain_http: bool = False
    insecure: bool = False
    hosts_dir: str | None = None
    docker_config: str | None = None
    platforms: list[str] = field(default_factory=list)  # of an index; empty: all real platforms
    workers: int = 1
    max_attempts: int = 8
    retry_base: float = 2.0  # seconds; doubled per attempt
    retry_max: float = 600.0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compression: str = "lz4hc,4"  # mkfs.erofs -z (see registry_sidecar.convert)
    index_version: int = FORMAT_VERSION  # 3: chunks sent as zstd frames of a wire blob; 2: the EROFS blob as stored
    wire_level: int = 3  # zstd level of the v3 wire frames
    parallel: int = 2
    nice: int = 0
    max_bytes: int | None = None
    allow_devices: bool = True
    # who may POST /events and GET /jobs from off this host: a bearer token read from this file (a Kubernetes
    # Secret).  Loopback peers (the registry in the same pod or on the same host) need none; without a token,
    # every other peer is refused — /jobs names private repositories, /events spends the push credentials.
    token_file: str | None = None
    max_queued: int = 10_000  # queued jobs beyond this answer 503: the registry retries the delivery later
    max_crashes: int = 3  # a job running while the sidecar died this many times (OOM-killed mid-conversion) fails
    # PKCS#8 PEM ECDSA P-256 key that signs every index pushed (cosign format, see bootseer.trust); nodes with
    # trust mode "require" (the generated configs' default) ignore unsigned indexes.  `bootseer sidecar keygen`.
    signing_key: str | None = None

    @classmethod
    def load(cls, path: Path | str | None, **overrides: Any) -> SidecarConfig:
        """From a TOML file (keys as the fields above), then non-None ``overrides`` (CLI flags)."""
        doc: dict[str, Any] = {}
        if path:
            try:
                doc = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise ValueError(f"sidecar config {path}: {e}") from e
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"sidecar config {path}: unknown keys {unknown}")
        doc.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**doc)

    def token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            tok = Path(self.token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"sidecar token_file {self.token_file}: {e.strerror or e}") from e
        if len(tok) < 16:
            raise ValueError(f"sidecar token_file {self.token_file}: a token of at least 16 characters is required")
        return tok

    def convert_options(self) -> ConvertOptions:
        return ConvertOptions(chunk_size=self.chunk_size, compression=self.compression, parallel=self.parallel,
                              nice=self.nice, max_bytes=self.max_bytes, allow_devices=self.allow_devices,
                              workdir=Path(self.state_dir) / "scratch", index_version=self.index_version,
                              wire_level=self.wire_level)


@dataclass(frozen=True)
class Push:
    repo: str
    digest: str
    tag: str
    media_type: str


def parse_events(body: bytes, own_agent: str = USER_AGENT) -> tuple[list[Push], int]:
    """The image-tag pushes in a notification envelope, and how many events were ignored."""
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise ValueError(f"event envelope is not JSON: {e}") from e
    events = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(events, list):
        raise ValueError("event envelope has no 'events' list")
    out: list[Push] = []
    for ev in events:
        target = ev.get("target") or {}
        agent = (ev.get("request") or {}).get("useragent", "")
        tag = target.get("tag") or ""
        if (ev.get("action") != "push" or target.get("mediaType") not in MANIFEST_TYPES or not tag
                or _REFERRERS_TAG.match(tag) or agent.startswith(own_agent.split("/")[0])
                or not target.get("repository") or not target.get("digest")):
            continue
        out.append(Push(target["repository"], target["digest"], tag, target["mediaType"]))
    return out, len(events) - len(out)


class _QueueCollector(Collector):
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("bootseer_sidecar_jobs", "Conversion jobs by state", labels=["state"])
        for s, n in self.state.counts().items():
            g.add_metric([s], n)
        yield g
        yield GaugeMetricFamily("bootseer_sidecar_known_layers", "Layers in the layer map",
                                value=self.state.layer_count())


class Sidecar:
    def __init__(self, cfg: SidecarConfig, client: RegistryClient | None = None) -> None:
        self.cfg = cfg
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.state = State(Path(cfg.state_dir) / "sidecar.sqlite")
        self.client = client or RegistryClient(hosts_dir=cfg.hosts_dir, credentials=cfg.docker_config,
                                               plain_http=cfg.plain_http, insecure=cfg.insecure,
                                               user_agent=USER_AGENT)
        signer = Signer(cfg.signing_key) if cfg.signing_key else None
        if signer is None:
            log.warning("no signing_key: indexes are pushed unsigned, and nodes that require signatures "
                        "will not use them (docs/security.md)")
        self.converter = ImageConverter(self.client, cfg.convert_options(), self.state, signer)
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.metrics = CollectorRegistry()
        self.m_events = Counter("bootseer_sidecar_events", "Registry events received", ["kind"],
                                registry=self.metrics)
        self.m_jobs = Counter("bootseer_sidecar_job_runs", "Job runs by outcome", ["outcome"], registry=self.metrics)
        self.m_layers = Counter("bootseer_sidecar_layers", "Layers handled by status", ["status"],
                                registry=self.metrics)
        self.m_bytes_in = Counter("bootseer_sidecar_layer_bytes_in", "Compressed layer bytes converted",
                                  registry=self.metrics)
        self.m_bytes_out = Counter("bootseer_sidecar_erofs_bytes_out", "EROFS bytes produced", registry=self.metrics)
        self.m_seconds = Histogram("bootseer_sidecar_image_seconds", "Time to index one image manifest",
                                   buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800), registry=self.metrics)
        self.metrics.register(_QueueCollector(self.state))
        requeued, crashed = self.state.requeue_running(cfg.max_crashes, time.time() + cfg.retry_base)
        if requeued:
            log.info("requeued %d job(s) interrupted by a restart", requeued)
        for job in crashed:
            log.error("%s@%s failed for good: running when the sidecar died %d times (killed while converting?)",
                      job.repo, job.digest, cfg.max_crashes)

    # ------------------------------------------------------------------------------------------- events
    def handle_events(self, body: bytes) -> int:
        """Queue the image pushes of one webhook delivery; returns how many new jobs were queued."""
        pushes, ignored = parse_events(body)
        self.m_events.labels("ignored").inc(ignored)
        queued = 0
        for p in pushes:
            self.m_events.labels("image_push").inc()
            if self.state.enqueue(p.repo, p.digest, p.tag, p.media_type, max_queued=self.cfg.max_queued):
                queued += 1
                log.info("queued %s:%s (%s)", p.repo, p.tag, p.digest)
        if queued:
            with self._wake:
                self._wake.notify_all()
        return queued

    # --------------------------------------------------------------------------------------------- jobs
    def process_one(self) -> Job | None:
        """Run one due job, if any; returns it (with its new state)."""
        job = self.state.claim()
        if job is None:
            return None
        t0 = time.monotonic()
        try:
            results = self._convert(job)
        except Exception as e:
            self._failed(job, e)
        else:
            summary = [r.summary() for r in results]
            for r in results:
                for lr in r.layers:
                    self.m_layers.labels(lr.status).inc()
                    if lr.status == "converted" and lr.blob:
                        self.m_bytes_in.inc(lr.size)
                        self.m_bytes_out.inc(lr.blob.blob.size)
            self.state.complete(job.id, json.dumps([{k: s[k] for k in ("manifest", "index", "already_indexed",
                                                                       "converted", "reused", "skipped")}
                                                    for s in summary]))
            self.m_jobs.labels("done").inc()
            self.m_seconds.observe(time.monotonic() - t0)
        return self.state.job(job.id)

    def _convert(self, job: Job) -> list[ImageResult]:
        ref = Reference.parse(f"{self.cfg.registry}/{job.repo}@{job.digest}")
        top = self.client.get_manifest(ref)
        if top.media_type in IMAGE_MANIFEST_TYPES:
            manifests = [top]
        elif top.media_type in INDEX_TYPES:
            wanted = [Platform.parse(p) for p in self.cfg.platforms]
            manifests = []
            for d in top.manifests:
                p = d.platform or {}
                if d.media_type not in IMAGE_MANIFEST_TYPES or p.get("os") in (None, "unknown"):
                    continue  # attestations, nested indexes
                if wanted and not any(w.matches(p) for w in wanted):
                    continue
                manifests.append(self.client.get_manifest(ref.with_digest(d.digest)))
        else:
            raise NotFound(f"{ref}: not an image ({top.media_type})")
        return [self.converter.convert(ref.with_digest(m.digest).with_tag(job.tag or None), manifest=m)
                for m in manifests]

    def _failed(self, job: Job, e: Exception) -> None:
        permanent = isinstance(e, NotFound) or (isinstance(e, RegistryError) and e.status in (400, 403, 405))
        err = f"{e.__class__.__name__}: {e}"
        if permanent or job.attempts >= self.cfg.max_attempts:
            log.error("%s@%s failed for good after %d attempt(s): %s", job.repo, job.digest, job.attempts, err)
            self.state.fail(job.id, err)
            self.m_jobs.labels("failed").inc()
            return
        delay = min(self.cfg.retry_max, self.cfg.retry_base * 2 ** (job.attempts - 1))
        log.warning("%s@%s attempt %d failed (%s); retrying in %.0fs", job.repo, job.digest, job.attempts, err, delay)
        if not isinstance(e, RegistryError):
            log.debug("%s", traceback.format_exc())
        self.state.retry(job.id, err, time.time() + delay)
        self.m_jobs.labels("retry").inc()

    def _worker(self) -> None:
        while not self._stop.is_set():
            try:
                if self.process_one() is not None:
                    continue
            except Exception:  # a bug in the loop itself must not kill the worker
                log.exception("sidecar worker error")
            with self._wake:
                due = self.state.next_due()
                timeout = None if due is None else max(0.0, due - time.time())
                if not self._stop.is_set() and (timeout is None or timeout > 0):
                    self._wake.wait(timeout=timeout)  # woken by a new event or stop; wakes when a retry is due

    def start(self) -> None:
        for i in range(max(1, self.cfg.workers)):
            t = threading.Thread(target=self._worker, name=f"sidecar-worker-{i}", daemon=True)
            t.start()
            self._workers.append(t)

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        for t in self._workers:
            t.join(timeout)
        self.state.close()

    def health(self) -> tuple[bool, dict[str, Any]]:
        alive = sum(t.is_alive() for t in self._workers)
        try:
            counts = self.state.counts()
            ok = alive == len(self._workers) and alive > 0
        except Exception as e:  # the database is gone
            return False, {"status": "error", "error": str(e)}
        return ok, {"status": "ok" if ok else "degraded", "workers": alive, "jobs": counts,
                    "registry": self.cfg.registry, "version": __version__}


# ------------------------------------------------------------------------------------------- HTTP adapter
class _Handler(BaseHTTPRequestHandler):
    sidecar: Sidecar
    token: str | None
    protocol_version = "HTTP/1.1"
    server_version = f"bootseer-sidecar/{__version__}"
    timeout = 30  # seconds per socket operation: a peer that stops sending frees its thread

    def _authorized(self) -> bool:
        """Loopback peers always; others only with the configured bearer token (compared in constant time)."""
        if is_loopback(self.client_address[0]):
            return True
        if self.token is None:
            return False
        got = self.headers.get("Authorization", "")
        return got.startswith("Bearer ") and hmac.compare_digest(got[7:].strip().encode(), self.token.encode())

    def _refuse(self) -> None:
        log.warning("refused %s %s from %s: no valid token", self.command, self.path.split("?")[0],
                    self.client_address[0])
        self.close_connection = True
        self._reply(401 if self.token else 403, b'{"error":"unauthorized"}')

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_POST(self) -> None:
        if not self._authorized():
            return self._refuse()
        raw = self.headers.get("Content-Length")
        if raw is None or not raw.strip().isdigit():  # chunked, missing, negative or not a number
            self.close_connection = True
            return self._reply(411 if raw is None else 400, b'{"error":"a valid Content-Length is required"}')
        n = int(raw)
        if n > 16 << 20:
            self.close_connection = True
            return self._reply(413, b'{"error":"too large"}')
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            return self._reply(400, b'{"error":"truncated body"}')
        if self.path.split("?")[0] not in ("/events", "/"):
            return self._reply(404, b'{"error":"not found"}')
        try:
            queued = self.sidecar.handle_events(body)
        except QueueFull as e:  # not persisted: the registry retries the delivery
            log.warning("%s", e)
            return self._reply(503, json.dumps({"error": str(e)}).encode())
        except ValueError as e:
            return self._reply(400, json.dumps({"error": str(e)}).encode())
        except Exception as e:  # not persisted: let the registry retry the delivery
            log.exception("cannot queue events")
            return self._reply(503, json.dumps({"error": str(e)}).encode())
        self._reply(200, json.dumps({"queued": queued}).encode())

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/healthz":
            ok, doc = self.sidecar.health()
            return self._reply(200 if ok else 503, json.dumps(doc).encode())
        if path == "/metrics":
            return self._reply(200, generate_latest(self.sidecar.metrics), CONTENT_TYPE_LATEST)
        if path == "/jobs":
            if not self._authorized():
                return self._refuse()
            jobs = [j.__dict__ for j in self.sidecar.state.jobs(limit=1000)]
            return self._reply(200, json.dumps(jobs).encode())
        self._reply(404, b'{"error":"not found"}')

    do_HEAD = do_GET


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer dropping a kept-alive connection (the registry does on restart) is not worth a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("connection from %s: %s", client_address, exc)
            return
        log.exception("error serving %s", client_address)


class SidecarServer:
    """The service: HTTP server + workers.  ``with SidecarServer(cfg) as s:`` in tests, :func:`serve` in prod."""

    def __init__(self, cfg: SidecarConfig, client: RegistryClient | None = None) -> None:
        token = cfg.token()
        host, _, port = cfg.listen.rpartition(":")
        if not is_loopback(host.strip("[]") or "0.0.0.0") and token is None:
            log.warning("sidecar listens on %s without token_file: only loopback peers may post events or list "
                        "jobs", cfg.listen)
        self.sidecar = Sidecar(cfg, client)
        handler = type("Handler", (_Handler,), {"sidecar": self.sidecar, "token": token})
        self.httpd = _Server((host.strip("[]") or "0.0.0.0", int(port)), handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        assert isinstance(host, str)  # an AF_INET/AF_INET6 server
        return f"http://{host}:{port}"

    def start(self) -> SidecarServer:
        self.sidecar.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="sidecar-http", daemon=True)
        self._thread.start()
        log.info("sidecar listening on %s for registry %s", self.url, self.sidecar.cfg.registry)
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread:
            self._thread.join(10)
        self.sidecar.stop(timeout=None)

    def __enter__(self) -> SidecarServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(cfg: SidecarConfig) -> None:
    """Run until SIGTERM/SIGINT; a conversion in progress is finished first (it is idempotent anyway)."""
    server = SidecarServer(cfg).start()
    done = threading.Event()

    def _stop(signum: int, frame: object) -> None:
        done.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    done.wait()
    log.info("sidecar stopping")
    with contextlib.suppress(Exception):
        server.stop()


def _registry_config_snippet(url: str, name: str = "bootseer-sidecar", token: str | None = None) -> dict[str, Any]:
    """The ``notifications`` block to put in distribution's config to point it at a sidecar at ``url``; with
    ``token``, every notification carries it (needed unless the registry reaches the sidecar over loopback)."""
    ep: dict[str, Any] = {"name": name, "url": url.rstrip("/") + "/events", "timeout": "5s", "threshold": 3,
                          "backoff": "1s", "ignoredmediatypes": ["application/octet-stream"]}
    if token:
        ep["headers"] = {"Authorization": [f"Bearer {token}"]}
    return {"endpoints": [ep]}


notifications_config = _registry_config_snippet

__all__ = ["EVENTS_MEDIA_TYPE", "Sidecar", "SidecarConfig", "SidecarServer", "notifications_config",
                          "parse_events", "serve"]
