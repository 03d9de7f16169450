"""pktipc control protocol, version 2, as a sans-IO state machine.

The rules it keeps:

- Every frame is one msgpack map holding "t" (the message type), "v" (the
  protocol version) and exactly the fields SCHEMAS lists for that type.
- A client's first message is HELLO; the broker answers WELCOME or ERROR.
  WELCOME names the client's group, its balance mode and the client's slot.
  Only STATS, BYE and HELLO may come from a peer that is not attached.
- ERROR refuses one message and changes nothing else (after HELLO: the
  client stays unattached). Only EVICT ends an attachment from the broker's
  side, BYE from the client's.
- Batches go to attached clients only; a client gives each one back with
  RELEASE. END-OF-STREAM follows the last batch. A BATCH names the packets
  of the slab that are the client's (its share of its group's packets,
  pktipc/PROTOCOL.md): `mask` has a bit for each of the slab's `n` packets and
  no other, and a client's own slot is among `members` if any are named.
- Both sides send HEARTBEAT when they have been quiet for an interval (a
  client until BYE, after END-OF-STREAM too); a peer not heard from for its
  liveness is lost (but a broker that has sent END-OF-STREAM).
- A client that lost its broker (silent for its liveness, or a new broker
  that does not know it) is LOST: it tries again, on a new connection, at
  times get_timer() gives (RetryDue), until WELCOME or its `reconnect`
  window is over (ReconnectAbandoned). Every deadline is in get_timer().
- A client says something (HEARTBEAT) as soon as it has mapped the segment
  WELCOME named; the broker keeps its segment until it has heard from every
  client it welcomed.
- An attached client that sends offers its TX area once (TX_OPEN); the
  broker answers TX_READY or ERROR. TX names the next `n` slots of the area,
  in order, never more than are given back; the broker answers each TX with
  one TX_DONE, in order, once it has copied every frame it names into the
  kernel's TX ring or refused it.
- Every field of every incoming frame is checked. On the broker a bad frame
  queues an ERROR reply and raises RemoteProtocolError; nothing else may
  escape the receive path.

No I/O and no clock here: callers hand in frames and `now` (seconds, any
monotonic origin), and take out frames to send and events.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

import msgpack

VERSION = 2
MAX_FRAME = 64 * 1024             # what the broker accepts from a peer
MAX_BROKER_FRAME = 64 * 1024 * 1024   # what a client accepts (STATS of a big broker)
MAX_RELEASE = 4096
MAX_CREDIT = 4096
MAX_TEXT = 1024
MAX_MEMBERS = 1024                # slots a BATCH may name
MAX_TX = 65536                    # slots a TX may name (PKTIPC_TX_MAX_FRAMES)
MAX_IFACES = 4096                 # sources of a broker (PKTIPC_MAX_IFACES)
BROKER_MISSED_HEARTBEATS = 5
# What a peer may send the broker: `rate` messages a second (the broker's
# choice), in bursts of BURST_SECONDS of them, and an attached client one
# more for each BATCH it was sent (its RELEASE). Peers not attached share a
# budget per `key` the broker gives (a process). Beyond its budget a message
# is dropped unread, and counted; a peer that goes on is flooding: FLOOD_RUN
# messages dropped in a row.
CONTROL_RATE = 50.0
BURST_SECONDS = 4.0
FLOOD_RUN = 100
MAX_STRANGERS = 1024              # budgets kept for peers not attached
# A client that lost its broker looks for the one that takes its place: an
# attempt (HELLO on a new connection) every BACKOFF_MIN seconds, twice as
# long after each failed one up to BACKOFF_MAX, each given ATTEMPT_MAX for
# its WELCOME, for `reconnect` seconds in all (DEFAULT_RECONNECT).
BACKOFF_MIN, BACKOFF_MAX, ATTEMPT_MAX = 0.05, 1.0, 1.0
DEFAULT_TIMEOUT = 5.0             # for a client's first attachment
DEFAULT_RECONNECT = 30.0
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


class ProtocolError(Exception):
    """A protocol rule was broken; `code` is the ERROR code sent for it."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


class LocalProtocolError(ProtocolError):
    """This side tried to break the protocol (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol."""


