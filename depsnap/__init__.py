"""depsnap: dependency snapshots.  A job's install step runs once on top of its base image; the filesystem
diff becomes one extra OCI layer, pushed under a tag derived from everything that went into it (the key),
and later starts of the same job reuse it instead of installing again.

* :mod:`depsnap.key` — the key: base manifest digest, platform, normalized dependency spec, command.
* :mod:`depsnap.difftar` — an overlay upper dir → an OCI layer tar (whiteouts, opaque dirs, caches left out).
"""
