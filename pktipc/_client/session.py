"""What the two edges of the Python client share: the blocking Client
(client.py) and pktipc.aio's AsyncClient (aio.py).

A _Session is one client's attachment to a broker over the protocol
machine (_protocol.ClientConnection): the broker's segment mapped, the
batches made from it, the filter, the counters. It never waits:
_service() reads what has come, does what is due and sends what is to be
sent, then arms a timer for the next thing due. Its descriptor (fileno(),
an epoll set of the ZeroMQ socket's descriptor and that timer) is readable
whenever _service() has something to do. Each edge only waits for it, its
own way: the blocking client in epoll, the asyncio client in the event
loop's reader callback.
"""

from __future__ import annotations

import bisect
import gc
import mmap
import os
import pwd
import select
import stat
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, cast

import numpy as np
import posix_ipc
import zmq

from .. import _protocol as proto
from .._errors import (
    BrokerGone,
    BrokerNotRunning,
    ClosedError,
    EndOfStream,
    FilterError,
    LayoutError,
    PermissionDenied,
    PktipcError,
    Refused,
    UntrustedBroker,
    refusal,
)
from .._layout import LAYOUT_VERSION, PKT_DTYPE, Iface, Segment
from .._layout import select as select_share
from .._paths import check_name, control_endpoint, ipc_path
from .._shm import ffi, lib
from .._stats import ClientCounters
from . import decode
from .tx import Area, Tx

EVICT_WAIT = 0.5       # s: for the EVICT behind a batch whose slab was reused
SEND_TIMEOUT_MS = 1000  # a broker that takes no message for this long is lost


class Packet(NamedTuple):
    """One packet. In a batch, `data` is a read-only view of the shared
    segment, valid until the batch is released; from Client.packets() and
    Client.next() it is a copy (bytes). `flags` holds pktipc.Flags bits."""

    data: memoryview | bytes
    ts_ns: int
    caplen: int
    wirelen: int
    linktype: int
    iface: int
    seq: int
    flags: int


_make_packet = partial(tuple.__new__, Packet)


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pauses the cyclic garbage collector while a batch's packet objects are
    made: they form no cycles, and collections triggered by thousands of new
    objects would otherwise double the cost of making them."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Filter:
    """A filter expression compiled by libpcap for one broker's sources, one
    program per link type (pktipc_filter_new in shm/pktipc_filter.h)."""

    def __init__(self, expr: str, ifaces: Sequence[Iface]) -> None:
        if "\0" in expr:
            raise FilterError(f"filter {expr!r}: holds a NUL character")
        out = ffi.new("struct pktipc_filter **")
        err = ffi.new("char[]", lib.PKTIPC_FILTER_ERRBUF_SIZE)
        linktypes = ffi.new("uint32_t[]", [i.linktype for i in ifaces])
        if lib.pktipc_filter_new(expr.encode(), linktypes, len(ifaces), out, err) < 0:
            raise FilterError(ffi.string(err).decode(errors="replace"))
        self.expr = expr
        self._f = ffi.gc(out[0], lib.pktipc_filter_free)

    def run(self, slab: Any, desc: np.ndarray[Any, Any],
            mine: np.ndarray[Any, Any] | None) -> np.ndarray[Any, Any]:
        """Indexes of the packets of `desc` (checked copies; those in `mine`,
        or all) that match: one C call."""
        k = len(desc) if mine is None else len(mine)
        out = np.empty(k, dtype=np.uint32)
        src = ffi.NULL if mine is None else ffi.from_buffer("uint32_t[]", mine)
        m = lib.pktipc_filter_run(self._f, slab, ffi.from_buffer("struct pktipc_pkt[]", desc),
                                  src, k, ffi.from_buffer("uint32_t[]", out))
        return out[:m]


class _Mapping:
    """One broker's segment, mapped read-only. Batches keep theirs: after a
    broker restart, batches of the old one still read the old segment."""

    def __init__(self, w: proto.Welcomed, server: str, owner: int | None) -> None:
        if w.layout != LAYOUT_VERSION:
            raise LayoutError(f"broker uses layout {w.layout}, this client reads "
                              f"{LAYOUT_VERSION}")
        try:
            shm = posix_ipc.SharedMemory(w.shm, read_only=True)
        except posix_ipc.ExistentialError:
            # The broker named it a moment ago: it died since, or this process
            # has a /dev/shm of its own (a container's).
            raise BrokerGone(f"segment {w.shm} of broker {server!r} is not in this "
                             "process's /dev/shm: the broker is gone, or this runs in a "
                             "container that needs the host's /dev/shm mounted in") from None
        except posix_ipc.PermissionsError:
            raise PermissionDenied(f"segment {w.shm} of broker {server!r}: permission "
                                   "denied (see serve --allow-group)") from None
        try:
            uid = os.fstat(shm.fd).st_uid
            if owner is not None and uid not in (owner, 0):
                raise UntrustedBroker(f"segment {w.shm} belongs to {_who(uid)}, broker "
                                      f"{server!r} to {_who(owner)}: another user may be "
                                      "posing as the broker")
            self.mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        self.seg = Segment(self.mm)
        self.seg.check()
        if self.seg.header.epoch != w.epoch:
            raise LayoutError("segment epoch differs from the broker's")
        self.epoch = w.epoch
        self.view = memoryview(self.mm)
        self.ifaces = self.seg.ifaces()     # read once: what filters were compiled for
        self.filter: _Filter | None = None
        g = self.seg.geometry
        self.slab_count, self.slabs_off, self.slab_size = g.slab_count, g.slabs_off, g.slab_size

    def slab_base(self, slab: int) -> int:
        return self.slabs_off + self.slab_size * slab

    def close(self) -> None:
        self.filter = None
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # NumPy views still use the mapping; it goes with them


