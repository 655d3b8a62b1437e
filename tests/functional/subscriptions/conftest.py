"""Shared by the subscription tests: a real receiving HTTP server, and servers that may deliver to
it over http on loopback (`subscription_allow_http_loopback`), polling and retrying quickly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fhirserver.config import Settings
from tests.conftest import make_settings
from tests.support.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return make_settings(tmp_path, db_url, subscription_allow_http_loopback=True, subscription_poll_seconds=0.05,
                         subscription_retry_max_seconds=0.3)
