"""depsnap: dependency snapshots.  A job's install step runs once on top of its base image; the filesystem
diff becomes one extra OCI layer, pushed under a tag derived from everything that went into it (the key),
and later starts of the same job reuse it instead of installing again — lazily, like any indexed image.

What a job launcher calls: ``bootseer depsnap run --base IMAGE -r requirements.txt --run CMD --repo REPO
--json`` → the image to start the job from (resolved, built on a miss, indexed).

* :mod:`depsnap.key` — the key: base manifest digest, platform, normalized dependency spec, command.
* :mod:`depsnap.difftar` — an overlay upper dir → a deterministic OCI layer tar (whiteouts, opaque dirs,
  caches left out, mtimes clamped).
* :mod:`depsnap.image` — the base's manifest and config, one layer appended, pushed with the project's
  registry client (base layers mounted across repositories, never downloaded).
* :mod:`depsnap.build` — resolve, publishing a build's diff, and the Docker-engine build (CI pipelines).
* :mod:`depsnap.engine_containerd` — the containerd build (nodes): ``bootseer pull`` of the base into
  BootSeer's snapshotter, the install in a container over an active snapshot, its upper dir as the layer.
* :mod:`depsnap.index` — the snapshot image converted and indexed (the sidecar's index, or converted here).
"""
