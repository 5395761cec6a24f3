"""tests/kernel: mounts, loop devices, FUSE, network namespaces and page-cache drops.  Root only."""

from __future__ import annotations

import pytest

from tests.conftest import require_root


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    require_root()
