"""Hot blocks: record which blocks of an image a start-up reads, replay them before they are asked for.

* :mod:`~recorder.hotblocks` — the manifest (access records → ranges, Parquet, merge, validation); plain.
* :mod:`~recorder.artifact` — the manifest as an OCI referrer of the image manifest (push, fetch).
"""
