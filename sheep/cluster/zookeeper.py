"""The ZooKeeper cluster driver: one sheep per host, one ZooKeeper ensemble.

    PREFIX/members/NODE   ephemeral, one per live sheep (its session's lifetime)
    PREFIX/log/r-NNNNNNNNNN  persistent sequential records: the ordered log

The log is the total order: a record's sequence number is ZooKeeper's sequential
suffix (plus one), so every sheep reads the same events in the same order, as
with the local driver. Records are JSON, as the local driver's; an event's time
is its znode's creation time, the same for every reader.

Membership and deaths. A sheep joins by creating its ephemeral member znode and
then appending a join record that names its incarnation (its ZooKeeper session
id). When a member's znode disappears (its session ended: a crash, SIGKILL, or a
host cut off for longer than the session timeout), every sheep that notices
appends a leave record for that incarnation; readers deliver only the first
leave that matches the member's current incarnation, so duplicates and late
leaves for an old incarnation change nothing, deterministically everywhere.

Fencing and the lease. A sheep serves only while it holds a lease on its
session (sheep/lease.py): a time, on its own monotonic clock, before which
ZooKeeper's leader surely cannot have expired the session, proven by its connect
handshakes and by a sync through the leader every T/10 (T the negotiated session
timeout). A suspension (the connection lost: a ZooKeeper leader election, a
server restarted, a cut) is served through while the lease lasts, at most T/2
after the last round trip; past it the sheep is fenced: it refuses client and
peer I/O with UNAVAILABLE (see Sheep.dispatch), since the others may soon log it
dead and move on. A lease renewed after it ran out, like a reconnect after the
session expired, serves again only once the log is read and applied up to where
it stood then. If the session expired, the sheep joins again as a fresh
incarnation and catches up like a restarted one (its copies are unverified
again). The majority side keeps serving: its sessions are fine.

ACLs. Given the cluster's node key, the driver authenticates to ZooKeeper as
one digest identity whose password is derived from the key (digest_password), on
every connection kazoo makes (its auth_data is sent again at each connect, a new
session's included), and every znode it creates is readable, writable and
administrable by that identity alone (the client's default ACL): a ZooKeeper
client without the key can neither read nor change the log, the snapshot or the
membership. A prefix an older version left open is guarded at start (_guard). A
sheep refused at the prefix (another cluster's key, or none for a guarded prefix)
fails its start with PERMISSION_DENIED. Without a key, znodes stay open, as before.

All ZooKeeper calls run on one worker thread (kazoo is thread-based); events
reach the event loop through call_soon_threadsafe.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import hmac
import json
import logging
import random
import secrets
import socket
import threading
import time
from typing import Any

from sheep import constants
from sheep.cluster.driver import ClusterDriver, Snapshot
from sheep.cluster_state import Event, EventKind
from sheep.errors import PermissionDenied, SheepError, SystemFailure, Unavailable, UsageError
from sheep.lease import SessionLease
from sheep.node import NodeInfo

log = logging.getLogger(__name__)

session_timeout_s = 6.0
trim_batch = 1000  # log entries everyone has applied, trimmed once there are this many
publish_interval_s = 1.0  # how often a member publishes its applied log position
poll_interval_s = 0.5  # the log and members are re-read at least this often (watches wake earlier)
connect_retry_s = 2.0
connect_step_s = 0.1  # how often a connect that is not answered checks for a stop
connect_notice_s = 1.0  # a start still not connected by then says so on the terminal
# Reconnect attempts (a pass over every server) back off from 50 ms to at most this:
# a refused connect (a server in an election, a dead one) costs nothing, so a sheep
# finds the new leader's ensemble within this of it serving.
reconnect_delay_max_s = 0.25
# A lease renewal unanswered for this fraction of the session timeout means a server
# that is silent (frozen, or cut off in a way TCP does not see): the sheep leaves it
# for another one before its lease (half the timeout) runs out, instead of waiting for
# kazoo's read timeout (two thirds of it).
silent_server_fraction = 0.25
renew_retry_s = 0.05  # a renewal that could not be sent or failed is tried again after this
# The most a sheep serves on its lease past its last exchange with ZooKeeper, whatever
# the session timeout: a cluster op's barrier (Sheep._wait_members_applied) stops
# waiting for a silent member after epoch_wait_ms and answers the client, and a sheep
# that cannot read the log must stop serving before then (it may still be reading it
# for up to the poll interval after the op was logged).
lease_cap_s = constants.epoch_wait_ms / 1000 - 2 * poll_interval_s
_record_prefix = "r-"
# The ZooKeeper digest identity of a cluster's sheep; its password comes from the
# cluster's node key (digest_password), bound to this use by the context.
digest_user = "sheep"
_digest_context = b"sheepdog zookeeper digest"


def digest_password(secret: bytes) -> str:
    """The ZooKeeper digest password for a cluster's node key: HMAC-SHA256 of a fixed
    context, so the key itself never reaches ZooKeeper (which sees the password on
    every connect and keeps SHA-1(user:password) in every znode's ACL)."""
    return base64.b64encode(hmac.new(secret, _digest_context, hashlib.sha256).digest()).decode()


def parse_spec(argument: str) -> tuple[str, str, float, int]:
    """'HOST:PORT[,HOST:PORT...][/PREFIX][?timeout=SECONDS&trim=N]' ->
    (hosts, prefix, session timeout, trim batch)."""
    argument, _, query = argument.partition("?")
    hosts, slash, prefix = argument.partition("/")
    if not hosts:
        raise UsageError("the zookeeper driver needs hosts: "
                         "-c zookeeper:HOST:2181[,HOST:2181][/PREFIX][?timeout=SECONDS]")
    for host in hosts.split(","):
        name, colon, port = host.rpartition(":")
        if not colon or not name or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"invalid ZooKeeper address {host!r}: use HOST:PORT")
    options = {"timeout": session_timeout_s, "trim": float(trim_batch)}
    for option in filter(None, query.split("&")):
        key, _, value = option.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if key == "timeout" and 0.5 <= number <= 600:
            options["timeout"] = number
        elif key == "trim" and number >= 1 and number == int(number):
            options["trim"] = number
        else:
            raise UsageError(f"invalid ZooKeeper option {option!r}: use ?timeout=SECONDS"
                             " (the session timeout, 0.5 to 600) and &trim=N (log entries"
                             " trimmed at once, 1 or more)")
    prefix = "/" + prefix.strip("/") if slash and prefix.strip("/") else "/sheepdog"
    return hosts, prefix, options["timeout"], int(options["trim"])


