"""``python -m snapshotter serve …`` — the snapshotter without the whole ``bootseer`` CLI."""

from bootseer.clihelp import tidy_help
from snapshotter.cli import app

tidy_help(app)  # as `bootseer snapshotter …` shows it

if __name__ == "__main__":
    app()
