"""Hot blocks, the recording side: ``bootseer record`` runs an image once and keeps what its start-up read.

* :mod:`~recorder.record` — one recording: drives the snapshotter through its control socket
  (:mod:`bootseer.control`), reads the access log (:mod:`bootseer.accesslog`), builds and pushes the
  hot-block manifest (:mod:`bootseer.hotblocks`).
* :mod:`~recorder.cli` — ``bootseer record`` and ``bootseer hotblocks``.

The replaying side — the prefetcher that fetches a recording's ranges on every lazy mount — is part of the
snapshotter (:mod:`snapshotter.lazy.prefetcher`).  The recorder depends on the core (``bootseer``) only.
"""