# --- fields --------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One field's rule. Plain data, so that the C client's copy of these
    rules is generated from them (pktipc/_tools/cschema.py) rather than rewritten."""

    kind: str                       # "int", "str", "name", "one_of", "seqs", "slots",
                                    # "bytes", "map"
    lo: int = 0                     # int: bounds; seqs: list length
    hi: int = 0                     # int: bounds; str: length; seqs, slots: list length
    values: tuple[str, ...] = ()    # one_of
    optional: bool = False          # None is allowed too

    def __call__(self, x: Any) -> bool:
        if x is None:
            return self.optional
        if self.kind == "int":
            return type(x) is int and self.lo <= x <= self.hi
        if self.kind == "str":
            return type(x) is str and len(x) <= self.hi
        if self.kind == "name":
            from ._paths import NAME_RE

            return type(x) is str and NAME_RE.fullmatch(x) is not None
        if self.kind == "one_of":
            return type(x) is str and x in self.values
        if self.kind == "seqs":
            return (type(x) is list and self.lo <= len(x) <= self.hi
                    and all(type(s) is int and 0 <= s <= U64 for s in x))
        if self.kind == "slots":    # distinct u32s
            return (type(x) is list and len(x) <= self.hi
                    and all(type(s) is int and 0 <= s <= U32 for s in x)
                    and len(set(x)) == len(x))      # hashable only once checked
        if self.kind == "bytes":
            return type(x) is bytes
        return type(x) is dict      # map


def _int(lo: int, hi: int) -> Check:
    return Check("int", lo=lo, hi=hi)


def _str(maxlen: int) -> Check:
    return Check("str", hi=maxlen)


def _opt(check: Check) -> Check:
    return replace(check, optional=True)


def _one_of(*values: str) -> Check:
    return Check("one_of", values=values)


_name = Check("name")
_seqs = Check("seqs", lo=1, hi=MAX_RELEASE)
_map = Check("map")
_slots = Check("slots", hi=MAX_MEMBERS)
_bytes = Check("bytes")
_lens = Check("seqs", lo=1, hi=MAX_IFACES)      # a u64 per interface


POLICIES = ("block", "drop")
BALANCES = ("flow", "round-robin")

SCHEMAS: dict[str, dict[str, Check]] = {
    # client -> broker
    "hello": {"name": _name, "group": _opt(_name), "policy": _opt(_one_of(*POLICIES)),
              "credit": _opt(_int(1, MAX_CREDIT)), "pid": _int(0, U32),
              "balance": _opt(_one_of(*BALANCES))},
    "release": {"seqs": _seqs},
    "stats": {},
    "bye": {},
    "tx_open": {"shm": _str(255)},
    "tx": {"first": _int(0, U64), "n": _int(1, MAX_TX)},
    # broker -> client
    "welcome": {"shm": _str(255), "epoch": _int(0, U64), "layout": _int(0, U32),
                "slot": _int(0, U32), "credit": _int(1, MAX_CREDIT),
                "policy": _one_of(*POLICIES), "heartbeat_ms": _int(1, U32),
                "liveness_ms": _int(1, U32), "group": _name, "balance": _one_of(*BALANCES)},
    "batch": {"seq": _int(0, U64), "slab": _int(0, U32), "gen": _int(0, U32),
              "n": _int(1, U32), "members": _slots, "mask": _opt(_bytes)},
    "gap": {"from": _int(0, U64), "to": _int(0, U64)},
    "eos": {"error": _opt(_str(1024))},
    "error": {"code": _str(64), "text": _str(MAX_TEXT)},
    "evict": {"code": _str(64), "text": _str(MAX_TEXT)},
    "stats_reply": {"stats": _map},
    "tx_ready": {"max_len": _lens},
    "tx_done": {"upto": _int(0, U64), "refused": _int(0, MAX_TX), "error": _opt(_str(MAX_TEXT))},
    # both ways
    "heartbeat": {},
}


@dataclass(frozen=True)
class Bitmap:
    """A rule across two fields of one message: field `bits` is nil or has
    one bit (bit i & 7 of byte i >> 3) for each of the `count` items that
    field `count` gives, and no bit set beyond. Plain data, as Check."""

    bits: str
    count: str

    def __call__(self, f: dict[str, Any]) -> bool:
        bits, n = f[self.bits], f[self.count]
        return bits is None or (len(bits) == (n + 7) // 8 and not (n % 8 and bits[-1] >> n % 8))


# Rules across the fields of one message, after each field passed SCHEMAS.
CROSS_CHECKS: dict[str, tuple[Bitmap, ...]] = {
    "batch": (Bitmap("mask", "n"),),      # one bit per packet of the slab
}


def _cross_check(mtype: str, fields: dict[str, Any]) -> bool:
    return all(rule(fields) for rule in CROSS_CHECKS.get(mtype, ()))


def encode(mtype: str, **fields: Any) -> bytes:
    """One frame; raises LocalProtocolError for a message SCHEMAS refuses."""
    schema = SCHEMAS.get(mtype)
    if schema is None:
        raise LocalProtocolError("unknown-type", f"no message type {mtype!r}")
    if set(fields) != set(schema):
        raise LocalProtocolError("bad-field", f"{mtype}: fields {sorted(fields)}")
    for key, check in schema.items():
        if not check(fields[key]):
            raise LocalProtocolError("bad-field", f"{mtype}.{key} = {fields[key]!r}")
    if not _cross_check(mtype, fields):
        raise LocalProtocolError("bad-field", f"{mtype}: fields disagree")
    out: bytes = msgpack.packb({"t": mtype, "v": VERSION, **fields}, use_bin_type=True)
    return out


def _pairs_announced(frame: bytes) -> int:
    """The pairs a frame that holds one msgpack map says it has."""
    if frame[0] & 0xF0 == 0x80:        # fixmap
        return frame[0] & 0x0F
    return int.from_bytes(frame[1:3] if frame[0] == 0xDE else frame[1:5], "big")


def decode(frame: bytes, limit: int = MAX_FRAME) -> tuple[str, dict[str, Any]]:
    """(type, fields) of a frame; RemoteProtocolError for anything else."""
    if len(frame) > limit:
        raise RemoteProtocolError("too-large", f"frame of {len(frame)} bytes, limit {limit}")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # any decoding failure of untrusted bytes
        raise RemoteProtocolError("malformed",
                                  f"not a msgpack frame ({type(e).__name__})") from None
    if type(msg) is not dict:
        raise RemoteProtocolError("malformed", "frame is not a map")
    if len(msg) != _pairs_announced(frame):     # a repeated key: which one counts?
        raise RemoteProtocolError("malformed", "a key is repeated")
    if msg.get("v") != VERSION or type(msg.get("v")) is not int:
        raise RemoteProtocolError("version", f"protocol version {msg.get('v')!r}, "
                                  f"this broker speaks {VERSION}")
    mtype = msg.pop("t", None)
    del msg["v"]
    schema = SCHEMAS.get(mtype) if type(mtype) is str else None
    if schema is None:
        raise RemoteProtocolError("unknown-type", f"unknown message type {mtype!r}")
    if set(msg) != set(schema):
        extra = sorted(set(msg) - set(schema), key=str)
        missing = sorted(set(schema) - set(msg))
        raise RemoteProtocolError("bad-field", f"{mtype}: missing {missing}, unexpected {extra}")
    for key, check in schema.items():
        if not check(msg[key]):
            raise RemoteProtocolError("bad-field", f"{mtype}.{key}: bad value")
    if not _cross_check(mtype, msg):
        raise RemoteProtocolError("bad-field", f"{mtype}: fields disagree")
    return mtype, msg


# --- events ----------------------------------------------------------------


@dataclass(frozen=True)
class HelloReceived:
    peer: bytes
    name: str
    group: str | None
    policy: str | None
    credit: int | None
    pid: int                        # as claimed; the edge puts the kernel's in its place
    balance: str | None = None
    uid: int | None = None          # the kernel's, for local peers (set by the edge)


@dataclass(frozen=True)
class ReleaseReceived:
    peer: bytes
    seqs: list[int]


@dataclass(frozen=True)
class StatsRequested:
    peer: bytes


@dataclass(frozen=True)
class ByeReceived:
    peer: bytes


@dataclass(frozen=True)
class PeerTimedOut:
    peer: bytes


@dataclass(frozen=True)
class PeerFlooding:
    """The peer sent FLOOD_RUN messages in a row beyond its budget."""

    peer: bytes


@dataclass(frozen=True)
class TxAreaOffered:
    """The client names its TX area, to be mapped read-only."""

    peer: bytes
    shm: str


@dataclass(frozen=True)
class FramesSubmitted:
    """Slots first .. first + n - 1 (mod the area's slots) are to be sent."""

    peer: bytes
    first: int
    n: int


@dataclass(frozen=True)
class Welcomed:
    shm: str
    epoch: int
    layout: int
    slot: int
    credit: int
    policy: str
    heartbeat_ms: int
    liveness_ms: int
    group: str
    balance: str


@dataclass(frozen=True)
class BatchAnnounced:
    """A slab handed to a client; its share is the packets set in `mask`
    (None: all) that `members`, if any, give to the client's slot."""

    seq: int
    slab: int
    gen: int
    n: int
    members: tuple[int, ...] = ()
    mask: bytes | None = None


@dataclass(frozen=True)
class GapReported:
    start: int
    end: int


@dataclass(frozen=True)
class StreamEnded:
    error: str | None


@dataclass(frozen=True)
class RequestRefused:
    code: str
    text: str


@dataclass(frozen=True)
class Evicted:
    code: str
    text: str


@dataclass(frozen=True)
class StatsReceived:
    stats: dict[str, Any]


@dataclass(frozen=True)
class TxReady:
    """The broker mapped the TX area: the longest frame each of its
    interfaces sends (0: none)."""

    max_len: tuple[int, ...]


@dataclass(frozen=True)
class FramesTaken:
    """Every slot before `upto` is the client's again: its frames were
    copied into the kernel's TX ring, but `refused` of them (the first
    refusal's reason in `error`)."""

    upto: int
    refused: int
    error: str | None


@dataclass(frozen=True)
class ConnectionLost:
    """The broker is gone (silent for its liveness, or a new one that does
    not know us): `retrying` if a broker taking its place is looked for."""

    why: str
    retrying: bool


@dataclass(frozen=True)
class RetryDue:
    """Time to attach again: a new connection, then hello()."""


@dataclass(frozen=True)
class AttemptFailed:
    """An attempt got no WELCOME in time, or was turned away: its
    connection is to be closed; the next is due later."""


@dataclass(frozen=True)
class ReconnectAbandoned:
    """No broker took the lost one's place within `reconnect` seconds."""

    why: str


BrokerEvent = (HelloReceived | ReleaseReceived | StatsRequested | ByeReceived | PeerTimedOut
               | PeerFlooding | TxAreaOffered | FramesSubmitted)
ClientEvent = (Welcomed | BatchAnnounced | GapReported | StreamEnded | RequestRefused | Evicted
               | StatsReceived | ConnectionLost | RetryDue | AttemptFailed
               | ReconnectAbandoned | TxReady | FramesTaken)


# --- states ----------------------------------------------------------------


class State(enum.Enum):
    NEW = "new"                # broker: a peer not attached; client: HELLO not sent
    HELLO_SENT = "hello-sent"  # client: waiting for WELCOME
    ATTACHED = "attached"
    ENDED = "ended"            # client: END-OF-STREAM received
    LOST = "lost"              # client: the broker is lost; a new attempt is due at a time
    CLOSED = "closed"


# What each side may receive in each state, and the state it moves to.
BROKER_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.NEW, "hello"): State.NEW,          # attached only when the broker accepts
    (State.NEW, "stats"): State.NEW,
    (State.NEW, "bye"): State.NEW,
    (State.ATTACHED, "release"): State.ATTACHED,
    (State.ATTACHED, "heartbeat"): State.ATTACHED,
    (State.ATTACHED, "stats"): State.ATTACHED,
    (State.ATTACHED, "bye"): State.CLOSED,
    (State.ATTACHED, "tx_open"): State.ATTACHED,
    (State.ATTACHED, "tx"): State.ATTACHED,
}

