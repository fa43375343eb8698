"""How long a sheep may keep serving while its ZooKeeper session is in doubt.

Pure arithmetic: times are the sheep's monotonic clock, passed in; nothing here
reads a clock. The ZooKeeper driver feeds it (sheep/cluster/zookeeper.py) and
docs/design.md "The session lease" gives the argument at length.

The others can act on this sheep's death only after ZooKeeper's leader expires
its session: at the earliest, T (the negotiated session timeout, on the
leader's clock) after the last touch of the session that the leader knows of.
So the sheep needs a lower bound on that touch, measured on its own clock:

- A (re)connect handshake touches the session at the leader itself (a new
  session is a leader proposal; a follower revalidates an existing one with the
  leader, which touches it). So a connect attempt that began at a and succeeded
  proves a touch at or after a.
- Requests to a follower touch it there, and the follower reports its touches
  to the leader in its answer to the leader's pings, every tickTime/2. A sync
  goes through the leader. So a sync sent at s_k that succeeded proves that the
  leader had the follower's answer to a ping received at or after
  s_k - tickTime/2 - jitter (the follower forwarded the sync after it, on the
  same connection), and with it every touch the follower had before: every
  earlier sync whose reply came back by then. ZooKeeper's default
  minSessionTimeout is 2 tickTime, so tickTime/2 <= T/4.

The lease runs from the latest proven touch for T less the clock-rate drift of
both clocks and a margin, and never longer than a fraction of T past the last
successful exchange (the "safe fraction": the proven bound is the hard limit, the
fraction keeps room for what the argument does not model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

#: The most the sheep serves past its last successful round trip, as a fraction of T.
lease_fraction = 0.5
#: The clock-rate error allowed for each clock (the sheep's and ZooKeeper's leader's):
#: 1%, two orders of magnitude above an undisciplined quartz clock.
clock_drift = 0.01
#: Slack for the delivery jitter of the leader's pings and for acting on the fence.
margin_s = 0.1
#: How often a sheep renews its lease (a sync through the leader), as a fraction of T.
renew_fraction = 0.1


@dataclass
class SessionLease:
    """The lease of one session with negotiated timeout T (seconds)."""

    timeout: float
    cap: float = math.inf  # the most it serves past the last exchange, whatever T is
    fraction: float = lease_fraction
    drift: float = clock_drift
    margin: float = margin_s
    until: float | None = None  # the lease holds while now < until
    last_exchange: float | None = None  # the send time of the last successful round trip
    proven: float | None = None  # a touch the leader surely knows of, at or after this
    lapses: int = 0  # how often a renewal found the lease run out (or never held)
    _replies: list[tuple[float, float]] = field(default_factory=list)  # (sent, answered)

    @property
    def renew_interval(self) -> float:
        return self.timeout * renew_fraction

    @property
    def report_delay(self) -> float:
        """The longest a follower's touch may take to be known to the leader, on the
        sheep's clock: half a tickTime on the leader's (tickTime <= T/2), and the
        jitter of the leader's pings."""
        return self.timeout / 4 * (1 + self.drift) / (1 - self.drift) + self.margin

    @property
    def after_touch(self) -> float:
        """How long, on the sheep's clock, after a proven touch the session surely
        cannot have expired yet, less the margin for acting on it."""
        return self.timeout * (1 - self.drift) / (1 + self.drift) - self.margin

    def holds(self, now: float) -> bool:
        return self.until is not None and now < self.until

    def remaining(self, now: float) -> float:
        return max(0.0, (self.until or now) - now)

    def connected(self, attempt_started: float, now: float) -> None:
        """A connect handshake that began at attempt_started succeeded: the leader
        touched the session at or after it."""
        self.proven = _latest(self.proven, attempt_started)
        self.last_exchange = _latest(self.last_exchange, attempt_started)
        self._extend(now)

    def answered(self, sent: float, now: float) -> None:
        """A sync sent at sent came back (through the leader) at now."""
        qualifying = [earlier for earlier, back in self._replies
                      if back <= sent - self.report_delay]
        if qualifying:
            # Only the newest proof counts from now on, and whatever came back after it.
            newest = max(qualifying)
            self._replies = [(earlier, back) for earlier, back in self._replies
                             if earlier >= newest]
            self.proven = _latest(self.proven, newest)
        self._replies.append((sent, now))
        self.last_exchange = _latest(self.last_exchange, sent)
        self._extend(now)

    def _extend(self, now: float) -> None:
        if self.proven is None or self.last_exchange is None:
            return
        until = min(self.last_exchange + min(self.timeout * self.fraction, self.cap),
                    self.proven + self.after_touch)
        if not self.holds(now) and until > now:
            self.lapses += 1  # it had run out: the owner catches up before serving again
        if self.until is None or until > self.until:
            self.until = until


def _latest(current: float | None, candidate: float) -> float:
    return candidate if current is None else max(current, candidate)
