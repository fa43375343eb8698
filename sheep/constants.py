"""Every limit and default of the system, in one place.

Names carry their unit last (``object_size_default_bytes``, ``peer_timeout_ms``).
Relations between the numbers are asserted at import, so a bad edit fails at
once instead of at the first oversized frame.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB
PiB = 1024 * TiB

# --- network -------------------------------------------------------------
port_default = 7000
address_default = "127.0.0.1"
listen_backlog = 128

# --- objects -------------------------------------------------------------
object_size_default_bytes = 4 * MiB
object_size_min_bytes = 1 * MiB
object_size_max_bytes = 64 * MiB
copies_default = 3
copies_max = 8
# A copy's version (a u64 in the store): what a frame may name leaves room to count on.
version_max = 2**63 - 1
block_size_bytes = 4 * KiB  # unit of checksums and of discard alignment

# --- protocol ------------------------------------------------------------
proto_magic = 0x5344  # "SD"
proto_version = 2  # 2: the handshake, and a tag on every frame after it (sheep/auth.py)
# A data payload never exceeds one object; control payloads (JSON) are small.
payload_data_max_bytes = object_size_max_bytes
payload_control_max_bytes = 16 * MiB
# A sparse copy of an object (proto: FLAG_SPARSE) is an extent table, a u32 count and
# a (u32 offset, u32 length) per extent, then the extents' data: at most one extent per
# block, and never more data than the object holds.
extent_table_max_bytes = 4 + 8 * (object_size_max_bytes // block_size_bytes)
payload_max_bytes = max(payload_data_max_bytes + extent_table_max_bytes,
                        payload_control_max_bytes)
requests_in_flight_max = 256  # per connection; the server stops reading past it
request_bytes_in_flight_max = 32 * MiB  # payloads, reads and unsent replies, per connection

# --- placement -------------------------------------------------------------
weight_max_bytes = 2**60  # a node's weight (1 EiB); 0 stores nothing
zones_max = 2**32 - 1  # hosts and racks are numbered 0 to this

# --- cluster -------------------------------------------------------------
driver_poll_interval_ms = 50  # how often the local driver tails its log
member_check_interval_ms = 500  # how often it probes members' locks
member_death_detect_ms_max = 2000
op_timeout_ms = 30_000  # a cluster op not applied by then is reported failed
epoch_wait_ms = 5_000  # how long a request waits for the epochs to agree
node_ids_per_cluster_max = 16_384

# --- peers and gateway ---------------------------------------------------
peer_connect_timeout_ms = 2_000
peer_timeout_ms = 30_000
# A connection whose peer stops answering (a pulled cable, a host cut off: no reset
# ever comes) is declared dead after this long: TCP_USER_TIMEOUT, which bounds both
# unanswered keepalive probes (sent every second while idle) and unacknowledged data.
# It also ends a connection whose peer keeps a zero receive window that long (a sheep
# stops reading a connection only while 256 requests or 32 MiB of it are in flight),
# so it is not made shorter: such a connection is retried or failed over, like a dead one.
dead_peer_timeout_ms = 8_000
dead_peer_probe_interval_s = 1
gateway_retry_total_ms = 20_000  # a write retries across epochs this long
gateway_retry_backoff_ms = 50

# --- store ---------------------------------------------------------------
lmdb_map_size_bytes = 4 * GiB  # sparse; a store's metadata stays far below it
lmdb_max_dbs = 8
object_fanout_dirs = 256

# --- VDIs (see sheep/oid.py for how these bound the object id) -----------
generation_bits = 28
index_bits = 32
vdi_size_max_bytes = 16 * PiB

assert object_size_min_bytes <= object_size_default_bytes <= object_size_max_bytes
for _size in (object_size_min_bytes, object_size_default_bytes, object_size_max_bytes):
    assert _size & (_size - 1) == 0, "object sizes are powers of two"
assert object_size_min_bytes % block_size_bytes == 0
assert payload_data_max_bytes <= payload_max_bytes
assert payload_max_bytes < 2**32, "payload length travels in a u32"
assert object_size_max_bytes < 2**32, "extent offsets and lengths travel in a u32"
assert 1 <= copies_default <= copies_max
assert driver_poll_interval_ms * 4 <= member_death_detect_ms_max
assert member_check_interval_ms * 2 <= member_death_detect_ms_max
assert generation_bits + index_bits + 4 == 64
assert (2**index_bits) * object_size_default_bytes == vdi_size_max_bytes

# Background scrub: every sheep verifies its copies at this rate, one pass a day.
scrub_rate_default = 4 * MiB
scrub_interval_default_s = 24 * 3600

# Space a sheep keeps free for its metadata: below it, writes that may need space are
# refused (NoSpace) so that flushes, removals and recovery bookkeeping still commit.
space_reserve_bytes = 32 * MiB

# Authentication (sheep/auth.py, sheep/net.py): a connection that has not finished its
# handshake within this long is closed; until then its frames may be this large.
handshake_timeout_s = 10.0
handshake_payload_max_bytes = 4096