class Batch:
    """Packets handed to this client by one BATCH message, read in place.

    A batch is one slab of `n` packets; only some of them may be this
    client's: in a group, its share; with a filter, those that match. `mine`
    indexes them in `descriptors`, and len(), iteration, packets() and
    views() give those alone (all of them otherwise).

    Use it as a context manager, or call release(): the broker may reuse the
    slab only when every client it went to has released it. Releasing also
    releases every memoryview the batch handed out, so using one afterwards
    raises ValueError. `descriptors` is this batch's own copy of the slab's
    descriptors, checked (every frame within the slab or the frame area) when the batch is
    made: what is read is what was checked, whatever the broker writes.
    """

    __slots__ = ("seq", "slab", "gen", "n", "count", "filtered", "_client", "_map", "_desc",
                 "_mine", "_views", "_released", "__weakref__")

    def __init__(self, client: _Session, mapping: _Mapping, b: proto.BatchAnnounced,
                 slot: int) -> None:
        self.seq = b.seq
        self.slab = b.slab
        self.gen = b.gen
        self.n = b.n
        self._client = client
        self._map = mapping
        self._mine: np.ndarray[Any, Any] | None = None
        self._views: list[memoryview] = []
        self._released = False
        seg = mapping.seg
        rec = seg.batch_rec(self.slab)
        if ((rec.gen, rec.seq, rec.count, rec.slab) != (self.gen, self.seq, self.n, self.slab)
                or self.n * PKT_DTYPE.itemsize > mapping.slab_size):
            raise BrokerGone(f"broker {client.server!r} broke the protocol: batch {self.seq} "
                             "does not match its record in the segment")
        self._desc = seg.descriptors(self.slab, self.n).copy()
        good = seg.pkts_check(self.slab, self._desc)
        if good < self.n:
            raise BrokerGone(f"broker {client.server!r} broke the protocol: packet {good} of "
                             f"batch {self.seq} lies outside its slab")
        self._desc.flags.writeable = False
        mine = None
        if b.members or b.mask is not None:
            # One C pass over the hashes (pktipc_select), not a Python loop.
            mine = select_share(self._desc, b.mask, b.members, slot)
        share = self.n if mine is None else len(mine)
        if mapping.filter is not None:
            mine = mapping.filter.run(seg.slab_ptr(self.slab), self._desc, mine)
        self._mine = None if mine is None or len(mine) == self.n else mine
        self.count = self.n if self._mine is None else len(self._mine)
        self.filtered = share - self.count     # of this client's share, left out by its filter

    def __len__(self) -> int:
        return self.count

    @property
    def mine(self) -> np.ndarray[Any, Any]:
        """Indexes (uint32, ascending) in `descriptors` of this client's packets."""
        self._check()
        return np.arange(self.n, dtype=np.uint32) if self._mine is None else self._mine

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<pktipc.Batch seq={self.seq} count={self.count} {state}>"

    def _check(self) -> None:
        if self._released:
            raise ClosedError("batch already released")
        if self._client._closed:
            raise ClosedError(f"client {self._client.name!r} is closed")

    @property
    def descriptors(self) -> np.ndarray[Any, Any]:
        """Structured array (dtype pktipc.PKT_DTYPE) of all the slab's
        descriptors, this client's packets or not (see `mine`): a copy.
        Raises ClosedError once released, BrokerGone if the broker took the
        slab back (it evicted this client)."""
        self._check()
        if self._map.seg.batch_rec(self.slab).gen != self.gen:
            raise BrokerGone(f"batch {self.seq} was taken back by the broker")
        return self._desc

    def _own(self) -> np.ndarray[Any, Any]:
        d = self.descriptors
        return d if self._mine is None else d[self._mine]

    def views(self) -> list[memoryview]:
        """The bytes of each of this client's packets, in order (zero-copy, read-only)."""
        with _no_gc():
            return self._make_views(self._own())

    def _make_views(self, d: np.ndarray[Any, Any]) -> list[memoryview]:
        starts = (d["data_off"].astype(np.int64) + self._map.slab_base(self.slab)).tolist()
        view = self._map.view
        views = [view[s : s + n] for s, n in zip(starts, d["caplen"].tolist(), strict=True)]
        self._views.extend(views)
        return views

    def buffer(self) -> memoryview:
        """The whole slab, and the segment's frame area after it if it has
        one (AF_XDP's frames), read-only and in place: a descriptor's
        `data_off` indexes it. Released with the batch, as views() are."""
        self._check()
        base = self._map.slab_base(self.slab)
        g = self._map.seg.geometry
        end = (g.frames_off + g.frame_size * g.frame_count if g.frame_count
               else base + self._map.slab_size)
        view = self._map.view[base : end]
        self._views.append(view)
        return view

    def packets(self) -> list[Packet]:
        """This client's packets of the batch, in order; built column by column."""
        with _no_gc():
            return self._packets(self._make_views(self._own()))

    def _packets(self, data: Iterable[memoryview | bytes]) -> list[Packet]:
        d = self._own()
        seqs = (range(self.seq, self.seq + self.n) if self._mine is None
                else (self._mine.astype(np.int64) + self.seq).tolist())
        return list(map(_make_packet, zip(
            data, d["ts_ns"].tolist(), d["caplen"].tolist(), d["wirelen"].tolist(),
            d["linktype"].tolist(), d["iface"].tolist(), seqs, d["flags"].tolist(),
            strict=True)))

    def _copies(self) -> list[Packet]:
        with _no_gc():
            return self._packets(map(bytes, self._make_views(self._own())))

    def __iter__(self) -> Iterator[Packet]:
        return iter(self.packets())

    def release(self) -> None:
        """Gives the batch back to the broker; idempotent."""
        if self._released:
            return
        self._released = True
        deque(map(memoryview.release, self._views), maxlen=0)
        self._views.clear()
        self._client._release(self)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class _Carried:
    """What a remote client's batches come through (one per attachment to a
    gateway, in place of a _Mapping): the broker's epoch and sources, from
    REMOTE_WELCOME; the filter compiled for them. No segment."""

    seg: Any = None

    def __init__(self, epoch: int, ifaces: list[Iface]) -> None:
        self.epoch = epoch
        self.ifaces = ifaces
        self.filter: _Filter | None = None

    def close(self) -> None:
        self.filter = None


