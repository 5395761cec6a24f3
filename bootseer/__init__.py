"""BootSeer: start-up accelerator for LLM training clusters.

This package holds what several parts share: the ``bootseer`` CLI entry point, logging, configuration
and the OCI/registry client.  The parts themselves live beside it (``snapshotter``, ``registry_sidecar``,
``recorder``, ``depsnap``, ``ckptfs``, ``integration``).
"""

__version__ = "0.1.0"
