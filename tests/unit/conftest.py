"""tests/unit: plain Python cores (formats, spec, scheduler, multipart, filters, metadata store, CLI parsing),
real HTTP on loopback at most.  No root, no mounts, no page-cache drops: ``tests/kernel/test_unprivileged.py``
runs this directory with every capability dropped."""
