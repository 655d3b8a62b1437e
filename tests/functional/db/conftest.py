"""The Patroni cluster the failover and read-replica tests share (one per module and worker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.ha import Cluster, running_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with running_cluster() as c:
        yield c
