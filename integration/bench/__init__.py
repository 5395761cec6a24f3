"""Benchmarks: each module exposes ``main(argv) -> int`` for ``bootseer bench NAME``."""