CLIENT_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.NEW, "stats_reply"): State.NEW,
    (State.NEW, "error"): State.NEW,
    (State.HELLO_SENT, "welcome"): State.ATTACHED,
    (State.HELLO_SENT, "error"): State.CLOSED,
    (State.HELLO_SENT, "stats_reply"): State.HELLO_SENT,
    (State.ATTACHED, "batch"): State.ATTACHED,
    (State.ATTACHED, "gap"): State.ATTACHED,
    (State.ATTACHED, "heartbeat"): State.ATTACHED,
    (State.ATTACHED, "stats_reply"): State.ATTACHED,
    (State.ATTACHED, "eos"): State.ENDED,
    (State.ATTACHED, "error"): State.ATTACHED,
    (State.ATTACHED, "evict"): State.CLOSED,
    (State.ENDED, "heartbeat"): State.ENDED,
    (State.ENDED, "stats_reply"): State.ENDED,
    (State.ENDED, "error"): State.ENDED,
    (State.ENDED, "evict"): State.CLOSED,
    (State.ATTACHED, "tx_ready"): State.ATTACHED,
    (State.ATTACHED, "tx_done"): State.ATTACHED,
    (State.ENDED, "tx_ready"): State.ENDED,
    (State.ENDED, "tx_done"): State.ENDED,
}


