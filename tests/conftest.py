"""Shared fixtures: a local stack (real containerd + docker-registry) per test session, and test images.

The suite has three parts: ``unit/`` (plain Python, real HTTP on loopback, no root, no kernel features),
``kernel/`` (mounts, loop devices, FUSE, page-cache drops: root) and ``stack/`` (containerd, docker-registry,
dockerd: root).  The stack fixtures live here so any part may ask for them; only kernel/ and stack/ do.

Every scratch dir is unique (``/tmp/bs-<hex>``) and removed at the end, so the suite can run twice in a
row and beside a developer's own stack.  Tests that need a differently configured stack (shaped link,
another CRI snapshotter) start their own with :func:`integration.stack.running`.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import images
from integration.stack import Stack, StackConfig, running


def scratch_root(tag: str = "") -> Path:
    """A short, unique path (unix socket paths are limited to 107 bytes)."""
    return Path("/tmp") / f"bs-{tag}{secrets.token_hex(3)}"


def require_root() -> None:
    """kernel/ and stack/ mount filesystems and start containerd: without root they cannot run at all, so the
    session stops with one clear message instead of a hundred failures.  unit/ runs without any privilege."""
    if os.geteuid() != 0:
        pytest.exit("tests/kernel and tests/stack mount filesystems and start containerd: run them as root "
                    "(tests/unit runs without privileges)", 2)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    """The session's local stack (containerd with CRI, registry, and the BootSeer daemons)."""
    with running(StackConfig(root=scratch_root())) as st:
        yield st


@pytest.fixture(scope="session")
def small_image(stack: Stack) -> str:
    """The small test image pushed to the session stack's registry; returns its reference."""
    return images.push_small(stack.info.registry)


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bs")


@pytest.fixture(scope="session")
def realistic_image(stack: Stack) -> str:
    """The realistic (torch) image, built once and cached by content, pushed to the session registry."""
    return images.push_realistic(stack.info.registry)
