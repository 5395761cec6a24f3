from snapshotter.cli import app

app()