def _member_name(node_id: str) -> str:
    return node_id.replace("/", "@")


class ZooKeeperDriver(ClusterDriver):
    name = "zookeeper"
    can_fence = True

    def __init__(self, hosts: str, prefix: str = "/sheepdog",
                 session_timeout: float = session_timeout_s, trim: int = trim_batch,
                 secret: bytes | None = None) -> None:
        super().__init__()
        if secret is not None and not secret:
            raise UsageError("the cluster key is empty")
        # With a key: the identity sent at every connect, and the ACL of every znode.
        self._auth: list[tuple[str, str]] = []
        self._acl: list[Any] | None = None
        if secret is not None:
            from kazoo.security import make_digest_acl

            password = digest_password(secret)
            self._auth = [("digest", f"{digest_user}:{password}")]
            self._acl = [make_digest_acl(digest_user, password, all=True)]
        self.hosts = hosts
        self.prefix = prefix
        self.session_timeout = session_timeout
        self.trim = trim
        self.members_path = f"{prefix}/members"
        self.log_path = f"{prefix}/log"
        self.snapshot_path = f"{prefix}/snapshot"
        self._published = (-1, 0.0)  # (applied seq, when) last written to our member znode
        self._trimmed_to = 0
        self._last_delivered = 0  # the last record that was an event (not a duplicate)
        self.trimmed = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="zookeeper")
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._node: NodeInfo | None = None
        self._from_seq = 0
        self._last_seq = 0  # the last record read
        self._membership: dict[str, str] = {}  # node id -> incarnation, as the log says
        self._nodes: dict[str, NodeInfo] = {}
        self._incarnation = ""
        self._state = "disconnected"
        self._rejoin = False
        self._closed = False
        self._wake = threading.Event()
        self._task: asyncio.Task[None] | None = None
        # Set while the session is lost (expired) until the sheep joined again.
        self.fenced_since: float | None = time.monotonic()
        # After ZooKeeper comes back, the log position the sheep must apply before it
        # serves again: clients may have been answered ops it has not seen.
        self._catch_up_to = 0
        self.lease: SessionLease | None = None  # the current session's, once connected
        self._lease_lock = threading.Lock()  # renewals come from two threads
        self._caught_up = 0  # lease.lapses when the log was last read after a lapse
        self.server: str | None = None  # the ZooKeeper server connected to
        self._renewer: threading.Thread | None = None
        self._renew_wake = threading.Event()

    # --- the interface -----------------------------------------------------

    @property
    def fenced(self) -> bool:
        # Under the lock that every change of these takes (renewals come from two
        # threads, catching up from a third): never an old lapse count with a new end.
        with self._lease_lock:
            if self.fenced_since is not None or self.applied_seq() < self._catch_up_to:
                return True
            lease = self.lease
            return (lease is None or lease.lapses != self._caught_up
                    or not lease.holds(time.monotonic()))

    async def join(self, node: NodeInfo, from_seq: int) -> None:
        self._node = node
        self._from_seq = from_seq
        self._loop = asyncio.get_running_loop()
        await self._run(self._connect)
        self._renewer = threading.Thread(target=self._renew_forever, name="zookeeper-lease",
                                         daemon=True)
        self._renewer.start()
        await self._run(self._join)
        self._task = self._loop.create_task(self._poll_forever())

    async def broadcast(self, op_id: str, body: dict[str, Any]) -> None:
        assert self._node is not None, "broadcast before join"
        await self._run(self._append, {"kind": EventKind.OP.value, "node_id": self._node.node_id,
                                       "op_id": op_id, "body": body})

    async def leave(self) -> None:
        if self._node is None or self._closed:
            return
        try:
            await self._run(self._append, {"kind": EventKind.LEAVE.value,
                                           "node_id": self._node.node_id, "reason": "leave",
                                           "incarnation": self._incarnation})
        except SheepError as error:
            log.warning("could not log a graceful leave: %s", error)
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._renew_wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        # Not on the worker thread: it may be waiting on a call kazoo queued while
        # disconnected, which stopping the client fails.
        await asyncio.get_running_loop().run_in_executor(None, self._stop_client)
        self._executor.shutdown(wait=True)

    def info(self) -> dict[str, Any]:
        fenced = self.fenced
        lease = self.lease
        now = time.monotonic()
        state = "fenced" if fenced else "connected" if self._state == "connected" else "suspended"
        fenced_at = None
        if fenced and self.fenced_since is not None:
            fenced_at = time.time() - (now - self.fenced_since)
        elif fenced and lease is not None and lease.until is not None and lease.until <= now:
            fenced_at = time.time() - (now - lease.until)
        return {"driver": self.name, "hosts": self.hosts, "prefix": self.prefix,
                "connection": self._state, "fenced": fenced, "state": state,
                "server": self.server if self._state == "connected" else None,
                "session_timeout": self.session_timeout,
                "negotiated_timeout": lease.timeout if lease is not None else None,
                "lease_remaining": round(lease.remaining(now), 3) if lease is not None else 0.0,
                "fenced_at": fenced_at,
                "session": self._incarnation or None, "log_trimmed": self.trimmed,
                "acl": "digest" if self._acl is not None else "open"}

    # --- asyncio side -----------------------------------------------------------

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _poll_forever(self) -> None:
        while not self._closed:
            try:
                await self._run(self._poll_once)
            except SheepError as error:  # ZooKeeper unreachable, or an answer lost
                log.warning("cluster log: %s", error)
            await asyncio.get_running_loop().run_in_executor(None, self._wait_wake)

    def _wait_wake(self) -> None:
        self._wake.wait(poll_interval_s)
        self._wake.clear()

    def _deliver(self, events: list[Event | Snapshot]) -> None:
        assert self._loop is not None
        for event in events:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)

    # --- worker thread: ZooKeeper calls -----------------------------------------

    def _connect(self) -> None:
        from kazoo.client import KazooClient, KazooState
        from kazoo.retry import KazooRetry

        # Reconnect attempts back off to at most reconnect_delay_max_s (kazoo's default
        # grows to an hour): a sheep whose link comes back, or whose ensemble elected
        # a new leader, is connected again within that of it serving.
        # The servers in a random order (sheep spread over them), then, at every
        # connect, the server connected to moves last (_watch_handshakes): when it
        # fails, the others are tried first (kazoo would reshuffle, and a frozen or
        # unreachable server tried first costs a connect timeout out of the lease).
        # auth_data is sent at every connect, to a new session too; default_acl goes
        # on every znode created (ensure_path's intermediate nodes included).
        hosts = self.hosts.split(",")
        random.shuffle(hosts)
        self._client = KazooClient(
            hosts=",".join(hosts), timeout=self.session_timeout, randomize_hosts=False,
            connection_retry=KazooRetry(max_tries=-1, delay=0.05, backoff=1.5,
                                        max_delay=reconnect_delay_max_s),
            auth_data=self._auth or None, default_acl=self._acl)
        self._watch_handshakes()

        def listener(state: Any) -> None:
            self._state = str(state).lower()
            if state == KazooState.CONNECTED:
                log.info("ZooKeeper connected (%s)", self.server or self.hosts)
                self._renew_wake.set()
            elif state == KazooState.SUSPENDED:
                lease = self.lease
                log.warning("connection to ZooKeeper lost: serving on the session's lease for"
                            " %.2f s more", lease.remaining(time.monotonic()) if lease else 0.0)
            elif state == KazooState.LOST:
                self._fence("ZooKeeper session expired")
                with self._lease_lock:
                    if self.lease is not None:  # a new session starts a new lease
                        self.lease.until = None
                self._rejoin = True
            self._wake.set()

        self._client.add_listener(listener)
        started = time.monotonic()
        told = False
        while True:
            # kazoo's start(), but waited for in short steps: a stop (SIGTERM) while
            # the ensemble cannot be reached ends the wait at once, and the operator
            # hears of it within connect_notice_s, not only in sheep.log.
            event = self._client.start_async()
            deadline = time.monotonic() + connect_retry_s * 2
            while not self._closed and time.monotonic() < deadline:
                if event.wait(connect_step_s):
                    break
                if not told and time.monotonic() - started >= connect_notice_s:
                    told = True
                    text = (f"cannot reach ZooKeeper at {self.hosts} yet; retrying in the"
                            " background (SIGTERM stops it)")
                    log.warning("%s", text)
                    self.notice(text)
            if self._client.connected:
                break
            self._client.stop()  # as kazoo's start() does on a timeout
            self._client.close()
            if self._closed:
                raise SystemFailure(f"cannot reach ZooKeeper at {self.hosts}") from None
            log.warning("cannot reach ZooKeeper at %s; retrying", self.hosts)
        if told:
            self.notice(f"connected to ZooKeeper at {self.server or self.hosts}")
        self._state = "connected"
        self._prepare_prefix()

    def _prepare_prefix(self) -> None:
        """Check that ZooKeeper lets this sheep use the prefix, guard it if an older
        version left it open, and create the driver's nodes. Refused (NoAuth): the
        start fails at once, as no retry would change the key."""
        from kazoo.exceptions import NoAuthError

        try:
            if self._client.exists(self.prefix) is not None:
                self._client.get_children(self.prefix)  # exists() checks no ACL; this does
                if self._acl is not None:
                    self._guard()
            self._client.ensure_path(self.members_path)
            self._client.ensure_path(self.log_path)
        except NoAuthError as error:
            self._stop_client()
            why = ("it is guarded by another key: is this sheep's keyring the cluster's?"
                   if self._acl is not None else
                   "it is guarded by a cluster key and this sheep was given none")
            raise PermissionDenied(f"ZooKeeper refused this sheep access to {self.prefix}"
                                   f" on {self.hosts} (NoAuth): {why}") from error

    def _guard(self) -> None:
        """A prefix left open to anyone (by a version without keys) gets this cluster's
        ACL, and so does every znode under it. Top-down, each parent before its
        children are listed, so nothing open can be added under it afterwards; the
        prefix last, so a start that stops halfway finds it open and starts over;
        then the prefix's children once more, for those added while it was open."""
        acls, _ = self._client.get_acls(self.prefix)
        if acls == self._acl or not any(acl.id.scheme == "world" for acl in acls):
            return  # ours, or an operator's own: left as it is
        log.warning("the ZooKeeper prefix %s is open to every client: giving it and every"
                    " znode under it the cluster key's ACL", self.prefix)
        guarded: set[str] = set()
        self._guard_below(self.prefix, guarded)
        self._client.set_acls(self.prefix, self._acl)
        self._guard_below(self.prefix, guarded)
        log.info("%d znode(s) under %s guarded", len(guarded), self.prefix)

    def _guard_below(self, path: str, guarded: set[str]) -> None:
        from kazoo.exceptions import NoNodeError

        try:
            names = self._client.get_children(path)
        except NoNodeError:
            return  # gone meanwhile (a member's session ended, a trim)
        paths = [f"{path}/{name}" for name in names if f"{path}/{name}" not in guarded]
        pending = [self._client.set_acls_async(child, self._acl) for child in paths]
        for child, result in zip(paths, pending, strict=True):
            try:
                stat = result.get()
            except NoNodeError:
                continue
            guarded.add(child)
            if stat.numChildren:
                self._guard_below(child, guarded)

    def _watch_handshakes(self) -> None:
        """Hook kazoo's connect handshake: it tells the server connected to and the
        negotiated session timeout (kazoo keeps neither), and a successful one
        touched the session at the leader, which starts the lease (sheep/lease.py)."""
        connection = getattr(self._client, "_connection", None)
        handshake = getattr(connection, "_connect", None)
        if handshake is None:
            raise SystemFailure("this kazoo version hides its connect handshake: the session"
                                " lease cannot be measured (kazoo 2.9 to 2.11 are known)")

        def connect(host: str, hostip: str, port: int) -> Any:
            started = time.monotonic()
            read_timeout, connect_timeout = handshake(host, hostip, port)
            negotiated = read_timeout * 1.5 / 1000  # kazoo reads with 2/3 of the timeout
            with self._lease_lock:
                if self.lease is None or self.lease.timeout != negotiated:
                    # A lapse not caught up with yet must stay one (_caught_up counts them).
                    self.lease = SessionLease(negotiated, cap=lease_cap_s,
                                              lapses=self.lease.lapses if self.lease else 0)
                self.lease.connected(started, time.monotonic())
            self.server = f"{host}:{port}"
            servers = self._client.hosts
            if (host, port) in servers:  # tried last the next time round
                servers.remove((host, port))
                servers.append((host, port))
            return read_timeout, connect_timeout

        connection._connect = connect  # type: ignore[union-attr]  # checked above

    def _renew_forever(self) -> None:
        """Renew the lease: a sync through the leader every T/10, on its own thread
        (the poll thread may be busy). A renewal that follows a lapse wakes the poll
        thread, which reads the log before the sheep serves again."""
        while not self._closed:
            try:
                self._renew_once()
            except Exception:  # noqa: BLE001 - the thread must not end: the lease would
                log.exception("lease renewal")  # run out for good while all looks well
                time.sleep(renew_retry_s)

    def _renew_once(self) -> None:
        from kazoo.exceptions import KazooException
        from kazoo.handlers.threading import KazooTimeoutError

        if not self._closed:
            lease = self.lease
            if lease is None or self._state != "connected":
                self._renew_wake.wait(renew_retry_s)
                self._renew_wake.clear()
                return
            sent = time.monotonic()
            sock = self._socket()
            pending = self._client.sync_async(self.prefix)
            try:
                pending.get(timeout=lease.timeout * silent_server_fraction)
            except KazooTimeoutError:
                # The server says nothing, yet kazoo would wait 2/3 of T to notice, past
                # the lease: leave it now for the next server (it is tried last). Only
                # the connection the sync went out on: kazoo may have a new one by now.
                if sock is not None and sock is self._socket():
                    log.warning("ZooKeeper server %s has not answered for %.1f s:"
                                " connecting to another", self.server, time.monotonic() - sent)
                    self._drop_connection(sock)
                self._renew_wake.wait(renew_retry_s)
                self._renew_wake.clear()
                return
            except KazooException as error:
                log.debug("lease renewal failed: %r", error)
                self._renew_wake.wait(renew_retry_s)
                self._renew_wake.clear()
                return
            with self._lease_lock:
                if self.lease is lease:
                    lapses = lease.lapses
                    lease.answered(sent, time.monotonic())
                    if lease.lapses != lapses:
                        self._wake.set()
            self._renew_wake.wait(lease.renew_interval)
            self._renew_wake.clear()

    def _socket(self) -> Any:
        """kazoo's socket to its server now (private to kazoo; None if it has none)."""
        return getattr(getattr(self._client, "_connection", None), "_socket", None)

    @staticmethod
    def _drop_connection(sock: Any) -> None:
        """Shut kazoo's socket down under it: its loop sees the connection dropped and
        connects to the next server, with the same session (kazoo has no call for it)."""
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # closed meanwhile: kazoo is reconnecting already

    def _fence(self, why: str) -> None:
        if self.fenced_since is None:
            self.fenced_since = time.monotonic()
            log.warning("fenced: %s; refusing I/O until ZooKeeper is back", why)

    def _join(self) -> None:
        """Create our member znode and log our join (after a leave for an old
        incarnation of ours whose session has not expired yet)."""
        from kazoo.exceptions import NodeExistsError, NoNodeError

        assert self._node is not None
        self._sync_log()
        self._incarnation = f"{self._client.client_id[0]:x}"
        path = self._member_path()
        value = self._member_value()
        try:
            self._client.create(path, value, ephemeral=True)
        except NodeExistsError:
            try:
                self._client.delete(path)  # a dead incarnation of ours: we hold its store
            except NoNodeError:
                pass
            self._client.create(path, value, ephemeral=True)
        self._await_dead_members()
        self.history_seq = self._last_delivered
        old = self._membership.get(self._node.node_id)
        if old is not None:
            self._append({"kind": EventKind.LEAVE.value, "node_id": self._node.node_id,
                          "reason": "dead", "incarnation": old})
        self._append({"kind": EventKind.JOIN.value, "node": self._node.to_json(),
                      "incarnation": self._incarnation})
        lapses = self.lease.lapses if self.lease is not None else 0
        self._sync_log()  # through our own join: served only once that is applied
        with self._lease_lock:
            self._catch_up_to = self._last_delivered
            self._caught_up = lapses
            self.fenced_since = None
        self._rejoin = False
        self._poll_once()

    def _member_path(self) -> str:
        assert self._node is not None
        return f"{self.members_path}/{_member_name(self._node.node_id)}"

    def _member_value(self) -> bytes:
        assert self._node is not None
        return json.dumps({"node": self._node.to_json(), "incarnation": self._incarnation,
                           "applied": self.applied_seq()}).encode()

    def _publish(self) -> None:
        """Tell the others how far this sheep has applied the log (for trimming)."""
        applied = self.applied_seq()
        if applied != self._published[0] and (
                time.monotonic() - self._published[1] >= publish_interval_s):
            self._client.set(self._member_path(), self._member_value())
            self._published = (applied, time.monotonic())

    def _trim(self) -> None:
        """The member with the smallest node id trims the log below every member's
        applied position, once there are trim entries to remove; first it writes a
        snapshot of its state (taken when its state is exactly at its read position,
        with the membership as the log says there), for sheep that come back older."""
        assert self._node is not None
        if self.snapshot_source is None or min(self._membership, default="") != self._node.node_id:
            return
        names = self._client.get_children(self.members_path)
        floor: int | None = None
        for name in names:
            data, _ = self._client.get(f"{self.members_path}/{name}")
            applied = int(json.loads(data).get("applied", 0))
            floor = applied if floor is None else min(floor, applied)
        records = sorted(int(name[len(_record_prefix):]) + 1 for name in
                         self._client.get_children(self.log_path)
                         if name.startswith(_record_prefix))
        if floor is None or len([seq for seq in records if seq <= floor]) < self.trim:
            return
        snapshot = self.snapshot_source()
        if snapshot.seq != self._last_delivered:
            return  # the state is not at the read position right now: next time
        cut = min(floor, snapshot.seq)
        value = json.dumps({"seq": snapshot.seq, "trimmed_to": cut, "state": snapshot.state,
                            "epochs": snapshot.epochs, "membership": self._membership,
                            "nodes": {node_id: node.to_json()
                                      for node_id, node in self._nodes.items()}}).encode()
        if self._client.exists(self.snapshot_path):
            self._client.set(self.snapshot_path, value)
        else:
            self._client.create(self.snapshot_path, value)
        for seq in records:
            if seq <= cut:
                self._client.delete(f"{self.log_path}/{_record_prefix}{seq - 1:010d}")
                self.trimmed += 1
        log.info("cluster log trimmed up to %d (snapshot at %d)", cut, snapshot.seq)

    def _await_dead_members(self) -> None:
        """Before joining: members that do not answer are waited for until their
        sessions expire and their leaves are logged. Otherwise a sheep restarted
        after the whole cluster died would join before the others' deaths show, and
        the cluster would not know to wait for its last members (their copies are
        newer than a sheep that was away). A member that answers is alive: no wait."""
        assert self._node is not None
        deadline = time.monotonic() + 2 * self.session_timeout + 2
        while True:
            silent = [node_id for node_id in self._membership
                      if node_id != self._node.node_id and not self._answers(node_id)]
            if not silent or time.monotonic() > deadline:
                return
            live = set(self._client.get_children(self.members_path))
            if all(_member_name(node_id) not in live for node_id in silent):
                self._reap()
                self._sync_log()
                return
            log.info("waiting for the sessions of %d silent member(s) to end before joining",
                     len(silent))
            time.sleep(0.2)

    def _answers(self, node_id: str) -> bool:
        node = self._nodes.get(node_id)
        if node is None:
            return False
        try:
            with socket.create_connection((node.address, node.port), timeout=1.0):
                return True
        except OSError:
            return False

    def _stop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.stop()
                self._client.close()
            except Exception:  # noqa: BLE001 - closing a broken client must not fail a stop
                log.debug("closing the ZooKeeper client", exc_info=True)

    def _append(self, record: dict[str, Any]) -> None:
        """Append a record to the log. A connection lost meanwhile (a ZooKeeper leader
        election, a server restarted) is waited out for up to the session timeout;
        then, the session being the same, the record either landed or did not, and the
        log says which (each record carries a random id): it is never appended twice.
        Past that wait the caller gets UNAVAILABLE, which clients retry."""
        from kazoo.exceptions import (
            ConnectionClosedError,
            ConnectionLoss,
            KazooException,
            SessionExpiredError,
        )
        from kazoo.handlers.threading import KazooTimeoutError

        record = {**record, "rid": secrets.token_hex(8)}
        data = json.dumps(record).encode()
        began = time.monotonic()
        deadline = began + self.session_timeout
        unsure = False  # a create was sent and its answer lost
        while True:
            try:
                if unsure:
                    if not self._await_connected(deadline):
                        raise Unavailable(
                            "cannot append to the cluster log: ZooKeeper has been unreachable"
                            f" for {time.monotonic() - began:.1f} s (the op may or may not"
                            " have been logged)")
                    if self._appended(record["rid"]):
                        break
                    unsure = False
                # Bounded: kazoo queues a call while it reconnects, for as long as that takes.
                self._client.create_async(f"{self.log_path}/{_record_prefix}", data,
                                          sequence=True).get(
                    timeout=max(0.1, deadline - time.monotonic()))
                break
            except (ConnectionLoss, KazooTimeoutError):
                unsure = True
            except (SessionExpiredError, ConnectionClosedError) as error:
                raise Unavailable("cannot append to the cluster log: this sheep's ZooKeeper"
                                  f" session is gone ({type(error).__name__}); it joins"
                                  " again") from error
            except KazooException as error:
                raise SystemFailure(
                    f"cannot append to the cluster log in ZooKeeper: {error!r}") from error
        self._wake.set()

    def _await_connected(self, deadline: float) -> bool:
        while self._state != "connected":
            if self._closed or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _appended(self, rid: str) -> bool:
        """Whether a record with this id is in the log past what this sheep has read."""
        self._client.sync(self.log_path)
        for name in self._client.get_children(self.log_path):
            if name.startswith(_record_prefix) and int(name[len(_record_prefix):]) + 1 > self._last_seq:
                data, _ = self._client.get(f"{self.log_path}/{name}")
                if json.loads(data).get("rid") == rid:
                    return True
        return False

    def _poll_once(self) -> None:
        from kazoo.exceptions import KazooException

        if self._closed or self._state != "connected":
            return  # kazoo would queue the calls until it reconnects, holding this thread
        try:
            if self._rejoin:
                log.info("joining again as a new incarnation")
                self._join()
                return
            lease = self.lease
            if (self.fenced_since is None and lease is not None
                    and lease.lapses != self._caught_up and lease.holds(time.monotonic())):
                # The lease ran out and was renewed: read what was logged meanwhile
                # first, and stay fenced until it is applied (found by the simulator:
                # a sheep served a snapshot as missing).
                lapses = lease.lapses
                self._sync_log()
                with self._lease_lock:
                    self._catch_up_to = self._last_delivered
                    self._caught_up = lapses
                log.info("the session's lease holds again: serving once the log is applied"
                         " to position %d", self._catch_up_to)
            if self.fenced_since is not None:
                return
            self._sync_log()
            self._reap()
            self._publish()
            self._trim()
        except KazooException as error:
            raise SystemFailure(f"ZooKeeper: {error!r}") from error

    def _sync_log(self) -> None:
        """Read the records past the last one read; deliver those past from_seq."""
        names = self._client.get_children(self.log_path, watch=lambda _: self._wake.set())
        fresh = sorted((int(name[len(_record_prefix):]) + 1, name) for name in names
                       if name.startswith(_record_prefix))
        events: list[Event | Snapshot] = []
        if fresh and fresh[0][0] > self._last_seq + 1:
            # A gap: sequence numbers skip after a trim (ZooKeeper counts deletions too),
            # or what we have not read was trimmed. The snapshot says which.
            snapshot = self._load_snapshot(if_trimmed_past=self._last_seq)
            if snapshot is not None:
                if snapshot.seq + 1 < fresh[0][0] and self._trimmed_to > snapshot.seq:
                    raise SystemFailure("the cluster log was trimmed past its snapshot; retrying")
                if snapshot.seq > self._from_seq:
                    events.append(snapshot)
        for seq, name in fresh:
            if seq <= self._last_seq:
                continue
            data, stat = self._client.get(f"{self.log_path}/{name}")
            self._last_seq = seq
            event = self._consume(seq, json.loads(data), stat.ctime / 1000)
            if event is not None:
                self._last_delivered = seq
                if seq > self._from_seq:
                    events.append(event)
        self._deliver(events)

    def _load_snapshot(self, if_trimmed_past: int) -> Snapshot | None:
        """The snapshot, taken over (membership included) if the log was trimmed past
        position if_trimmed_past; else None (nothing unread was trimmed)."""
        from kazoo.exceptions import NoNodeError

        try:
            data, _ = self._client.get(self.snapshot_path)
        except NoNodeError:
            return None
        value = json.loads(data)
        self._trimmed_to = int(value["trimmed_to"])
        if self._trimmed_to <= if_trimmed_past:
            return None
        self._membership = {str(k): str(v) for k, v in value["membership"].items()}
        self._nodes = {str(k): NodeInfo.from_json(v) for k, v in value["nodes"].items()}
        self._last_seq = self._last_delivered = int(value["seq"])
        return Snapshot(seq=int(value["seq"]), state=value["state"], epochs=value["epochs"])

    def _consume(self, seq: int, record: dict[str, Any], when: float) -> Event | None:
        kind = EventKind(record["kind"])
        if kind is EventKind.JOIN:
            node = NodeInfo.from_json(record["node"])
            self._membership[node.node_id] = str(record.get("incarnation", ""))
            self._nodes[node.node_id] = node
            return Event(seq=seq, kind=kind, time=when, node=node)
        if kind is EventKind.LEAVE:
            node_id = str(record["node_id"])
            if self._membership.get(node_id) != record.get("incarnation"):
                return None  # a duplicate, or about an incarnation that is gone already
            del self._membership[node_id]
            return Event(seq=seq, kind=kind, time=when, node_id=node_id,
                         reason=str(record.get("reason", "dead")))
        return Event(seq=seq, kind=kind, time=when, node_id=str(record.get("node_id", "")),
                     op_id=str(record.get("op_id", "")), body=dict(record.get("body", {})))

    def _reap(self) -> None:
        """Log a leave for every member whose znode is gone (its session ended)."""
        live = set(self._client.get_children(self.members_path,
                                             watch=lambda _: self._wake.set()))
        for node_id, incarnation in list(self._membership.items()):
            if _member_name(node_id) not in live:
                log.warning("member %s is gone (its ZooKeeper session ended)", node_id)
                self._append({"kind": EventKind.LEAVE.value, "node_id": node_id,
                              "reason": "dead", "incarnation": incarnation})


def make_zookeeper_driver(argument: str, secret: bytes | None = None) -> ZooKeeperDriver:
    hosts, prefix, timeout, trim = parse_spec(argument)
    return ZooKeeperDriver(hosts, prefix, timeout, trim, secret=secret)