@dataclass
class _Budget:
    """A token bucket: messages a peer may still send."""

    rate: float
    burst: float
    tokens: float
    stamp: float
    run: int = 0            # messages dropped since the last one taken

    def take(self, now: float) -> bool:
        if self.tokens < self.burst:    # (tokens given for batches may exceed it)
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.run = 0
            return True
        self.run += 1
        return False


@dataclass
class _Peer:
    last_recv: float
    last_sent: float
    budget: _Budget
    heard: bool = False     # a message came after WELCOME: the client mapped the segment


class BrokerConnection:
    """The broker's side: any number of peers, keyed by routing id."""

    def __init__(self, *, heartbeat: float = 1.0, liveness: float = 30.0,
                 rate: float = CONTROL_RATE) -> None:
        if not 0 < heartbeat < liveness:
            raise ValueError("heartbeat interval must be positive and below the liveness")
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.rate = rate
        self.peers: dict[bytes, _Peer] = {}
        self.strangers: dict[object, _Budget] = {}  # by key, oldest first
        self.errors = 0
        self.dropped = 0            # messages beyond a peer's budget
        self._out: list[tuple[bytes, bytes]] = []

    def state(self, peer: bytes) -> State:
        return State.ATTACHED if peer in self.peers else State.NEW

    def heard(self, peer: bytes) -> bool:
        """Whether an attached peer has said anything since WELCOME: it has
        mapped the segment then (see ClientConnection.mapped)."""
        p = self.peers.get(peer)
        return p is not None and p.heard

    # -- receiving --
    def _new_budget(self, now: float) -> _Budget:
        burst = self.rate * BURST_SECONDS
        return _Budget(self.rate, burst, burst, now)

    def _budget(self, peer: bytes, key: object, now: float) -> _Budget:
        p = self.peers.get(peer)
        if p is not None:
            return p.budget
        b = self.strangers.pop(key, None)
        if b is None:
            b = self._new_budget(now)
            while len(self.strangers) >= MAX_STRANGERS:
                del self.strangers[next(iter(self.strangers))]
        self.strangers[key] = b         # the most recent last
        return b

    def receive(self, peer: bytes, frame: bytes, now: float,
                key: object = None) -> list[BrokerEvent]:
        """Events for one frame from `peer`. A bad frame queues an ERROR reply,
        counts it, and raises RemoteProtocolError. A frame beyond the peer's
        budget (while not attached, the budget of `key`, by default the peer)
        is dropped unread (PeerFlooding once it keeps on)."""
        b = self._budget(peer, peer if key is None else key, now)
        if not b.take(now):
            self.dropped += 1
            return [PeerFlooding(peer)] if b.run == FLOOD_RUN else []
        try:
            mtype, f = decode(frame)
            state = self.state(peer)
            if (state, mtype) not in BROKER_TRANSITIONS:
                code = "not-attached" if state is State.NEW else "unexpected"
                raise RemoteProtocolError(code, f"{mtype} not allowed from a {state.value} peer")
        except RemoteProtocolError as e:
            self.errors += 1
            self._send(peer, "error", now, code=e.code, text=e.text[:MAX_TEXT])
            raise
        p = self.peers.get(peer)
        if p is not None:
            p.last_recv = now
            p.heard = True
        if BROKER_TRANSITIONS[(state, mtype)] is State.CLOSED:
            del self.peers[peer]
        if mtype == "hello":
            return [HelloReceived(peer, f["name"], f["group"], f["policy"], f["credit"],
                                  f["pid"], f["balance"])]
        if mtype == "release":
            return [ReleaseReceived(peer, f["seqs"])]
        if mtype == "stats":
            return [StatsRequested(peer)]
        if mtype == "bye":
            return [ByeReceived(peer)] if state is State.ATTACHED else []
        if mtype == "tx_open":
            return [TxAreaOffered(peer, f["shm"])]
        if mtype == "tx":
            return [FramesSubmitted(peer, f["first"], f["n"])]
        return []  # heartbeat

    # -- decisions and sends --
    def accept(self, peer: bytes, now: float, *, shm: str, epoch: int, layout: int,
               slot: int, credit: int, policy: str, group: str, balance: str) -> None:
        if peer in self.peers:
            raise LocalProtocolError("unexpected", "peer already attached")
        frame = encode("welcome", shm=shm, epoch=epoch, layout=layout, slot=slot,
                       credit=credit, policy=policy, heartbeat_ms=round(self.heartbeat * 1000),
                       liveness_ms=round(self.liveness * 1000), group=group, balance=balance)
        self.peers[peer] = _Peer(last_recv=now, last_sent=now, budget=self._new_budget(now))
        self._out.append((peer, frame))

    def refuse(self, peer: bytes, now: float, code: str, text: str) -> None:
        """Refuses one message; an attached peer stays attached."""
        self.errors += 1
        self._send(peer, "error", now, code=code, text=text[:MAX_TEXT])

    def send_batch(self, peer: bytes, now: float, seq: int, slab: int, gen: int, n: int,
                   members: tuple[int, ...] = (), mask: bytes | None = None) -> None:
        self._attached(peer)
        budget = self.peers[peer].budget
        budget.tokens = min(budget.tokens + 1, budget.burst + MAX_CREDIT)  # for its RELEASE
        self._send(peer, "batch", now, seq=seq, slab=slab, gen=gen, n=n, members=list(members),
                   mask=mask)

    def send_tx_ready(self, peer: bytes, now: float, max_len: list[int]) -> None:
        self._attached(peer)
        self._send(peer, "tx_ready", now, max_len=max_len)

    def send_tx_done(self, peer: bytes, now: float, upto: int, refused: int,
                     error: str | None) -> None:
        self._attached(peer)
        budget = self.peers[peer].budget
        budget.tokens = min(budget.tokens + 1, budget.burst + MAX_CREDIT)  # for its next TX
        self._send(peer, "tx_done", now, upto=upto, refused=refused,
                   error=None if error is None else error[:MAX_TEXT])

    def send_gap(self, peer: bytes, now: float, start: int, end: int) -> None:
        self._attached(peer)
        self._send(peer, "gap", now, **{"from": start, "to": end})

    def send_eos(self, peer: bytes, now: float, error: str | None = None) -> None:
        self._attached(peer)
        self._send(peer, "eos", now, error=error)

    def send_stats(self, peer: bytes, now: float, stats: dict[str, Any]) -> None:
        self._send(peer, "stats_reply", now, stats=stats)

    def evict(self, peer: bytes, now: float, code: str, text: str) -> None:
        """Detaches a peer, telling it why."""
        self._attached(peer)
        self._send(peer, "evict", now, code=code, text=text[:MAX_TEXT])
        del self.peers[peer]

    def forget(self, peer: bytes) -> None:
        """Detaches a peer that cannot be told (unreachable), or is cut off."""
        self.peers.pop(peer, None)

    def _attached(self, peer: bytes) -> None:
        if peer not in self.peers:
            raise LocalProtocolError("not-attached", "peer is not attached")

    def _send(self, peer: bytes, mtype: str, now: float, **fields: Any) -> None:
        self._out.append((peer, encode(mtype, **fields)))
        p = self.peers.get(peer)
        if p is not None:
            p.last_sent = now

    def frames_to_send(self) -> list[tuple[bytes, bytes]]:
        out, self._out = self._out, []
        return out

    # -- time --
    def get_timer(self) -> float | None:
        if not self.peers:
            return None
        return min(min(p.last_sent + self.heartbeat, p.last_recv + self.liveness)
                   for p in self.peers.values())

    def handle_timer(self, now: float) -> list[BrokerEvent]:
        lost: list[BrokerEvent] = []
        for peer, p in list(self.peers.items()):
            if p.last_recv + self.liveness <= now:
                # Told, in case it is alive but silent: it must stop reading
                # the slabs it held, which are about to be reused.
                self._send(peer, "evict", now, code="timeout",
                           text=f"nothing heard for {self.liveness:g} s")
                del self.peers[peer]
                lost.append(PeerTimedOut(peer))
            elif p.last_sent + self.heartbeat <= now:
                self._send(peer, "heartbeat", now)
        return lost


