"""``python -m registry_sidecar serve|convert …`` — the sidecar without the whole ``bootseer`` CLI (the local
stack starts it this way)."""

from registry_sidecar.cli import app

if __name__ == "__main__":
    app()
