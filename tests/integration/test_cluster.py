"""Redis Cluster: stream keys and channels sharded (hash tags, SSUBSCRIBE/SPUBLISH), queues on a plain Redis."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot

from tests.integration.test_hub import until
from tests.ports import free_port
from tests.procs import Cluster, create_stream, logged, read_stream, wait_for
from tokenfan.api.hub import ShardedHub
from tokenfan.ops.embedded import EmbeddedRedis, find_redis_server
from tokenfan.shared import keys
from tokenfan.worker.engines import fake_tokens


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


@pytest.fixture
def redis_cluster() -> Iterator[list[EmbeddedRedis]]:
    binary = find_redis_server()
    nodes = [EmbeddedRedis(port=_cluster_port(), binary=binary,
                           extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]) for _ in range(3)]
    try:
        for n in nodes:
            n.extra += ["--cluster-config-file", f"nodes-{n.port}.conf"]
            n.start()
        cli = str(Path(binary).with_name("redis-cli"))
        subprocess.run([cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=60)
        clients = [redis.Redis(port=n.port) for n in nodes]
        wait_for(lambda: all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients),
                 timeout=30, what="the cluster to form")
        for c in clients:
            c.close()
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def test_streams_on_a_redis_cluster(redis_cluster: list[EmbeddedRedis], cluster: Cluster, r: redis.Redis) -> None:
    # redis_cluster first: it is set up before the cluster and stopped after its processes
    cluster.env.update({
        "TOKENFAN_REDIS_CLUSTER": "true",
        "TOKENFAN_QUEUE_REDIS_URL": cluster.redis_url,
    })
    cluster.redis_url = f"redis://127.0.0.1:{redis_cluster[0].port}/0"
    a, b = cluster.api(), cluster.api()
    cluster.worker(TOKENFAN_FAKE_RATE="100")
    sids = []
    for i in range(12):
        content = f"cluster stream {i}"
        sid = create_stream((a, b)[i % 2].url, content, max_tokens=8)
        _, got = read_stream((b, a)[i % 2].url, sid)
        evs = logged(got)
        assert [int(e.id) for e in evs] == list(range(1, 12))
        assert "".join(e.json()["text"] for e in evs if e.event == "token") == "".join(
            fake_tokens([{"role": "user", "content": content}], 8))
        sids.append(sid)
    # resume after a given id works across the shards too
    assert [e.id for e in logged(read_stream(a.url, sids[0], last=9)[1])] == ["10", "11"]
    # every stream's keys sit on one node, and the streams spread over several nodes
    holders = set()
    for sid in sids:
        slot = key_slot(keys.log(sid).encode())
        assert slot == key_slot(keys.state(sid).encode()) == key_slot(keys.channel(sid).encode())
        owners = {n.port for n in redis_cluster
                  if redis.Redis(port=n.port).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= 2}
        assert len(owners) == 1
        holders |= owners
    assert len(holders) >= 2
    # RQ's queues are on the plain Redis
    assert r.exists("rq:queues")


def _pubsub_connections(port: int) -> int:
    """Connections to one node holding a sharded subscription (CLIENT LIST's `ssub=`)."""
    with redis.Redis(port=port) as c:
        lines = c.execute_command("CLIENT", "LIST").decode().splitlines()
    clients = [dict(f.split("=", 1) for f in line.split()) for line in lines]
    return sum(int(fields.get("ssub", "0")) > 0 for fields in clients)


async def test_first_subscribes_to_a_new_node_share_one_hub(redis_cluster: list[EmbeddedRedis]) -> None:
    url = f"redis://127.0.0.1:{redis_cluster[0].port}/0"
    cluster = AsyncRedisCluster.from_url(url)
    hub = ShardedHub(cluster, url)
    await hub.start()
    try:
        node = cluster.get_node_from_key(keys.channel("first"))
        sids = [s for s in (f"s{i}" for i in range(400))
                if cluster.get_node_from_key(keys.channel(s)).name == node.name][:8]
        # eight first subscribes at once, all to channels of one primary nobody subscribed to yet
        subs = await asyncio.gather(*(hub.subscribe(keys.channel(sid)) for sid in sids))
        assert list(hub.hubs) == [node.name]
        assert {id(hub.owner[sub]) for sub in subs} == {id(hub.hubs[node.name])}
        assert _pubsub_connections(node.port) == 1  # one connection, not one per first subscriber
        with redis.Redis(port=node.port) as c:
            assert c.execute_command("SPUBLISH", keys.channel(sids[-1]), b"hello") == 1
        got = await subs[-1].get(5.0)
        assert got is not None and got[0] == [b"hello"]
    finally:
        await hub.close()
        await cluster.aclose()
    # closing the hub closed every connection it made
    await until(lambda: _pubsub_connections(node.port) == 0, what="the node to see no subscriber")
