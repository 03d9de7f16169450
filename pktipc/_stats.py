"""Statistics as typed, frozen records.

BrokerStats is a broker's STATS reply (pktipc.broker_stats(), Client.stats());
`reply` keeps the map as the broker sent it, which `pktipc status --json`
prints. ClientCounters is what a client counted itself (Client.counters).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._errors import PktipcError


@dataclass(frozen=True)
class BrokerCounters:
    """The broker's counters since it started (monotonic)."""

    packets: int            # placed in slabs
    bytes: int              # captured bytes placed in slabs
    batches: int            # published
    broker_drops: int       # packets the broker could not place
    client_drops: int       # deliveries skipped for lagging drop clients, all clients
    protocol_errors: int    # malformed or refused control messages
    clients: int            # attached now
    clients_total: int      # attachments, resumed ones included
    evictions: int          # clients the broker detached (not those that said goodbye)

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> BrokerCounters:
        return cls(*(int(d[f]) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class SlabStats:
    """The broker's ring: slab size in bytes, slabs, and slabs no client holds or is owed."""

    size: int
    count: int
    free: int


@dataclass(frozen=True)
class IfaceTxStats:
    """Sending on one interface (serve --tx): frames copied into its kernel
    TX ring, those waiting there now, the longest frame it takes, and the
    kernel's refusals by errno name."""

    sent: int
    pending: int
    max_len: int
    kernel_errors: Mapping[str, int]

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> IfaceTxStats:
        return cls(sent=int(d["sent"]), pending=int(d["pending"]), max_len=int(d["max_len"]),
                   kernel_errors={str(k): int(v) for k, v in d["kernel_errors"].items()})


@dataclass(frozen=True)
class ClientTxStats:
    """One client's sending: its TX area's slots, frames it named in TX
    messages, those the broker copied into a kernel ring, those it refused
    (by reason), those in a kernel ring now, and those waiting for room."""

    frames: int
    submitted: int
    sent: int
    refused: Mapping[str, int]
    in_ring: int
    waiting: int

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> ClientTxStats:
        return cls(frames=int(d["frames"]), submitted=int(d["submitted"]), sent=int(d["sent"]),
                   refused={str(k): int(v) for k, v in d["refused"].items()},
                   in_ring=int(d["in_ring"]), waiting=int(d["waiting"]))


@dataclass(frozen=True)
class XdpStats:
    """Capture through AF_XDP (serve --xdp): the XDP mode ("native" or
    "skb"), whether the driver does zero-copy, the receive queues captured,
    the segment's frame area (frames of frame_size bytes; those the kernel
    may fill now, those published slabs hold), frames the broker's filter
    left out, and the kernel's socket counters summed over the queues."""

    mode: str
    zero_copy: bool
    queues: tuple[int, ...]
    frame_size: int
    frames: int
    frames_free: int
    frames_held: int
    filtered: int
    rx_dropped: int
    rx_ring_full: int
    rx_fill_ring_empty_descs: int

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> XdpStats:
        return cls(mode=str(d["mode"]), zero_copy=bool(d["zero_copy"]),
                   queues=tuple(map(int, d["queues"])),
                   **{f: int(d[f]) for f in ("frame_size", "frames", "frames_free",
                                             "frames_held", "filtered", "rx_dropped",
                                             "rx_ring_full", "rx_fill_ring_empty_descs")})


@dataclass(frozen=True)
class SourceStats:
    """One source of the broker (a capture file or an interface). The
    kernel's counters are None for files, the fanout group None without one,
    `xdp` None unless the interface is captured through AF_XDP."""

    name: str
    kind: str               # "file" or "interface"
    linktype: int           # LINKTYPE_* value
    snaplen: int
    packets: int
    bytes: int
    ifindex: int | None = None
    kernel_packets: int | None = None
    kernel_drops: int | None = None
    kernel_freezes: int | None = None
    fanout_id: int | None = None
    fanout_mode: str | None = None
    tx: IfaceTxStats | None = None          # a broker that sends on it (serve --tx)
    xdp: XdpStats | None = None             # an interface captured through AF_XDP (--xdp)

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> SourceStats:
        def opt(key: str) -> int | None:
            return None if d.get(key) is None else int(d[key])

        return cls(name=str(d["name"]), kind=str(d.get("kind", "file")),
                   linktype=int(d["linktype"]), snaplen=int(d["snaplen"]),
                   packets=int(d["packets"]), bytes=int(d["bytes"]), ifindex=opt("ifindex"),
                   kernel_packets=opt("kernel_packets"), kernel_drops=opt("kernel_drops"),
                   kernel_freezes=opt("kernel_freezes"), fanout_id=opt("fanout_id"),
                   fanout_mode=None if d.get("fanout_mode") is None else str(d["fanout_mode"]),
                   tx=None if d.get("tx") is None else IfaceTxStats.from_reply(d["tx"]),
                   xdp=None if d.get("xdp") is None else XdpStats.from_reply(d["xdp"]))


@dataclass(frozen=True)
class ClientStats:
    """One client as the broker sees it."""

    name: str
    group: str
    slot: int
    policy: str             # "block" or "drop"
    credit: int             # batches it may hold at once
    pid: int
    batches: int            # handed to it
    packets: int            # handed to it
    drops: int              # skipped while it lagged (drop policy)
    held: int               # batches it holds now
    queued: int             # batches owed to it, waiting for its credit
    attached: bool          # False while its place is kept (--grace)
    gaps: int               # GAP notices sent to it
    reconnections: int      # times it came back to its kept place
    lag_packets: int        # owed to it and not given back yet
    lag_s: float            # how long it has held its oldest batch
    tx: ClientTxStats | None = None         # a client that sends (client.tx())

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> ClientStats:
        return cls(name=str(d["name"]), group=str(d["group"]), slot=int(d["slot"]),
                   policy=str(d["policy"]), credit=int(d["credit"]), pid=int(d["pid"]),
                   batches=int(d["batches"]), packets=int(d["packets"]), drops=int(d["drops"]),
                   held=int(d["held"]), queued=int(d["queued"]), attached=bool(d["attached"]),
                   gaps=int(d["gaps"]), reconnections=int(d["reconnections"]),
                   lag_packets=int(d["lag_packets"]), lag_s=float(d["lag_s"]),
                   tx=None if d.get("tx") is None else ClientTxStats.from_reply(d["tx"]))


@dataclass(frozen=True)
class GroupStats:
    """A group: how it balances, whether it is shared (named by its members)
    or a client's own, its members' names, how often they joined or left,
    and the packets handed to them."""

    name: str
    balance: str            # "flow" or "round-robin"
    shared: bool
    members: tuple[str, ...]
    changes: int
    packets: int

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> GroupStats:
        return cls(name=str(d["name"]), balance=str(d["balance"]), shared=bool(d["shared"]),
                   members=tuple(map(str, d["members"])), changes=int(d["changes"]),
                   packets=int(d["packets"]))


@dataclass(frozen=True)
class ControlStats:
    """The broker's control endpoint."""

    connections: int            # open now
    max_connections: int
    connections_refused: int    # too many, or a process in its back-off
    handshakes_failed: int
    connections_cut: int        # their peer flooded or did not read
    messages_over_budget: int   # dropped unread (serve --control-rate)
    connections_dropped: int    # closed under the broker by libzmq
    accepts_deferred: int       # found the file table full, and waited for room

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> ControlStats:
        return cls(*(int(d[f]) for f in cls.__dataclass_fields__))


@dataclass(frozen=True)
class GatewayClientStats:
    """A remote client of a gateway: its name, its CURVE public key ("" with
    --insecure), whether it is connected now, and what was forwarded to it."""

    name: str
    key: str
    attached: bool
    batches: int
    packets: int
    bytes: int

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> GatewayClientStats:
        return cls(name=str(d["name"]), key=str(d["key"] or ""), attached=bool(d["attached"]),
                   batches=int(d["batches"]), packets=int(d["packets"]), bytes=int(d["bytes"]))


@dataclass(frozen=True)
class GatewayStats:
    """The gateway a STATS reply came through (tcp://): where it listens,
    whether it speaks CURVE, its connections and handshakes, and what it
    forwarded; HELLOs it refused by code."""

    listen: str
    pid: int
    curve: bool
    connections: int
    handshakes_failed: int
    attachments: int
    batches: int
    packets: int
    bytes: int
    cut: int
    keys_refused: int
    stale_dropped: int      # sent by the broker to an attachment taken over: not forwarded
    refused: Mapping[str, int]
    clients: tuple[GatewayClientStats, ...]

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> GatewayStats:
        return cls(listen=str(d["listen"]), pid=int(d["pid"]), curve=bool(d["curve"]),
                   **{k: int(d[k]) for k in ("connections", "handshakes_failed",
                                             "attachments", "batches", "packets", "bytes",
                                             "cut", "keys_refused", "stale_dropped")},
                   refused={str(k): int(v) for k, v in d["refused"].items()},
                   clients=tuple(map(GatewayClientStats.from_reply, d["clients"])))


@dataclass(frozen=True)
class BrokerStats:
    """A broker's STATS reply. Counters are the broker run's own (a broker
    that takes a lost one's place starts again from 0: compare `epoch`)."""

    name: str
    pid: int
    epoch: int
    shm: str                # the segment's name
    endpoint: str
    state: str              # "starting", "running" or "ended"
    uptime_s: float
    start_time_s: float     # seconds since the Unix epoch
    counters: BrokerCounters
    slabs: SlabStats
    sources: tuple[SourceStats, ...]
    clients: tuple[ClientStats, ...]
    groups: tuple[GroupStats, ...]
    refused: Mapping[str, int]      # HELLOs refused, by code
    tx_refused: Mapping[str, int]   # TX_OPEN and TX refused, by code
    control: ControlStats
    reply: Mapping[str, Any] = field(repr=False, compare=False)
    gateway: GatewayStats | None = None     # a reply through a gateway (tcp://)

    @classmethod
    def from_reply(cls, d: Mapping[str, Any]) -> BrokerStats:
        """Reads a STATS reply; raises PktipcError if it is not one this version reads."""
        try:
            return cls(
                name=str(d["name"]), pid=int(d["pid"]), epoch=int(d["epoch"]),
                shm=str(d["shm"]), endpoint=str(d["endpoint"]), state=str(d["state"]),
                uptime_s=float(d["uptime_s"]), start_time_s=float(d["start_time_s"]),
                counters=BrokerCounters.from_reply(d["counters"]),
                slabs=SlabStats(*(int(d["slabs"][k]) for k in ("size", "count", "free"))),
                sources=tuple(map(SourceStats.from_reply, d["sources"])),
                clients=tuple(map(ClientStats.from_reply, d["clients"])),
                groups=tuple(map(GroupStats.from_reply, d["groups"])),
                refused={str(k): int(v) for k, v in d["refused"].items()},
                tx_refused={str(k): int(v) for k, v in d["tx_refused"].items()},
                control=ControlStats.from_reply(d["control"]), reply=d,
                gateway=None if d.get("gateway") is None
                else GatewayStats.from_reply(d["gateway"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PktipcError(f"a STATS reply this version does not read "
                              f"({type(e).__name__}: {e})") from None

    def client(self, name: str) -> ClientStats:
        """The client of that name; raises KeyError if the broker has none."""
        for c in self.clients:
            if c.name == name:
                return c
        raise KeyError(name)


@dataclass(frozen=True)
class ClientCounters:
    """What a client counted itself since it was made (monotonic)."""

    packets: int            # handed out (this client's, past its filter)
    bytes: int              # their captured bytes
    batches: int            # handed out
    filtered: int           # of this client's packets, those its filter left out
    drops: int              # skipped by the broker while this client lagged (drop policy)
    gaps: int               # times it did so
    reconnects: int         # attachments to a broker that took a lost one's place
    held: int               # batches held now
