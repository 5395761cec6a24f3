"""``python -m registry_sidecar serve|convert …`` — the sidecar without the whole ``bootseer`` CLI (the local
stack starts it this way)."""

from bootseer.clihelp import tidy_help
from registry_sidecar.cli import app

tidy_help(app)  # as `bootseer …` shows it

if __name__ == "__main__":
    app()
