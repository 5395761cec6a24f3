"""tests/stack: the local stack: containerd, docker-registry, the BootSeer daemons, dockerd.  Root only."""

from __future__ import annotations

import pytest

from tests.conftest import require_root


@pytest.fixture(scope="session", autouse=True)
def _require_root() -> None:
    require_root()
