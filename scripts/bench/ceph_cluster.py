"""A private, throwaway Ceph cluster for the RBD baseline benchmark.

``CephCluster(base_dir)`` brings up one monitor, one manager and ``osds`` OSDs on this machine,
the way Ceph's own ``vstart.sh`` does, with everything under ``base_dir``: its own ``ceph.conf``,
keyrings, monitor store, manager and OSD data, admin sockets, logs and pid files. The monitor
listens on 127.0.0.1 on free ports (msgr v2 and v1), the fsid is new each time, and nothing in
/etc/ceph or /var/lib/ceph is read or written, so it does not meet a system-wide cluster.

The OSDs are bluestore on file-backed block devices (``bluestore block create = true``; the
files are sparse, ``osd_size_bytes`` each), tuned for a small box (1 GiB ``osd_memory_target``,
no dashboard or other modules that need extra packages, pg autoscaler off). Pools default to
size=3 / min_size=2 with ``osd crush chooseleaf type = 0`` so that three OSDs on one host can
hold the three copies. cephx stays on, as in a real deployment; the keys live in ``base_dir``.

The daemons run in the foreground as children of this process (``-f``), so ``stop()`` ends
exactly the processes it started, by pid, and never looks processes up by name.

Needs the Debian packages named by ``unavailable()``; fio's ``rbd`` engine takes the cluster
from the ``CEPH_CONF`` environment variable (it has no option for a conf file)::

    CEPH_CONF=$(conf_path) fio --ioengine=rbd --clientname=admin --pool=rbd --rbdname=IMG ...
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from typing import Any

PACKAGES = "ceph-mon ceph-mgr ceph-osd ceph-common librbd1"
BINARIES = ("ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool", "monmaptool", "rbd")
POOL = "rbd"
PG_NUM = 32


def unavailable() -> str | None:
    """None if the Ceph programs this module runs are installed, else why not (one line)."""
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if missing:
        return (f"Ceph is not installed here (missing {', '.join(missing)}): "
                f"apt-get install --no-install-recommends {PACKAGES}")
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class CephError(RuntimeError):
    pass


class CephCluster:
    def __init__(self, base_dir: str, osds: int = 3, osd_size_bytes: int = 8 << 30,
                 start_timeout: float = 300.0) -> None:
        self.base_dir = os.path.abspath(base_dir)
        self.osds = osds
        self.osd_size_bytes = osd_size_bytes
        self.start_timeout = start_timeout
        self.fsid = str(uuid.uuid4())
        self._conf = os.path.join(self.base_dir, "ceph.conf")
        self._keyring = os.path.join(self.base_dir, "keyring")
        self._log_dir = os.path.join(self.base_dir, "log")
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._logs: list[Any] = []
        self._env = dict(os.environ, CEPH_CONF=self._conf)
        self._env.pop("CEPH_ARGS", None)
        self.startup_seconds: float | None = None

    # -- public interface -------------------------------------------------------------------

    def conf_path(self) -> str:
        return self._conf

    def pool(self) -> str:
        return POOL

    def fio_env(self) -> dict[str, str]:
        """The environment for fio's rbd engine (``--clientname=admin``)."""
        return dict(self._env)

    def start(self) -> None:
        why = unavailable()
        if why:
            raise CephError(why)
        began = time.monotonic()
        try:
            self._write_conf()
            self._start_mon()
            self._start_mgr()
            for _ in range(self.osds):
                self._start_osd()
            self._create_pool()
            self._wait_healthy(began + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    def create_image(self, name: str, size_bytes: int) -> None:
        """A new, empty RBD image in pool(). Reads of never-written parts cost the OSDs no disk
        reads (the objects do not exist), so fill an image before measuring reads from it."""
        self._run("rbd", "create", f"{POOL}/{name}", "--size", f"{max(1, size_bytes >> 20)}M",
                  "--image-feature", "layering,exclusive-lock,object-map,fast-diff,deep-flatten")

    def stop(self) -> None:
        """SIGTERM the daemons this object started (OSDs, mgr, mon), by pid; SIGKILL laggards."""
        procs, self._procs = list(reversed(self._procs)), []
        for _name, proc in procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 30
        for _name, proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for log in self._logs:
            log.close()
        self._logs = []
        self._stop_leftovers()

    def _stop_leftovers(self) -> None:
        """End daemons of this base_dir that an earlier, crashed owner left running.

        Only pids from ``base_dir/run/*.pid`` whose command line names this cluster's ceph.conf are
        signalled, so a reused pid or another cluster is never hit."""
        run_dir = os.path.join(self.base_dir, "run")
        if not os.path.isdir(run_dir):
            return
        pids = []
        for entry in os.listdir(run_dir):
            if not entry.endswith(".pid"):
                continue
            try:
                with open(os.path.join(run_dir, entry)) as file:
                    pid = int(file.read().strip())
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    argv = file.read().split(b"\0")
            except (OSError, ValueError):
                continue
            if self._conf.encode() in argv:
                pids.append(pid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 30
            while pids and time.monotonic() < deadline:
                pids = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
                time.sleep(0.2)

    def pids(self) -> list[int]:
        return [proc.pid for _name, proc in self._procs]

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- bring-up ---------------------------------------------------------------------------

    def _write_conf(self) -> None:
        base = self.base_dir
        for sub in ("log", "asok", "run", "crash", "dev", "mon.a", "mgr.x"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        v2, v1 = _free_ports(2)
        self._mon_addrs = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        memory_target = 1 << 30
        conf = f"""\
[global]
fsid = {self.fsid}
mon host = {self._mon_addrs}
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind ipv4 = true
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = {base}/keyring
admin socket = {base}/asok/$name.asok
log file = {base}/log/$name.log
mon cluster log file = {base}/log/cluster.log
pid file = {base}/run/$name.pid
run dir = {base}/run
crash dir = {base}/crash
log to stderr = false
err to stderr = false
log to journald = false
daemonize = false
osd pool default size = 3
osd pool default min size = 2
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 5
mon data avail crit = 1
mgr initial modules =

[mon]
mon data = {base}/$name
keyring = {base}/$name/keyring

[mgr]
mgr data = {base}/$name
keyring = {base}/$name/keyring
mgr/devicehealth/enable_monitoring = false

[osd]
osd data = {base}/$name
keyring = {base}/$name/keyring
osd objectstore = bluestore
bluestore block path = {base}/dev/$name.block
bluestore block create = true
bluestore block size = {self.osd_size_bytes}
bluestore block db create = false
bluestore block wal create = false
bluestore fsck on mount = false
osd memory target = {memory_target}
osd check max object name len on startup = false
osd crush update on start = true
"""
        with open(self._conf, "w") as file:
            file.write(conf)

    def _start_mon(self) -> None:
        base = self.base_dir
        self._run("ceph-authtool", "--create-keyring", self._keyring, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", self._keyring, "--gen-key", "-n", "client.admin",
                  "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *",
                  "--cap", "mds", "allow *")
        monmap = os.path.join(base, "monmap")
        self._run("monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                  "--addv", "a", self._mon_addrs, monmap)
        self._run("ceph-mon", "-c", self._conf, "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", self._keyring)
        self._spawn("mon.a", "ceph-mon", "-c", self._conf, "-f", "-i", "a")
        self._wait_for("the monitor to answer", lambda: self._ceph("mon", "stat") is not None, 60)
        self._ceph_ok("config", "set", "mgr", "mgr/devicehealth/enable_monitoring", "false",
                      "--force")

    def _start_mgr(self) -> None:
        keyring = os.path.join(self.base_dir, "mgr.x", "keyring")
        self._ceph_ok("auth", "get-or-create", "mgr.x", "mon", "allow profile mgr", "osd", "allow *",
                      "mds", "allow *", "-o", keyring)
        self._spawn("mgr.x", "ceph-mgr", "-c", self._conf, "-f", "-i", "x")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        secret = self._run("ceph-authtool", "--gen-print-key").strip()
        secret_file = os.path.join(self.base_dir, "run", f"osd-{osd_uuid}.json")
        with open(secret_file, "w") as file:
            json.dump({"cephx_secret": secret}, file)
        out = self._ceph_ok("osd", "new", osd_uuid, "-i", secret_file)
        os.unlink(secret_file)
        osd_id = int(out.strip().splitlines()[-1])
        data = os.path.join(self.base_dir, f"osd.{osd_id}")
        os.makedirs(data, exist_ok=True)
        with open(os.path.join(data, "keyring"), "w") as file:
            file.write(f"[osd.{osd_id}]\n\tkey = {secret}\n")
        self._run("ceph-osd", "-c", self._conf, "-i", str(osd_id), "--mkfs", "--key", secret,
                  "--osd-uuid", osd_uuid, timeout=300)
        self._spawn(f"osd.{osd_id}", "ceph-osd", "-c", self._conf, "-f", "-i", str(osd_id))

    def _create_pool(self) -> None:
        self._wait_for(f"{self.osds} OSDs to come up", self._osds_up, 180)
        self._ceph_ok("osd", "pool", "create", POOL, str(PG_NUM), str(PG_NUM), "replicated",
                      "--autoscale-mode=off")
        self._ceph_ok("osd", "pool", "set", POOL, "size", "3", "--yes-i-really-mean-it")
        self._ceph_ok("osd", "pool", "set", POOL, "min_size", "2")
        self._ceph_ok("osd", "pool", "application", "enable", POOL, "rbd")
        self._run("rbd", "pool", "init", POOL, timeout=120)

    def _osds_up(self) -> bool:
        out = self._ceph("osd", "stat", "-f", "json")
        if out is None:
            return False
        stat = json.loads(out)
        stat = stat.get("osdmap", stat)
        return int(stat.get("num_up_osds", 0)) >= self.osds and int(stat.get("num_in_osds", 0)) >= self.osds

    def _wait_healthy(self, deadline: float) -> None:
        last = "(no answer from the monitor)"
        while time.monotonic() < deadline:
            self._check_alive()
            out = self._ceph("status", "-f", "json")
            if out is not None:
                status = json.loads(out)
                health = status.get("health", {}).get("status", "?")
                pgmap = status.get("pgmap", {})
                states = {s["state_name"]: s["count"] for s in pgmap.get("pgs_by_state", [])}
                last = f"health {health}, {pgmap.get('num_pgs', 0)} PGs: {states}"
                if (health in ("HEALTH_OK", "HEALTH_WARN") and pgmap.get("num_pgs", 0) >= PG_NUM
                        and set(states) == {"active+clean"} and self._pool_clean()):
                    return
            time.sleep(2)
        detail = self._ceph("health", "detail") or ""
        raise CephError(f"Ceph cluster in {self.base_dir} not healthy after {self.start_timeout:.0f} s: "
                        f"{last}\n{detail.strip()}")

    def _pool_clean(self) -> bool:
        out = self._ceph("pg", "ls-by-pool", POOL, "-f", "json")
        if out is None:
            return False
        data = json.loads(out)
        stats = data.get("pg_stats", []) if isinstance(data, dict) else data
        return len(stats) >= PG_NUM and all(pg.get("state") == "active+clean" for pg in stats)

    # -- helpers ----------------------------------------------------------------------------

    def _spawn(self, name: str, *argv: str) -> None:
        log = open(os.path.join(self._log_dir, f"{name}.out"), "ab")  # noqa: SIM115
        self._logs.append(log)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=self.base_dir, env=self._env, start_new_session=True)
        self._procs.append((name, proc))

    def _check_alive(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise CephError(f"ceph {name} exited with {proc.returncode}; see {self._log_dir}/{name}.log "
                                f"and {name}.out")

    def _run(self, *argv: str, timeout: float = 60) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.base_dir, env=self._env,
                              timeout=timeout, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            why = (done.stderr or done.stdout).strip()[-2000:] or f"see the logs in {self._log_dir}"
            raise CephError(f"{' '.join(argv)} failed ({done.returncode}): {why}")
        return done.stdout

    def _ceph(self, *args: str, timeout: float = 30) -> str | None:
        """Output of a ``ceph`` command, or None if it failed or timed out."""
        argv = ["ceph", "-c", self._conf, "--connect-timeout", "10", *args]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, cwd=self.base_dir, env=self._env,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return None
        return done.stdout if done.returncode == 0 else None

    def _ceph_ok(self, *args: str) -> str:
        return self._run("ceph", "-c", self._conf, "--connect-timeout", "10", *args)

    def _wait_for(self, what: str, ready: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            if ready():
                return
            time.sleep(1)
        raise CephError(f"timed out after {timeout:.0f} s waiting for {what} (logs: {self._log_dir})")
