"""Who may send which op (proto.Caller): peer ops only from cluster members.

Today the only evidence is a connection's remote address. On loopback every
sheep is 127.0.0.1, so a non-member here is a connection from another loopback
address (127.0.0.2), or a session given a made-up address.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sheep import auth, proto
from sheep.errors import PermissionDenied, Result
from sheep.net import Session
from sheep.oid import ObjectType, make_oid
from sheep.proto import Header, Op
from sheep.testing.cluster import LocalCluster, raw_call
from sheep.testing.inprocess import InProcessCluster

object_size = 4 << 20


@pytest.fixture(scope="module")
def inprocess(tmp_path_factory) -> Iterator[InProcessCluster]:
    with InProcessCluster(str(tmp_path_factory.mktemp("callers")), nodes=2) as cluster:
        with cluster.client(0) as client:
            client.format(2, object_size)
        yield cluster


def dispatch(cluster: InProcessCluster, header: Header, payload: bytes, peer: object) -> bytes:
    sheep = cluster.sheep[0]

    async def call() -> bytes:
        session = Session(peer)
        # Authenticated with the node key: what is left to check is the address.
        session.principal = auth.Principal(auth.NODE, auth.Caps(node=True))
        data, _ = await sheep.dispatch(header, payload, session)
        return bytes(data)

    return cluster.run(call())


@pytest.mark.parametrize("peer", [("192.0.2.7", 40000), ("::ffff:192.0.2.7", 40000, 0, 0),
                                  "", None], ids=["ipv4", "ipv6", "unix", "none"])
def test_a_peer_op_from_a_non_member_address_is_refused(inprocess, peer):
    sheep = inprocess.sheep[0]
    oid = make_oid(ObjectType.RAW, 0, 1)
    write = Header(opcode=Op.WRITE_PEER, epoch=sheep.group.epoch, oid=oid, count=5)
    with pytest.raises(PermissionDenied, match="write_peer is for cluster members only"):
        dispatch(inprocess, write, b"hello", peer)
    assert oid not in sheep.store.list_oids()


def test_a_peer_op_from_a_members_address_is_served(inprocess):
    sheep = inprocess.sheep[0]
    oid = make_oid(ObjectType.RAW, 0, 2)
    create = Header(opcode=Op.CREATE_AND_WRITE_PEER, epoch=sheep.group.epoch, oid=oid, count=5)
    dispatch(inprocess, create, b"hello", ("::ffff:127.0.0.1", 40000, 0, 0))
    read = Header(opcode=Op.READ_PEER, epoch=sheep.group.epoch, oid=oid, count=5)
    assert dispatch(inprocess, read, b"", ("127.0.0.1", 40001)) == b"hello"


def test_client_and_admin_ops_need_no_membership(inprocess):
    ping = dispatch(inprocess, Header(opcode=Op.PING), b"", ("192.0.2.7", 40000))
    assert proto.decode_json(ping)["joined"]
    listing = Header(opcode=Op.LIST_PEER, epoch=inprocess.sheep[0].group.epoch)
    assert isinstance(proto.decode_json(dispatch(inprocess, listing, b"", None)), list)


def test_real_sheep_refuse_peer_writes_from_a_non_member_and_members_still_work(tmp_path):
    with LocalCluster(str(tmp_path), nodes=3) as cluster:
        cluster.start()
        cluster.format(copies=2, object_size=object_size)
        oid = make_oid(ObjectType.RAW, 0, 7)
        with cluster.client(0) as client:
            client.create_and_write(oid, b"through the gateway")  # fans out: peer ops
            epoch = client.node_info()["epoch"]
        holder = cluster.object_files(oid)[0]
        port = cluster.sheep[holder].port
        write = Header(opcode=Op.WRITE_PEER, epoch=epoch, oid=oid, count=8)
        reply, message = raw_call(port, write, b"intruder", source="127.0.0.2",
                                  credentials=cluster.credentials)
        assert reply.result == Result.PERMISSION_DENIED
        assert "members only" in proto.error_message(message)
        reply, _ = raw_call(port, write, b"a member", source="127.0.0.1", credentials=cluster.credentials)
        assert reply.result == Result.SUCCESS
        with open(cluster.object_path(holder, oid), "rb") as file:
            assert file.read(8) == b"a member"
        with cluster.client(1) as client:
            client.write(oid, b"members!")
        for node in cluster.sheep:
            with cluster.client(node.index) as client:
                assert client.read(oid, 0, 8) == b"members!"
        listing = Header(opcode=Op.LIST_PEER, epoch=epoch)
        reply, data = raw_call(port, listing, source="127.0.0.2",  # dog cluster check
                               credentials=cluster.credentials)
        assert reply.result == Result.SUCCESS and oid in proto.decode_json(data)
        # A fourth sheep joins and recovers from the others: its peer ops are served.
        cluster.start(cluster.add().index)
        cluster.wait_recovered()
        with cluster.client(3) as client:
            assert client.read(oid, 0, 8) == b"members!"

