"""depsnap: dependency snapshots.  A job's install step runs once on top of its base image; the filesystem
diff becomes one extra OCI layer, pushed under a tag derived from everything that went into it (the key),
and later starts of the same job reuse it instead of installing again.

* :mod:`depsnap.key` — the key: base manifest digest, platform, normalized dependency spec, command.
* :mod:`depsnap.difftar` — an overlay upper dir → an OCI layer tar (whiteouts, opaque dirs, caches left out).
* :mod:`depsnap.image` — the base as an OCI layout, one layer appended, pushed (skopeo).
* :mod:`depsnap.build` — resolve, and the Docker-engine build (CI pipelines).
* :mod:`depsnap.engine_containerd` — the containerd build (nodes): API pull into BootSeer's snapshotter,
  install in a container over an active snapshot, its upper dir as the layer.
"""
