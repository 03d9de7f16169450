"""The Python client: batches read in place from the broker's segment."""

from __future__ import annotations

import gc
import mmap
import os
import pwd
import stat
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np
import posix_ipc
import zmq

from .. import _protocol as proto
from .._errors import (
    BrokerGone,
    BrokerNotRunning,
    ClosedError,
    EndOfStream,
    LayoutError,
    PermissionDenied,
    UntrustedBroker,
    refusal,
)
from .._layout import LAYOUT_VERSION, PKT_DTYPE, Iface, Segment, select
from .._paths import check_name, control_endpoint, ipc_path
from .._shm import lib

EVICT_WAIT = 0.5       # s: for the EVICT behind a batch whose slab was reused


class Packet(NamedTuple):
    """One packet. In a batch, `data` is a read-only view of the shared
    segment, valid until the batch is released; from Client.packets() it
    is a copy (bytes)."""

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
        g = self.seg.geometry
        self.slab_count, self.slabs_off, self.slab_size = g.slab_count, g.slabs_off, g.slab_size

    def slab_base(self, slab: int) -> int:
        return self.slabs_off + self.slab_size * slab

    def close(self) -> None:
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass  # NumPy views still use the mapping; it goes with them


class Batch:
    """Packets handed to this client by one BATCH message, read in place.

    A batch is one slab of `n` packets; in a group, only some of them are this
    member's: `mine` indexes them in `descriptors`, and len(), iteration,
    packets() and views() give those alone (all of them outside a group).

    Use it as a context manager, or call release(): the broker may reuse the
    slab only when every client it went to has released it. Releasing also
    releases every memoryview the batch handed out, so using one afterwards
    raises ValueError. `descriptors` is this batch's own copy of the slab's
    descriptors, checked (every frame within the slab) when the batch is
    made: what is read is what was checked, whatever the broker writes.
    """

    __slots__ = ("seq", "slab", "gen", "n", "count", "_client", "_map", "_desc", "_mine",
                 "_views", "_released", "__weakref__")

    def __init__(self, client: Client, mapping: _Mapping, b: proto.BatchAnnounced,
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
        if b.members or b.mask is not None:
            # One C pass over the hashes (pktipc_select), not a Python loop.
            self._mine = select(self._desc, b.mask, b.members, slot)
        self.count = self.n if self._mine is None else len(self._mine)

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
        descriptors, this client's packets or not (see `mine`): a copy."""
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
        """The whole slab, read-only and in place: a descriptor's `data_off`
        indexes it. Released with the batch, as views() are."""
        self._check()
        base = self._map.slab_base(self.slab)
        view = self._map.view[base : base + self._map.slab_size]
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


class Client:
    """One named client of one broker. See connect()."""

    def __init__(self, server: str, client: str, *, group: str | None = None,
                 balance: str | None = None, policy: str | None = None,
                 credit: int | None = None, timeout: float = proto.DEFAULT_TIMEOUT,
                 reconnect: float = proto.DEFAULT_RECONNECT) -> None:
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
        self._policy, self._credit = policy, credit
        self._group, self._balance = group, balance
        self._ended = False
        self._lost_why = ""
        self._pending: deque[proto.BatchAnnounced] = deque()
        self._held: set[int] = set()
        self._batches: weakref.WeakSet[Batch] = weakref.WeakSet()
        self._sock: zmq.Socket[bytes] | None = None
        self._map: _Mapping | None = None
        self._conn = proto.ClientConnection(reconnect)
        self._ctx = zmq.Context()
        self._closed = False
        try:
            self._attach(timeout)
        except BaseException:
            self._teardown()
            raise

    @property
    def reconnects(self) -> int:
        """How many times this client attached to a broker that took a lost one's place."""
        return self._conn.reconnects

    def _open(self) -> None:
        """A new connection to the broker, and HELLO on it."""
        self._owner = _check_socket(self.server, ipc_path(self.endpoint))
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(self.endpoint)
        self._conn.hello(time.monotonic(), name=self.name, group=self._group,
                         policy=self._policy, credit=self._credit, pid=os.getpid(),
                         balance=self._balance)
        self._flush()

    def _drop_socket(self, linger: int = 100) -> None:
        """Closes the connection, once what is to be said on it is sent."""
        self._flush()
        if self._sock is not None:
            self._sock.close(linger=linger)
            self._sock = None

    def _attach(self, timeout: float) -> None:
        """The first attachment: HELLO, WELCOME, and the broker's segment
        mapped, within `timeout` seconds; raises why not."""
        self._open()
        assert self._sock is not None
        deadline = time.monotonic() + timeout
        while self._conn.state is proto.State.HELLO_SENT:
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop_socket()
                raise BrokerNotRunning(
                    f"broker {self.server!r} did not answer within {timeout:g} s")
            if not self._sock.poll(int(left * 1000) + 1):
                continue
            try:
                events = self._conn.receive(self._sock.recv(), time.monotonic())
            except proto.RemoteProtocolError as e:
                self._drop_socket()
                raise BrokerNotRunning(f"{self.endpoint} is not a pktipc broker: {e}") from e
            for ev in events:
                if isinstance(ev, proto.RequestRefused):
                    self._drop_socket()
                    raise refusal(ev.code, f"broker {self.server!r} refused {self.name!r}: "
                                  f"{ev.text}")
                if isinstance(ev, proto.Welcomed):
                    try:
                        self._use(ev)
                    except BaseException:
                        self._conn.failed(time.monotonic())
                        self._drop_socket()
                        raise

    def _use(self, w: proto.Welcomed) -> None:
        """Maps the segment WELCOME named, and says so."""
        mapping = _Mapping(w, self.server, self._owner)
        if self._map is not None and not any(b._map is self._map for b in self._batches):
            self._map.close()
        self._map = mapping
        self.welcome = w
        self._ended = False
        self._conn.mapped(time.monotonic())
        self._flush()

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
        self._check_open()
        assert self._map is not None
        return self._map.epoch

    # -- public --
    @property
    def ifaces(self) -> list[Iface]:
        """The broker's sources (interfaces or files); a packet's `iface` indexes it."""
        self._check_open()
        assert self._map is not None
        return self._map.seg.ifaces()

    def counters(self) -> dict[str, Any]:
        """The broker's monotonic counters as its segment holds them now,
        read in place, no message sent: `epoch`, `broker` (packets,
        broker_drops, client_drops, ...) and `sources`, a dict per source
        (packets, bytes, kernel_packets, kernel_drops, kernel_freezes,
        `live`). They start from 0 with a new broker (a new `epoch`)."""
        self._check_open()
        assert self._map is not None
        seg = self._map.seg
        sources = []
        for i in range(int(seg.header.iface_count)):
            e = seg.iface(i)
            sources.append({"packets": int(e.packets), "bytes": int(e.bytes),
                            "kernel_packets": int(e.kernel_packets),
                            "kernel_drops": int(e.kernel_drops),
                            "kernel_freezes": int(e.kernel_freezes),
                            "live": int(e.kind) == lib.PKTIPC_IFACE_LIVE})
        return {"epoch": self._map.epoch, "broker": seg.counters(), "sources": sources}

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch; None if none came within `timeout` seconds (None:
        wait for ever). Raises EndOfStream after the broker's last batch.
        If the broker dies, the client attaches to the one that takes its
        place (sequence numbers start again; `epoch` changes) and raises
        BrokerGone only if none comes within `reconnect` seconds, or if the
        broker evicted this client."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while (batch := self._next(deadline)) is False:
            pass
        return batch

    def _next(self, deadline: float | None) -> Batch | None | Literal[False]:
        """A batch, None at the deadline, False to go round again."""
        # Read what has come before handing out what was queued: an EVICT
        # behind queued batches means their slabs are no longer ours.
        self._receive_all()
        if self._pending:
            assert self._map is not None
            b = self._pending.popleft()
            batch = Batch(self, self._map, b, self.welcome.slot)   # may raise BrokerGone
            self._held.add(b.seq)
            self._batches.add(batch)
            if not batch.count:
                batch.release()     # the broker sends no empty share; never hand one out
                return False
            return batch
        if self._ended:
            # Heartbeats go on until close: a lingering broker keeps us.
            self._on_events(self._conn.handle_timer(time.monotonic()))
            self._flush()
            raise EndOfStream(self.end_error)
        now = time.monotonic()
        wake = self._conn.get_timer()
        wait = 0.5 if wake is None else max(0.0, wake - now)
        if deadline is not None:
            if now >= deadline:
                return None
            wait = min(wait, deadline - now)
        if self._sock is None:
            time.sleep(wait)        # the broker is lost: nothing to hear until the next attempt
        elif self._sock.poll(int(wait * 1000) + (wait > 0)):
            self._receive_all()
        self._on_events(self._conn.handle_timer(time.monotonic()))
        self._flush()
        return False

    def __iter__(self) -> Iterator[Batch]:
        """Batches until end-of-stream."""
        while True:
            try:
                b = self.next_batch()
            except EndOfStream:
                return
            if b is not None:
                yield b

    def packets(self, timeout: float | None = None) -> Iterator[Packet]:
        """Every packet until end-of-stream, as copies; each batch is released
        before its packets are yielded. Stops early if `timeout` passes with
        no batch."""
        while True:
            try:
                b = self.next_batch(timeout)
            except EndOfStream:
                return
            if b is None:
                return
            with b, _no_gc():
                copies = b._packets(map(bytes, b._make_views(b._own())))
            yield from copies

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The broker's STATS reply."""
        self._check_open()
        if self._sock is None or self._conn.retrying:
            raise BrokerGone(f"broker {self.server!r} {self._lost_why}")
        self._conn.request_stats(time.monotonic())
        self._flush()
        deadline = time.monotonic() + timeout
        self._stats: dict[str, Any] | None = None
        while self._stats is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerGone(f"broker {self.server!r} did not answer STATS")
            if self._sock is None or self._conn.retrying:
                raise BrokerGone(f"broker {self.server!r} {self._lost_why}")
            if self._sock.poll(int(left * 1000) + 1):
                self._receive_all()
        return self._stats

    def close(self) -> None:
        """Detaches from the broker (BYE); idempotent."""
        if self._closed:
            return
        try:
            if self._sock is not None:
                self._conn.bye(time.monotonic())
                self._flush()
        finally:
            self._teardown()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self.close()

    # -- internals --
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"client {self.name!r} is closed")

    def _teardown(self) -> None:
        self._closed = True
        maps = {id(b._map): b._map for b in self._batches}
        for batch in list(self._batches):
            batch.release()         # its views must not read slabs the broker reuses
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ctx.term()
        if self._map is not None:
            maps[id(self._map)] = self._map
        for m in maps.values():
            m.close()

    def _release(self, batch: Batch) -> None:
        if self._closed or batch._map is not self._map or batch.seq not in self._held:
            return          # a batch of a broker that is gone: nobody to tell
        self._held.discard(batch.seq)
        self._conn.release(time.monotonic(), [batch.seq])
        self._flush()

    def _receive_all(self) -> None:
        events: list[proto.ClientEvent] = []
        while self._sock is not None:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                events += self._conn.receive(frame, time.monotonic())
            except proto.RemoteProtocolError as e:
                raise BrokerGone(f"broker {self.server!r} broke the protocol: {e}") from e
            if self._conn.state is proto.State.LOST:
                # This connection is over (its broker is lost, or the attempt
                # failed): what else came on it is not read, and it is closed.
                break
        self._on_events(events)

    def _on_events(self, events: list[proto.ClientEvent]) -> None:
        # An eviction voids the batches announced before it (their slabs may
        # already hold other packets), so it is handled first.
        events.sort(key=lambda ev: not isinstance(ev, proto.Evicted))
        for ev in events:
            if isinstance(ev, proto.BatchAnnounced):
                m = self._map
                assert m is not None
                if ev.slab >= m.slab_count or m.seg.batch_rec(ev.slab).gen != ev.gen:
                    self._mismatch(ev)
                self._pending.append(ev)
            elif isinstance(ev, proto.GapReported):
                self.gaps.append((ev.start, ev.end))
            elif isinstance(ev, proto.StreamEnded):
                self._ended = True
                self.end_error = ev.error
            elif isinstance(ev, proto.StatsReceived):
                self._stats = ev.stats
            elif isinstance(ev, proto.RequestRefused):
                raise refusal(ev.code, f"broker {self.server!r} refused a request: {ev.text}")
            elif isinstance(ev, proto.Evicted):
                self._pending.clear()
                raise BrokerGone(f"broker {self.server!r} evicted {self.name!r}: {ev.text}")
            elif isinstance(ev, proto.ConnectionLost):
                self._lost_why = ev.why
                self._drop_socket(linger=0)
                self._pending.clear()
                self._held.clear()      # their slabs are the lost broker's
                if not ev.retrying:
                    raise BrokerGone(f"broker {self.server!r} {ev.why}")
            elif isinstance(ev, proto.RetryDue):
                try:
                    self._open()
                except BrokerNotRunning:        # no socket there (yet)
                    self._on_events(self._conn.failed(time.monotonic()))
            elif isinstance(ev, proto.Welcomed):         # after RetryDue
                try:
                    self._use(ev)
                except (BrokerGone, LayoutError):
                    self._on_events(self._conn.failed(time.monotonic()))
            elif isinstance(ev, proto.AttemptFailed):
                self._drop_socket()     # after its BYE, if it was welcomed
            elif isinstance(ev, proto.ReconnectAbandoned):
                raise BrokerGone(f"broker {self.server!r} {self._lost_why}, and {ev.why}")

    def _mismatch(self, ev: proto.BatchAnnounced) -> None:
        """A batch that does not match its slab: the broker broke the
        protocol, unless it evicted us meanwhile and reused the slab; its
        EVICT, sent before the slab was reused, is then on its way: it is
        waited for, for at most EVICT_WAIT seconds."""
        assert self._sock is not None
        deadline = time.monotonic() + EVICT_WAIT
        while (left := deadline - time.monotonic()) > 0 and self._sock.poll(int(left * 1000) + 1):
            try:
                events = self._conn.receive(self._sock.recv(), time.monotonic())
            except proto.RemoteProtocolError:
                break
            for e in events:
                if isinstance(e, proto.Evicted):
                    self._on_events([e])
        raise BrokerGone(f"batch {ev.seq} does not match the segment")

    def _flush(self) -> None:
        frames = self._conn.frames_to_send()
        if self._sock is not None:
            for frame in frames:
                self._sock.send(frame)


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


