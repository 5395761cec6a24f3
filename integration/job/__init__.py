"""The training job of ``bootseer bench job`` and docs/job-start.md: a small transformer, its checkpoint, the
train-one-step script (runs inside the container) and the launcher (runs on the node)."""
