"""BootSeer's containerd proxy snapshotter.

The package is layered so each layer can be tested alone:

* :mod:`snapshotter.metastore` — snapshot metadata in sqlite (names, kinds, parentage, labels, usage), modelled on
  containerd's ``snapshots/storage``; knows nothing about files.
* :mod:`snapshotter.overlay` — :class:`~snapshotter.overlay.Snapshotter`, the plain-Python core: directories,
  mounts and the crash-safe ordering of filesystem work around metadata transactions, modelled on containerd's
  ``snapshots/overlay``.
* :mod:`snapshotter.service` — the thin grpcio adapter serving ``containerd.services.snapshots.v1.Snapshots``.
* :mod:`snapshotter.server` / :mod:`snapshotter.cli` — the daemon (unix socket, metrics, signals) and
  ``bootseer snapshotter serve``.
"""
