"""``bootseer bench NAME [ARGS…]``: every benchmark under ``integration/bench/`` is a module with a
``main(argv) -> int`` that prints ratios against a baseline measured in the same run and writes JSON with
``--json FILE``.  This file only mounts them (each module's own ``--help`` lists its options)."""

from __future__ import annotations

import importlib
import importlib.util

import typer

BENCHMARKS = {
    "ckpt": "checkpoint load: single stream vs striped reads, FUSE vs raw local read",
    "unpack": "pull + unpack of the realistic image: bootseer vs containerd's overlayfs",
    "convert": "EROFS conversion throughput of the realistic image's layers",
    "startup": "container start-up: full pull vs lazy vs lazy+prefetch vs floor",
    "depsnap": "env-ready time: dependency snapshot hit vs install at start",
    "transient": "lazy start-up through a registry failing 20 % of range reads (503, cut bodies) vs healthy",
    "fleet": "N nodes starting one image at once: straight from the origin vs through a pull-through mirror",
    "job": "whole job start (image + dependencies + checkpoint + first step): today vs BootSeer vs floor",
    "format": "lazy-layer format study: hot-set wire bytes, node disk, conversion time, reads per blob format",
}

app = typer.Typer(help="Benchmarks (ratios against a same-run baseline; --json FILE for machines).",
                  no_args_is_help=True)


def _command(name: str) -> None:
    module = f"integration.bench.{name}"

    @app.command(name, help=BENCHMARKS[name],
                 context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                   "help_option_names": []})
    def run(ctx: typer.Context) -> None:
        mod = importlib.import_module(module)
        raise typer.Exit(mod.main(list(ctx.args)) or 0)


for _name in BENCHMARKS:
    if importlib.util.find_spec(f"integration.bench.{_name}") is not None:
        _command(_name)