def connect(server: str, client: str, *, group: str | None = None, balance: str | None = None,
            policy: str | None = None, credit: int | None = None,
            timeout: float = proto.DEFAULT_TIMEOUT,
            reconnect: float = proto.DEFAULT_RECONNECT) -> Client:
    """Attaches to broker `server` (a name or "ipc://..."/"tcp://..." endpoint)
    as `client`, a name unique on that broker.

    group: every group receives every packet; the members of a group share
    its packets (default: a group of its own, named as the client). balance:
    how a group divides them, "flow" (the default: every packet of a flow,
    both ways, to one member) or "round-robin" (whole batches in turn); the
    group's first member sets it, and asking another is refused (Refused,
    code "balance-mismatch").

    policy: "block" (lossless: the broker waits for this client) or "drop"
    (the broker skips ahead when it lags, reporting Client.gaps); default:
    the broker's. credit: batches held at most at once. timeout: for this
    first attachment. reconnect: if the broker dies, how long to keep trying
    to attach to the one that takes its place (0: raise BrokerGone at once).
    """
    return Client(server, client, group=group, balance=balance, policy=policy, credit=credit,
                  timeout=timeout, reconnect=reconnect)


def broker_stats(server: str, timeout: float = 2.0) -> dict[str, Any]:
    """The STATS reply of broker `server`, without attaching to it."""
    endpoint = control_endpoint(server)
    _check_socket(server, ipc_path(endpoint))
    conn = proto.ClientConnection()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        conn.request_stats(time.monotonic())
        for frame in conn.frames_to_send():
            sock.send(frame)
        if not sock.poll(int(timeout * 1000)):
            raise BrokerNotRunning(f"broker {server!r} did not answer within {timeout:g} s")
        for ev in conn.receive(sock.recv(), time.monotonic()):
            if isinstance(ev, proto.StatsReceived):
                return ev.stats
        raise BrokerNotRunning(f"{endpoint} did not answer STATS")
    except proto.RemoteProtocolError as e:
        raise BrokerNotRunning(f"{endpoint} is not a pktipc broker: {e}") from e
    finally:
        sock.close()
        ctx.term()


def brokers() -> list[str]:
    """Names of the brokers with a control socket in the runtime directory."""
    from .._paths import runtime_dir

    rdir = runtime_dir()
    if not rdir.is_dir():
        return []
    return sorted(p.name[: -len(".ctl")] for p in rdir.glob("*.ctl"))
