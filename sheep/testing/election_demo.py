"""For scripts/demo: three sheep on a private 3-server ZooKeeper ensemble, a client
writing and reading back without pause, and the ensemble's leader SIGKILLed under
it. Prints what happened: the new leader's delay, the longest write, the errors
(none expected: the sheep serve on their session lease through the election).

    python -m sheep.testing.election_demo DIRECTORY

Everything runs on 127.0.0.1 inside DIRECTORY and is stopped by PID at the end.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from sheep.errors import SheepError
from sheep.testing.cluster import LocalCluster
from sheep.testing.zookeeper import ZooKeeperEnsemble

MiB = 1 << 20
block = 4096
blocks = 256


def main(directory: str) -> int:
    ensemble = ZooKeeperEnsemble(os.path.join(directory, "zookeeper"), 3, tick_ms=500)
    cluster = LocalCluster(os.path.join(directory, "cluster"), 3,
                           driver=f"zookeeper:{ensemble.hosts}/demo?timeout=6")
    try:
        ensemble.wait_quorum()
        cluster.start()
        cluster.format(2)
        with cluster.client(0) as client:
            client.vdi_create("vm", 64 * MiB)
        print(f"3 sheep on ZooKeeper {ensemble.hosts} (session timeout 6 s)")
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[str] = []

        def write_and_verify() -> None:
            with cluster.client(1) as client:
                handle = client.vdi_open("vm", writable=True)["handle"]
                value = 0
                while not stop.is_set():
                    value += 1
                    offset = value % blocks * block
                    data = value.to_bytes(8, "big") * (block // 8)
                    started = time.monotonic()
                    try:
                        client.vdi_write(handle, offset, data)
                        if bytes(client.vdi_read(handle, offset, block)) != data:
                            errors.append(f"block at {offset} did not read back")
                    except SheepError as error:
                        errors.append(str(error))
                    latencies.append(time.monotonic() - started)

        writer = threading.Thread(target=write_and_verify)
        writer.start()
        time.sleep(1.0)
        leader = ensemble.leader()
        assert leader is not None, ensemble.modes()
        killed = time.monotonic()
        ensemble.kill(leader)
        ensemble.wait_leader(other_than=leader)
        to_leader = time.monotonic() - killed
        time.sleep(2.0)
        stop.set()
        writer.join()
        print(f"ZooKeeper's leader (server {leader}) SIGKILLed: a new leader {to_leader:.2f} s"
              f" later; {len(latencies)} writes, each read back, the longest"
              f" {max(latencies) * 1000:.0f} ms; {len(errors)} errors")
        return 1 if errors else 0
    finally:
        cluster.close()
        ensemble.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