class _CarriedBatch(Batch):
    """A remote client's batch (tcp://): only its own packets, carried in
    the REMOTE_BATCH message: `descriptors` are theirs alone (their
    `data_off` counted in the message's bytes) and `mine` those its filter
    keeps; their sequence numbers are still their places in the broker's
    batch of `n`. buffer() is the bytes the message carried."""

    __slots__ = ("_pos", "_data")

    def __init__(self, client: _Session, carried: _Carried, b: proto.BatchReceived) -> None:
        self.seq = b.seq
        self.slab = -1
        self.gen = 0
        self.n = b.n
        self._client = client
        self._map = carried     # type: ignore[assignment]
        self._views = []
        self._released = False
        desc_buf, data = memoryview(b.desc), memoryview(b.data)
        if desc_buf.nbytes != b.count * PKT_DTYPE.itemsize:
            raise BrokerGone(f"gateway of {client.server} broke the protocol: batch {b.seq} "
                             f"has {desc_buf.nbytes} bytes of descriptors for {b.count} packets")
        desc = np.frombuffer(desc_buf, dtype=PKT_DTYPE).copy()     # aligned, checked
        if (desc["data_off"].astype(np.uint64) + desc["caplen"] > data.nbytes).any():
            raise BrokerGone(f"gateway of {client.server} broke the protocol: a packet of "
                             f"batch {b.seq} lies outside its bytes")
        desc.flags.writeable = False
        self._desc = desc
        self._data = data.cast("B")
        self._pos: np.ndarray[Any, Any] | None = None
        if b.mask is not None:
            bits = np.unpackbits(np.frombuffer(b.mask, dtype=np.uint8), bitorder="little")
            self._pos = np.flatnonzero(bits[: b.n]).astype(np.uint32)
        mine = None
        if carried.filter is not None and len(desc):
            mine = carried.filter.run(ffi.from_buffer("uint8_t[]", self._data), desc, None)
        self._mine = None if mine is None or len(mine) == len(desc) else mine
        self.count = len(desc) if self._mine is None else len(self._mine)
        self.filtered = len(desc) - self.count

    @property
    def mine(self) -> np.ndarray[Any, Any]:
        self._check()
        return (np.arange(len(self._desc), dtype=np.uint32) if self._mine is None
                else self._mine)

    @property
    def descriptors(self) -> np.ndarray[Any, Any]:
        """This client's descriptors (dtype pktipc.PKT_DTYPE), as the
        message carried them: a copy."""
        self._check()
        return self._desc

    def _make_views(self, d: np.ndarray[Any, Any]) -> list[memoryview]:
        view = self._data
        views = [view[s : s + n] for s, n in zip(d["data_off"].tolist(), d["caplen"].tolist(),
                                                  strict=True)]
        self._views.extend(views)
        return views

    def buffer(self) -> memoryview:
        self._check()
        view = self._data[:]
        self._views.append(view)
        return view

    def _packets(self, data: Iterable[memoryview | bytes]) -> list[Packet]:
        d = self._own()
        rows, pos = self._mine, self._pos
        if rows is None and pos is None:
            seqs: Iterable[int] = range(self.seq, self.seq + len(d))
        else:
            places = rows if pos is None else pos if rows is None else pos[rows]
            assert places is not None
            seqs = (places.astype(np.int64) + self.seq).tolist()
        return list(map(_make_packet, zip(
            data, d["ts_ns"].tolist(), d["caplen"].tolist(), d["wirelen"].tolist(),
            d["linktype"].tolist(), d["iface"].tolist(), seqs, d["flags"].tolist(),
            strict=True)))


