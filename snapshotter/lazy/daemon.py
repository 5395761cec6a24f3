"""The lazy data path inside ``bootseer snapshotter serve``: LayerManager + index reader + control socket.

Started before the snapshotter core recovers (the core's restart hand-back calls
:meth:`~snapshotter.lazy.handler.LazyHandler.restore`, which needs the manager's restored records), stopped
after the gRPC server: mounts stay on a plain stop, so a restarted daemon finds swapped layers working and
re-attaches the ones still behind FUSE.  State lives in ``<root>/lazy`` (see
:mod:`snapshotter.lazy.manager`) and ``<root>/index-cache``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bootseer.accesslog import AccessLogWriter
from bootseer.reference import Reference
from bootseer.registry import Platform, RegistryClient
from snapshotter.config import Config
from snapshotter.lazy.handler import LazyHandler, RegistrySpecs
from snapshotter.lazy.manager import LayerManager, LazyConfig
from snapshotter.lazy.prefetcher import HotBlockPrefetcher
from snapshotter.lazy.serve import ControlServer

if TYPE_CHECKING:
    from bootseer.pullsecrets import PullCredentials

log = logging.getLogger("bootseer.lazy")


@dataclass
class LazyService:
    manager: LayerManager
    handler: LazyHandler
    control: ControlServer
    access_log: AccessLogWriter | None = None
    hotblocks: HotBlockPrefetcher | None = None  # replays recorded hot blocks at Prepare

    @classmethod
    def start(cls, cfg: Config, credentials: PullCredentials | None = None) -> LazyService:
        """``credentials``: kubelet's pull secrets (:mod:`snapshotter.criproxy`), asked before the docker config."""
        t0 = time.monotonic()
        policy = cfg.trust_policy()
        if not any(r.verifier for r in policy.rules if r.mode != "off"):
            log.warning("no [trust] keys: only repositories with trust mode 'off' or 'prefer' get lazy layers; "
                        "with 'require' (the default) every layer is pulled the ordinary way (docs/security.md)")
        specs = RegistrySpecs.create(hosts_dir=cfg.hosts_dir or None, plain_http=cfg.plain_http,
                                     docker_config=cfg.docker_config or None, cache_dir=cfg.root / "index-cache",
                                     policy=policy, lookup_timeout=cfg.lookup_timeout,
                                     lookup_concurrency=cfg.lookup_concurrency, credentials=credentials)
        if credentials is not None:  # rotated credentials: tokens the old ones earned go
            credentials.subscribe(specs.client.auth.forget_repository)
        access = AccessLogWriter(Path(cfg.access_log)) if cfg.access_log else None
        manager = LayerManager(cfg.root / "lazy", LazyConfig.from_dict(cfg.lazy), auth=specs.auth,
                               access_log=access, tls=specs.auth.tls)
        outcomes = manager.start()
        control = ControlServer(cfg.control_path, manager)
        log.info("lazy layers ready in %.2fs (%d restored, control socket %s)", time.monotonic() - t0,
                 len(outcomes), cfg.control_path)
        hot = (HotBlockPrefetcher(manager, specs.client, registry=manager.metrics.registry)
               if cfg.hotblock_prefetch else None)
        service = cls(manager, LazyHandler(manager, specs, prefetch=hot), control, access, hot)
        control.on_pull_hint = lambda image, platform: service.pull_hint(specs.client, image, platform)
        return service

    def pull_hint(self, client: RegistryClient, image: str, platform: str | None = None) -> None:
        """``bootseer pull`` is about to pull ``image``: resolve it here and set its layers up ahead (see
        :meth:`LazyHandler.hint`), in a thread — the pull goes on at once.  Failures only cost the head
        start: the Prepares that follow do the work themselves."""
        def work() -> None:
            try:
                ref = Reference.parse(image)
                manifest, _ = client.resolve_image(ref, Platform.parse(platform) if platform else None)
                self.handler.hint(str(ref), manifest.digest, [d.digest for d in manifest.layers])
            except Exception as e:
                log.info("pull hint for %s not used: %s", image, e)

        threading.Thread(target=work, name="pull-hint", daemon=True).start()

    def close(self) -> None:
        """Daemon stop: mounts stay (see the module doc)."""
        self.handler.close()
        if self.hotblocks is not None:
            self.hotblocks.close()
        self.control.close()
        self.manager.close(teardown=False)
        if self.access_log is not None:
            self.access_log.close()