class ClientConnection:
    """A client's side of its broker connections: one attachment, and, once
    the broker is lost, the attempts to attach to the one that takes its
    place (`reconnect` seconds in all; 0: never). Each attempt is a new
    connection the edge opens when RetryDue says so, with hello()."""

    def __init__(self, reconnect: float = 0.0) -> None:
        self.reconnect = reconnect
        self.state = State.NEW
        self.slot: int | None = None       # from WELCOME
        self.heartbeat = 1.0
        self.liveness = 30.0
        self.reconnects = 0                # attachments to a broker that took a lost one's place
        self.lost_at: float | None = None  # the broker was lost then (None: it was not)
        self._last_recv = 0.0
        self._last_sent = 0.0
        self._retry_at = 0.0
        self._attempt_end = 0.0
        self._backoff = BACKOFF_MIN
        self._out: list[bytes] = []

    def hello(self, now: float, *, name: str, group: str | None = None,
              policy: str | None = None, credit: int | None = None, pid: int = 0,
              balance: str | None = None) -> None:
        """The first message of an attachment, or of an attempt after RetryDue."""
        if self.state is State.LOST and self.lost_at is not None:
            self._attempt_end = min(now + ATTEMPT_MAX, self.lost_at + self.reconnect)
        elif self.state is not State.NEW:
            raise LocalProtocolError("unexpected", "HELLO already sent")
        self._out.clear()
        self._send("hello", now, name=name, group=group, policy=policy, credit=credit, pid=pid,
                   balance=balance)
        self.state = State.HELLO_SENT

    def mapped(self, now: float) -> None:
        """Tells the broker that the segment WELCOME named is mapped: until it
        hears from a client after WELCOME, a broker keeps its segment, so a
        client it welcomed can always map it."""
        if self.state not in (State.ATTACHED, State.ENDED):
            raise LocalProtocolError("not-attached", f"mapped while {self.state.value}")
        self._send("heartbeat", now)
        if self.lost_at is not None:
            self.reconnects += 1
            self.lost_at = None

    def failed(self, now: float) -> list[ClientEvent]:
        """The edge could not make the attempt (no broker's socket there) or
        use its WELCOME (the segment is gone, or of a layout it does not
        read): BYE if welcomed, and, while looking for a broker to take a
        lost one's place, a later attempt (AttemptFailed); else CLOSED."""
        if self.state in (State.ATTACHED, State.ENDED):
            self._send("bye", now)
        if self.lost_at is None:
            self.state = State.CLOSED
            return []
        return self._failed(now)

    def request_stats(self, now: float) -> None:
        self._send("stats", now)

    def release(self, now: float, seqs: list[int]) -> None:
        if self.state not in (State.ATTACHED, State.ENDED):
            raise LocalProtocolError("not-attached", f"cannot release while {self.state.value}")
        for i in range(0, len(seqs), MAX_RELEASE):
            self._send("release", now, seqs=seqs[i : i + MAX_RELEASE])

    def tx_open(self, now: float, shm: str) -> None:
        """Offers the TX area named `shm` (answered by TX_READY or ERROR)."""
        self._attached_only("tx_open")
        self._send("tx_open", now, shm=shm)

    def tx(self, now: float, first: int, n: int) -> None:
        """Submits slots first .. first + n - 1 of the TX area."""
        self._attached_only("tx")
        self._send("tx", now, first=first, n=n)

    def _attached_only(self, what: str) -> None:
        if self.state is not State.ATTACHED:
            raise LocalProtocolError("not-attached", f"cannot {what} while {self.state.value}")

    def bye(self, now: float) -> None:
        if self.state in (State.ATTACHED, State.ENDED):
            self._send("bye", now)
        self.state = State.CLOSED

    def lost(self, now: float, why: str) -> list[ClientEvent]:
        """The broker is gone: the edge saw its connection end, or this
        machine did (liveness, a broker that does not know us)."""
        self._out.clear()
        if not self.reconnect:
            self.state = State.CLOSED
            return [ConnectionLost(why, retrying=False)]
        if self.lost_at is None:
            self.lost_at = now
            self._backoff = BACKOFF_MIN
        self.state = State.LOST
        self._retry_at = now
        return [ConnectionLost(why, retrying=True)]

    @property
    def retrying(self) -> bool:
        """Looking for a broker that takes a lost one's place."""
        return self.lost_at is not None and self.state in (State.LOST, State.HELLO_SENT)

    def _failed(self, now: float) -> list[ClientEvent]:
        self.state = State.LOST
        self._retry_at = now + self._backoff
        self._backoff = min(2 * self._backoff, BACKOFF_MAX)
        return [AttemptFailed()]

    def receive(self, frame: bytes, now: float) -> list[ClientEvent]:
        mtype, f = decode(frame, MAX_BROKER_FRAME)
        key = (self.state, mtype)
        if key not in CLIENT_TRANSITIONS:
            raise RemoteProtocolError("unexpected", f"{mtype} while {self.state.value}")
        if mtype == "batch" and f["members"] and self.slot not in f["members"]:
            raise RemoteProtocolError("bad-field", f"batch: slot {self.slot} not among members")
        if mtype == "error" and self.retrying and f["code"] == "name-taken":
            # Our old self may linger under our name a while: try again later.
            return self._failed(now)
        if mtype == "error" and self.state is State.ATTACHED and f["code"] == "not-attached":
            return self.lost(now, "restarted and no longer knows this client")
        self.state = CLIENT_TRANSITIONS[key]
        self._last_recv = now
        if mtype == "welcome":
            # The broker's loop never blocks for long, so it is declared lost
            # after a few missed heartbeats; liveness_ms is how long the broker
            # waits for us, which our heartbeat interval keeps well inside.
            self.heartbeat = max(1, min(f["heartbeat_ms"], f["liveness_ms"] // 3)) / 1000
            self.liveness = BROKER_MISSED_HEARTBEATS * f["heartbeat_ms"] / 1000
            self._last_sent = now
            self.slot = f["slot"]
            return [Welcomed(**f)]
        if mtype == "batch":
            return [BatchAnnounced(f["seq"], f["slab"], f["gen"], f["n"], tuple(f["members"]),
                                   f["mask"])]
        if mtype == "gap":
            return [GapReported(f["from"], f["to"])]
        if mtype == "eos":
            return [StreamEnded(f["error"])]
        if mtype == "error":
            return [RequestRefused(f["code"], f["text"])]
        if mtype == "evict":
            return [Evicted(f["code"], f["text"])]
        if mtype == "stats_reply":
            return [StatsReceived(f["stats"])]
        if mtype == "tx_ready":
            return [TxReady(tuple(f["max_len"]))]
        if mtype == "tx_done":
            return [FramesTaken(f["upto"], f["refused"], f["error"])]
        return []  # heartbeat

    def _send(self, mtype: str, now: float, **fields: Any) -> None:
        self._out.append(encode(mtype, **fields))
        self._last_sent = now

    def frames_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def get_timer(self) -> float | None:
        # Heartbeats go on after END-OF-STREAM, until BYE: a broker that
        # lingers keeps a client that has not closed. The broker may exit
        # once it has sent END-OF-STREAM, so it is never lost then.
        if self.state is State.ENDED:
            return self._last_sent + self.heartbeat
        if self.state is State.ATTACHED:
            return min(self._last_sent + self.heartbeat, self._last_recv + self.liveness)
        if self.retrying:
            assert self.lost_at is not None
            due = self._retry_at if self.state is State.LOST else self._attempt_end
            return min(due, self.lost_at + self.reconnect)
        return None

    def handle_timer(self, now: float) -> list[ClientEvent]:
        if self.retrying:
            assert self.lost_at is not None
            if now >= self.lost_at + self.reconnect:
                self.state = State.CLOSED
                return [ReconnectAbandoned(f"no broker took its place within "
                                           f"{self.reconnect:g} s")]
            if self.state is State.LOST:
                return [RetryDue()] if now >= self._retry_at else []
            return self._failed(now) if now >= self._attempt_end else []
        if self.state not in (State.ATTACHED, State.ENDED):
            return []
        if self.state is State.ATTACHED and self._last_recv + self.liveness <= now:
            return self.lost(now, "stopped answering")
        if self._last_sent + self.heartbeat <= now:
            self._send("heartbeat", now)
        return []