Callback = Callable[..., object]


class _Hand:
    """The batch dispatch(), loop() and next() take packets from, and how far."""

    __slots__ = ("batch", "pkts", "pos")

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.pkts = batch.packets()
        self.pos = 0


class _Session:
    """One client of one broker, without waiting (see the module's docstring)."""

    def __init__(self, server: str, client: str, *, group: str | None = None,
                 balance: str | None = None, policy: str | None = None,
                 credit: int | None = None, reconnect: float = proto.DEFAULT_RECONNECT,
                 filter: str | None = None) -> None:
        check_name("client", client)
        if group is not None:
            check_name("group", group)
        if balance is not None and balance not in proto.BALANCES:
            raise ValueError(f"balance must be one of {', '.join(proto.BALANCES)}")
        if policy is not None and policy not in proto.POLICIES:
            raise ValueError(f"policy must be one of {', '.join(proto.POLICIES)}")
        if credit is not None and not 1 <= credit <= proto.MAX_CREDIT:
            raise ValueError(f"credit must be between 1 and {proto.MAX_CREDIT}")
        self.name = client
        self.server = server
        self.endpoint = control_endpoint(server)
        self.reconnect = reconnect
        self.gaps: list[tuple[int, int]] = []
        self.end_error: str | None = None
        self._filter = filter or None
        self._policy, self._credit = policy, credit
        self._group, self._balance = group, balance
        self._ended = False
        self._lost_why = ""
        self._pending: deque[proto.BatchAnnounced | proto.BatchReceived] = deque()
        self._held: set[int] = set()
        self._batches: weakref.WeakSet[Batch] = weakref.WeakSet()
        self._sock: zmq.Socket[bytes] | None = None
        self._sock_fd = -1
        self._map: _Mapping | _Carried | None = None
        self._seen_end = 0      # past the last batch of this broker handed out
        self._seen_epoch: int | None = None
        # Seqs of this broker handed out on a connection that was lost, that
        # the broker may send again on resuming the place: those still held,
        # and the last `credit` released (their RELEASE may have gone down
        # with the connection). One sent again is not handed out again.
        self._again: set[int] = set()
        self._released_last: deque[int] = deque()
        # This broker's gaps recorded, as sorted disjoint [start, end): a GAP
        # told again (its connection was lost before the broker knew it came)
        # is counted once.
        self._skip_starts: list[int] = []
        self._skip_ends: list[int] = []
        self._conn = self._connection(reconnect)
        self._failure: PktipcError | None = None
        self._suspect: tuple[float, int] | None = None   # (until, seq): see _mismatch
        self._stats: dict[str, Any] | None = None
        self._hand: _Hand | None = None
        self._tx: Tx | None = None
        self._tx_ready: tuple[int, ...] | None = None
        self._timer_at: float | None = None
        self._counts = dict.fromkeys(("packets", "bytes", "batches", "filtered"), 0)
        self._closed = False
        self._ctx = zmq.Context()
        self._epoll = select.epoll()
        self._tfd = lib.timerfd_create(lib.CLOCK_MONOTONIC, lib.TFD_NONBLOCK | lib.TFD_CLOEXEC)
        if self._tfd < 0:
            self._teardown()
            raise OSError(ffi.errno, f"timerfd_create: {os.strerror(ffi.errno)}")
        self._epoll.register(self._tfd, select.EPOLLIN)

    # -- what both edges offer alike --
    def fileno(self) -> int:
        """A descriptor that is readable when the client has something to do:
        a message came from the broker, or a heartbeat or a reconnection
        attempt is due. It stays the same across reconnections. ZeroMQ
        signals only new arrivals on it, so once it is readable, call the
        client (next_batch(timeout=0), dispatch with timeout 0) until it
        returns None or 0 before waiting on it again."""
        self._check_open()
        return self._epoll.fileno()

    @property
    def reconnects(self) -> int:
        """How many times this client attached to a broker that took a lost one's place."""
        return self._conn.reconnects

    @property
    def group(self) -> str:
        """The group this client shares packets with (its own name by default)."""
        return self.welcome.group

    @property
    def balance(self) -> str:
        """How the group divides its packets: "flow" or "round-robin"."""
        return self.welcome.balance

    @property
    def epoch(self) -> int:
        """The broker's epoch: it changes when the client attaches to a new broker."""
        return self._mapping().epoch

    @property
    def ifaces(self) -> list[Iface]:
        """The broker's sources (interfaces or files); a packet's `iface` indexes it."""
        return list(self._mapping().ifaces)

    def datalink(self) -> int:
        """The DLT_* value of the sources' link type, as libpcap's
        pcap_datalink() gives it (a packet's `linktype` is the LINKTYPE_*
        value, which differs for a few historical ones). Raises ValueError
        if the broker's sources have several link types: each packet's
        `linktype` then says which."""
        types = sorted({i.linktype for i in self._mapping().ifaces})
        if len(types) != 1:
            raise ValueError(f"broker {self.server!r} serves link types "
                             f"{', '.join(map(str, types))}: see each packet's linktype")
        return int(lib.pktipc_linktype_dlt(types[0]))

    @property
    def filter(self) -> str | None:
        """The filter expression in force, None if there is none."""
        return self._filter

    def set_filter(self, expr: str | None) -> None:
        """Keeps only the packets `expr` (tcpdump's syntax) matches from
        the next batch on; None or "" keeps every packet. Compiled by
        libpcap for each of the broker's link types and run in C, one call
        per batch (in a group, over this member's share); packets it leaves
        out are counted in `counters.filtered`. Raises FilterError with
        libpcap's message if it refuses the expression."""
        m = self._mapping()
        m.filter = _Filter(expr, m.ifaces) if expr else None
        self._filter = expr or None

    @property
    def counters(self) -> ClientCounters:
        """This client's own counters since it was made (no message to the broker)."""
        return ClientCounters(
            packets=self._counts["packets"], bytes=self._counts["bytes"],
            batches=self._counts["batches"], filtered=self._counts["filtered"],
            drops=sum(end - start for start, end in self.gaps), gaps=len(self.gaps),
            reconnects=self._conn.reconnects,
            held=sum(1 for b in self._batches if not b._released))

    def segment_counters(self) -> dict[str, Any]:
        """The broker's monotonic counters as its segment holds them now,
        read in place, no message sent: `epoch`, `broker` (packets,
        broker_drops, client_drops, ...) and `sources`, a dict per source
        (packets, bytes, kernel_packets, kernel_drops, kernel_freezes,
        `live`). They start from 0 with a new broker (a new `epoch`)."""
        seg = self._mapping().seg
        if seg is None:
            raise PktipcError(f"broker {self.server}: its segment's counters are read on its "
                              "own host only (stats() asks it over the connection)")
        sources = []
        for i in range(int(seg.header.iface_count)):
            e = seg.iface(i)
            sources.append({"packets": int(e.packets), "bytes": int(e.bytes),
                            "kernel_packets": int(e.kernel_packets),
                            "kernel_drops": int(e.kernel_drops),
                            "kernel_freezes": int(e.kernel_freezes),
                            "live": int(e.kind) == lib.PKTIPC_IFACE_LIVE})
        return {"epoch": self.epoch, "broker": seg.counters(), "sources": sources}

    # -- attaching --
    def _connection(self, reconnect: float) -> proto.ClientConnection:
        return proto.ClientConnection(reconnect)

    def _open(self) -> None:
        """A new connection to the broker, and HELLO on it."""
        self._owner = _check_socket(self.server, ipc_path(self.endpoint))
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        sock.connect(self.endpoint)
        self._sock, self._sock_fd = sock, sock.fileno()
        self._epoll.register(self._sock_fd, select.EPOLLIN)
        self._conn.hello(time.monotonic(), name=self.name, group=self._group,
                         policy=self._policy, credit=self._credit, pid=os.getpid(),
                         balance=self._balance)
        self._flush()

    def _drop_socket(self, linger: int = 100) -> None:
        """Closes the connection, once what is to be said on it is sent."""
        self._flush()
        if self._sock is not None:
            self._epoll.unregister(self._sock_fd)
            self._sock.close(linger=linger)
            self._sock, self._sock_fd = None, -1

    def _attached(self) -> bool:
        """Whether the first attachment is done (WELCOME, the segment mapped);
        raises why it failed."""
        self._service()
        return self._map is not None

    def _gave_up(self, timeout: float) -> BrokerNotRunning:
        self._drop_socket()
        return BrokerNotRunning(f"broker {self.server!r} did not answer within {timeout:g} s")

    def _use(self, w: proto.Welcomed) -> None:
        """Maps the segment WELCOME named, compiles the filter for its
        sources, and says so."""
        mapping = _Mapping(w, self.server, self._owner)
        self._epoch_seen(w.epoch)
        if self._filter is not None:
            mapping.filter = _Filter(self._filter, mapping.ifaces)
        if self._map is not None and not any(b._map is self._map for b in self._batches):
            self._map.close()
        self._map = mapping
        self.welcome = w
        self._ended = False
        self._released_last = deque(maxlen=w.credit)
        self._conn.mapped(time.monotonic())
        self._flush()

    def _epoch_seen(self, epoch: int) -> None:
        if epoch != self._seen_epoch:           # another broker: seqs anew
            self._seen_end, self._seen_epoch = 0, epoch
            self._again = set()
            self._skip_starts, self._skip_ends = [], []

    def _skipped(self, start: int, end: int) -> None:
        """Records in `gaps` what of [start, end) the client neither was
        handed (a batch that came, whose RELEASE was lost with the connection,
        may be reported skipped on resuming) nor has recorded already."""
        starts, ends = self._skip_starts, self._skip_ends
        cur = max(start, self._seen_end)
        i = bisect.bisect_right(ends, cur)      # the first recorded range ending past cur
        while cur < end:
            if i < len(starts) and starts[i] <= cur:
                cur = ends[i]
                i += 1
                continue
            stop = min(end, starts[i]) if i < len(starts) else end
            self.gaps.append((cur, stop))
            starts.insert(i, cur)
            ends.insert(i, stop)
            i += 1
            cur = stop

    # -- the step --
    def _service(self) -> None:
        """Does, without waiting, everything that has come or is due; leaves
        fileno() unreadable until something new comes or falls due. A
        failure (the broker gone for good, evicted, broke the protocol) is
        raised, and again at every later call."""
        if self._failure is not None:
            raise self._failure
        try:
            try:
                os.read(self._tfd, 8)
            except BlockingIOError:
                pass
            while True:
                self._receive_all()
                self._on_events(self._conn.handle_timer(time.monotonic()))
                self._flush()
                if self._suspect is not None and time.monotonic() >= self._suspect[0]:
                    raise BrokerGone(f"batch {self._suspect[1]} does not match the segment")
                # ZeroMQ's descriptor signals only what comes after this
                # says nothing is left: asked last, it is unreadable now.
                if self._sock is None or not cast(int, self._sock.getsockopt(zmq.EVENTS)) & \
                        zmq.POLLIN:
                    break
            self._arm()
        except PktipcError as e:
            if not isinstance(e, Refused) or self._map is None:
                self._fail(e)
            raise

    def _fail(self, e: PktipcError) -> None:
        self._failure = e
        self._pending.clear()
        self._drop_socket(linger=0)
        self._arm()

    def _arm(self) -> None:
        """Sets the timer in fileno() on the next thing due."""
        t = None if self._failure is not None else self._conn.get_timer()
        if self._suspect is not None and self._failure is None:
            t = self._suspect[0] if t is None else min(t, self._suspect[0])
        if t == self._timer_at:
            return
        self._timer_at = t
        its = ffi.new("struct itimerspec *")
        if t is not None:
            ns = max(int(t * 1e9), 1)
            its.it_value.tv_sec, its.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        lib.timerfd_settime(self._tfd, lib.TFD_TIMER_ABSTIME, its, ffi.NULL)

    def _take(self) -> Batch | None:
        """The next batch if one has come, else None (not yet); raises
        EndOfStream after the last one."""
        self._service()
        while self._pending:
            assert self._map is not None
            b = self._pending.popleft()
            if self._again and self._sent_again(b.seq):
                continue
            self._seen_end = max(self._seen_end, b.seq + b.n)     # handed out (or filtered)
            try:
                batch = self._batch(b)
            except BrokerGone as e:
                self._fail(e)
                raise
            self._held.add(b.seq)
            self._batches.add(batch)
            self._counts["filtered"] += batch.filtered
            if not batch.count:
                batch.release()     # nothing of it is ours: never hand an empty one out
                continue
            self._counts["packets"] += batch.count
            self._counts["bytes"] += int(batch._own()["caplen"].sum())
            self._counts["batches"] += 1
            return batch
        if self._ended and self._suspect is None:
            raise EndOfStream(self.end_error)
        return None

    def _sent_again(self, seq: int) -> bool:
        """Whether batch `seq` was handed out on a connection that was lost
        (the broker, not knowing its RELEASE came, sent it again): if the
        user still holds it, its release gives it back; else it goes back
        now. A seq of `_again` below `seq` was not sent again (batches come
        in seq order), so the broker had its RELEASE."""
        again = seq in self._again
        self._again = {s for s in self._again if s > seq}
        if not again:
            return False
        assert self._map is not None
        self._held.add(seq)
        if not any(b.seq == seq and not b._released and b._map.epoch == self._map.epoch
                   for b in self._batches):
            self._held.discard(seq)
            self._conn.release(time.monotonic(), [seq])
            self._flush()
        return True

    def _ask_stats(self) -> None:
        if self._sock is None or self._conn.retrying:
            raise BrokerGone(f"broker {self.server!r} {self._lost_why}")
        self._stats = None
        self._conn.request_stats(time.monotonic())
        self._flush()

    def _stats_reply(self) -> dict[str, Any] | None:
        self._service()
        if self._stats is None and (self._sock is None or self._conn.retrying):
            raise BrokerGone(f"broker {self.server!r} {self._lost_why}")
        return self._stats

    def _batch(self, b: proto.BatchAnnounced | proto.BatchReceived) -> Batch:
        assert isinstance(self._map, _Mapping) and isinstance(b, proto.BatchAnnounced)
        return Batch(self, self._map, b, self.welcome.slot)

    # -- pcap-style --
    def _dispatch(self, cnt: int, callback: Callback, interpret: bool, packets: bool) -> int:
        """Up to `cnt` (<= 0: all) packets of the batch at hand to `callback`."""
        hand = self._hand
        assert hand is not None
        end = len(hand.pkts) if cnt <= 0 else min(len(hand.pkts), hand.pos + cnt)
        start = hand.pos
        dec = decode.decoder if interpret else None
        while hand.pos < end:
            p = hand.pkts[hand.pos]
            hand.pos += 1           # handled, even if the callback raises
            if packets:
                callback(p)
            elif dec is not None:
                callback(dec(p.linktype)(bytes(p.data)), p.ts_ns / 1e9, p.wirelen)
            else:
                callback(p.data, p.ts_ns / 1e9, p.wirelen)
        if hand.pos == len(hand.pkts):
            self._hand = None
            hand.batch.release()
        return end - start

    def _check_dispatch(self, interpret: bool, packets: bool) -> None:
        self._check_open()
        if interpret and packets:
            raise ValueError("interpret and packets exclude each other")
        if interpret:
            decode.require()

    # -- internals --
    def _mapping(self) -> _Mapping | _Carried:
        self._check_open()
        assert self._map is not None
        return self._map

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"client {self.name!r} is closed")

    # -- sending (tx.py; the waiting is the edge's) --
    def _tx_area(self, frames: int, frame_size: int) -> Area:
        """A new TX area, announced to the broker (TX_OPEN); TX_READY or a
        refusal is the answer."""
        self._check_open()
        if self._sock is None or self._conn.state is not proto.State.ATTACHED:
            raise BrokerGone(f"broker {self.server!r} {self._lost_why or 'is not attached'}")
        path = ipc_path(self.endpoint)
        gid = os.stat(path).st_gid if path is not None else None
        area = Area(self.server, self.name, frames, frame_size, self._owner, gid)
        try:
            self._tx_ready = None
            self._conn.tx_open(time.monotonic(), area.name)
            self._flush()
        except BaseException:
            area.close()
            raise
        return area

    def _send_tx(self, first: int, n: int) -> None:
        self._conn.tx(time.monotonic(), first, n)
        self._flush()

    def _bye(self) -> None:
        """Detaches from the broker (BYE) and frees everything; idempotent."""
        if self._closed:
            return
        try:
            if self._sock is not None:
                self._conn.bye(time.monotonic())
                self._flush()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        self._closed = True
        if (tx := getattr(self, "_tx", None)) is not None:
            tx.close()
        self._hand = None
        maps: dict[int, _Mapping | _Carried] = {id(b._map): b._map for b in self._batches}
        for batch in list(self._batches):
            batch.release()         # its views must not read slabs the broker reuses
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ctx.term()
        self._epoll.close()
        if getattr(self, "_tfd", -1) >= 0:
            os.close(self._tfd)
            self._tfd = -1
        if self._map is not None:
            maps[id(self._map)] = self._map
        for m in maps.values():
            m.close()

    def _release(self, batch: Batch) -> None:
        if (self._closed or self._map is None or batch._map.epoch != self._map.epoch
                or batch.seq not in self._held):
            return          # a batch of a broker that is gone: nobody to tell
        self._held.discard(batch.seq)
        self._released_last.append(batch.seq)
        self._conn.release(time.monotonic(), [batch.seq])
        self._flush()

    def _receive_all(self) -> None:
        events: list[proto.ClientEvent] = []
        while self._sock is not None:
            try:
                frame, more = self._recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                events += self._conn.receive(frame, time.monotonic(), more)
            except proto.RemoteProtocolError as e:
                if self._map is None and self._conn.lost_at is None:
                    self._drop_socket()
                    raise BrokerNotRunning(f"{self.endpoint} is not a pktipc broker: "
                                           f"{e}") from e
                raise BrokerGone(f"broker {self.server!r} broke the protocol: {e}") from e
            if self._conn.state is proto.State.LOST:
                # This connection is over (its broker is lost, or the attempt
                # failed): what else came on it (a restarted broker's other
                # refusals) is not read, and it is closed.
                break
        self._on_events(events)

    def _recv(self, flags: int = 0) -> tuple[bytes, tuple[Any, ...]]:
        """One message: its first frame, and the frames after it (none
        from a local broker)."""
        assert self._sock is not None
        return self._sock.recv(flags), ()

    def _on_events(self, events: list[proto.ClientEvent]) -> None:
        # An eviction voids the batches announced before it (their slabs may
        # already hold other packets), so it is handled first.
        events.sort(key=lambda ev: not isinstance(ev, proto.Evicted))
        for ev in events:
            if isinstance(ev, proto.BatchReceived):
                self._pending.append(ev)
            elif isinstance(ev, proto.BatchAnnounced):
                m = self._map
                assert isinstance(m, _Mapping)
                if (self._suspect is not None or ev.slab >= m.slab_count
                        or m.seg.batch_rec(ev.slab).gen != ev.gen):
                    self._mismatch(ev)
                else:
                    self._pending.append(ev)
            elif isinstance(ev, proto.GapReported):
                self._skipped(ev.start, ev.end)
            elif isinstance(ev, proto.StreamEnded):
                self._ended = True
                self.end_error = ev.error
            elif isinstance(ev, proto.StatsReceived):
                self._stats = ev.stats
            elif isinstance(ev, proto.TxReady):
                self._tx_ready = ev.max_len
            elif isinstance(ev, proto.FramesTaken):
                if self._tx is not None:
                    self._tx._taken(ev.upto, ev.refused, ev.error)
            elif isinstance(ev, proto.RequestRefused):
                if self._map is None:       # our HELLO
                    self._drop_socket()
                    if ev.code == "not-running":        # behind a gateway
                        raise BrokerNotRunning(ev.text)
                    raise refusal(ev.code, f"broker {self.server!r} refused {self.name!r}: "
                                  f"{ev.text}")
                raise refusal(ev.code, f"broker {self.server!r} refused a request: {ev.text}")
            elif isinstance(ev, proto.Evicted):
                self._pending.clear()
                raise BrokerGone(f"broker {self.server!r} evicted {self.name!r}: {ev.text}")
            elif isinstance(ev, proto.ConnectionLost):
                self._lost_why = ev.why
                if self._tx is not None:    # its area was the lost broker's to read
                    self._tx._lost(f"broker {self.server!r} {ev.why}; frames not taken "
                                   "then were not sent: open client.tx() again")
                    self._tx = None
                self._drop_socket(linger=0)
                self._pending.clear()
                if ev.retrying:         # the same broker may take us back: see _again
                    self._again |= self._held
                    self._again.update(self._released_last)
                    self._released_last.clear()
                self._held.clear()      # their slabs are the lost broker's
                self._suspect = None
                if not ev.retrying:
                    raise BrokerGone(f"broker {self.server!r} {ev.why}")
            elif isinstance(ev, proto.RetryDue):
                try:
                    self._open()
                except BrokerNotRunning:        # no socket there (yet)
                    self._on_events(self._conn.failed(time.monotonic()))
            elif isinstance(ev, proto.Welcomed):
                first = self._map is None
                try:
                    self._use(ev)
                except PktipcError as e:
                    events = self._conn.failed(time.monotonic())
                    if first or not isinstance(e, BrokerGone | LayoutError):
                        self._drop_socket()
                        raise
                    self._on_events(events)
            elif isinstance(ev, proto.AttemptFailed):
                self._drop_socket()     # after its BYE, if it was welcomed
            elif isinstance(ev, proto.ReconnectAbandoned):
                raise BrokerGone(f"broker {self.server!r} {self._lost_why}, and {ev.why}")

    def _mismatch(self, ev: proto.BatchAnnounced) -> None:
        """A batch that does not match its slab: the broker broke the
        protocol, unless it evicted us meanwhile and reused the slab; its
        EVICT, sent before the slab was reused, is then on its way. Nothing
        more is handed out; the EVICT is waited for, for at most EVICT_WAIT
        seconds (the timer), before the batch is called a broken protocol."""
        if self._suspect is None:
            self._suspect = (time.monotonic() + EVICT_WAIT, ev.seq)
        self._pending.clear()

    def _flush(self) -> None:
        frames = self._conn.frames_to_send()
        for frame in frames:
            if self._sock is None:
                return
            try:
                self._sock.send(frame)
            except zmq.Again:
                self._on_events(self._conn.lost(time.monotonic(), "does not take messages"))


