"""tests/cubelet's fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from appliance.config import Config
from appliance.cubelet.sandboxes import SandboxTable
from appliance.master.store import SqliteStore


@pytest.fixture
def table(service_config: Config) -> Iterator[SandboxTable]:
    store = SqliteStore(service_config.db_path)
    try:
        yield SandboxTable(service_config, store)
    finally:
        store.close()
