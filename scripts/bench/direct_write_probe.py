"""What a write in one round trip could win (issue #20, measured before building it):
4 KiB writes at queue depth 1 and 16 on 3 sheep with copies=3, timed two ways in the
same run, from one Python (asyncio) client:

- through a gateway, as the NBD plugin writes now (WRITE_OBJ to sheep 0, which
  writes its own copy and sends WRITE_PEER to the other two);
- straight to the three replicas, as a plugin writing them itself would
  (WRITE_PEER with the epoch and a version to each, then the three answers).

The direct writes are made with the cluster's node key (a replica takes WRITE_PEER
only from a node); they carry versions above the gateway's, so the copies stay equal.

    .venv/bin/python scripts/bench/direct_write_probe.py [--writes 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time

from sheep.client import Client, Connection, raise_failed
from sheep.proto import Header, Op
from sheep.testing.cluster import LocalCluster

BLOCK = 4096
OBJECTS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writes", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with (tempfile.TemporaryDirectory(prefix="direct-probe-") as base,
          LocalCluster(base, 3) as cluster):
        cluster.start()
        cluster.format(3)
        asyncio.run(run(cluster, args.writes, args.rounds))


async def run(cluster: LocalCluster, writes: int, rounds: int) -> None:
    gateway = await Client.connect("127.0.0.1", cluster.sheep[0].port,
                                   credentials=cluster.credentials)
    replicas = [await Connection.open("127.0.0.1", node.port, cluster.credentials)
                for node in cluster.sheep]
    oids = [(1 << 40) + index for index in range(OBJECTS)]
    for oid in oids:
        await gateway.create_and_write(oid, bytes(4 << 20))
    epoch = (await gateway.cluster_info())["epoch"]
    version = 1 << 62
    data = random.randbytes(BLOCK)

    def place() -> tuple[int, int]:
        return random.choice(oids), random.randrange(1024) * BLOCK

    async def through_gateway() -> None:
        oid, offset = place()
        await gateway.write(oid, data, offset)

    async def direct() -> None:
        nonlocal version
        oid, offset = place()
        version += 1
        header = Header(opcode=Op.WRITE_PEER, epoch=epoch, oid=oid, offset=offset,
                        count=BLOCK, arg0=version)
        sent = [replica.send(header, data) for replica in replicas]
        for future in sent:
            raise_failed(*await future)

    ways = {"gateway": through_gateway, "direct": direct}
    for depth in (1, 16):
        results: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, write in ways.items():
                results[name].append(await timed(write, writes, depth))
        line = ", ".join(f"{name} {statistics.median(rates):.0f}/s "
                         f"({1e6 / statistics.median(rates) * depth:.0f} us)"
                         for name, rates in results.items())
        ratio = statistics.median(results["direct"]) / statistics.median(results["gateway"])
        print(f"QD{depth}: {line}; direct/gateway {ratio:.2f}x")
    gateway.close()
    for replica in replicas:
        replica.close()


async def timed(write, count: int, depth: int) -> float:  # type: ignore[no-untyped-def]
    """Writes per second, count writes by depth writers."""
    async def writer(share: int) -> None:
        for _ in range(share):
            await write()

    for _ in range(100):  # warm up
        await write()
    start = time.perf_counter()
    await asyncio.gather(*(writer(count // depth) for _ in range(depth)))
    return (count // depth * depth) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