def _who(uid: int) -> str:
    try:
        return f"user {pwd.getpwuid(uid).pw_name}"
    except KeyError:
        return f"uid {uid}"


_DENIED = "permission denied (a broker admits its own user, and a group given with " \
    "serve --allow-group)"


def _check_socket(server: str, path: Path | None) -> int | None:
    """Fails fast, and says why, when a local broker's socket is not there or
    not ours to use (ZeroMQ would retry in silence), or is not what a broker
    makes: a socket of the runtime directory's owner (or root), in a
    directory nobody else can write. Returns the broker's uid (None for a
    remote broker)."""
    if path is None:
        return None
    try:
        d = os.lstat(path.parent)
        st = os.lstat(path)
    except FileNotFoundError:
        hint = ""
        if not any(path.parent.glob("*.ctl")):     # no broker at all, here
            hint = (f"; if this runs in a container, mount the host's {path.parent} "
                    "and /dev/shm into it")
        raise BrokerNotRunning(f"broker {server!r} is not running (no {path}{hint})") from None
    except PermissionError:
        raise PermissionDenied(f"{path.parent}: {_DENIED}") from None
    if not stat.S_ISDIR(d.st_mode) or d.st_mode & 0o022:
        raise UntrustedBroker(f"{path.parent} is not a runtime directory a broker makes (a "
                              "directory no other user can write): another user may be "
                              f"posing as broker {server!r}")
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in (d.st_uid, 0):
        what = "is not a socket" if not stat.S_ISSOCK(st.st_mode) else \
            f"belongs to {_who(st.st_uid)}, its directory to {_who(d.st_uid)}"
        raise UntrustedBroker(f"{path} {what}: another user may be posing as broker "
                              f"{server!r}")
    if not os.access(path, os.R_OK | os.W_OK):
        raise PermissionDenied(f"{path}: {_DENIED}")
    return st.st_uid
