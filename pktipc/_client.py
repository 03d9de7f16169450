"""The Python client: batches read in place from the broker's segment."""

from __future__ import annotations

import gc
import mmap
import os
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import posix_ipc
import zmq

from . import _protocol as proto
from ._errors import (
    BrokerGone,
    BrokerNotRunning,
    ClosedError,
    EndOfStream,
    LayoutError,
    PermissionDenied,
    refusal,
)
from ._layout import LAYOUT_VERSION, Iface, Segment
from ._paths import check_name, control_endpoint, ipc_path


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


class Batch:
    """Packets handed to this client by one BATCH message, read in place.

    Use it as a context manager, or call release(): the broker may reuse the
    slab only when every client it went to has released it. Releasing also
    releases every memoryview the batch handed out, so using one afterwards
    raises ValueError. `descriptors` is a NumPy view that NumPy cannot
    revoke: it reads recycled memory after release, so copy what you keep.
    """

    __slots__ = ("seq", "slab", "gen", "count", "_client", "_desc", "_views", "_released",
                 "__weakref__")

    def __init__(self, client: Client, seq: int, slab: int, gen: int, count: int) -> None:
        self.seq = seq
        self.slab = slab
        self.gen = gen
        self.count = count
        self._client = client
        self._desc: np.ndarray[Any, Any] | None = None
        self._views: list[memoryview] = []
        self._released = False

    def __len__(self) -> int:
        return self.count

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
        """Structured array (dtype pktipc.PKT_DTYPE) over the slab's descriptors."""
        self._check()
        if self._desc is None:
            if self._client._seg.batch_rec(self.slab).gen != self.gen:
                raise BrokerGone(f"batch {self.seq} was taken back by the broker")
            self._desc = self._client._seg.descriptors(self.slab, self.count)
        return self._desc

    def data(self, i: int) -> memoryview:
        """Bytes of packet i (zero-copy, read-only)."""
        d = self.descriptors[i]
        start = self._client._slab_base(self.slab) + int(d["data_off"])
        view = self._client._view[start : start + int(d["caplen"])]
        self._views.append(view)
        return view

    def views(self) -> list[memoryview]:
        """The bytes of every packet, in order (zero-copy, read-only)."""
        with _no_gc():
            return self._make_views(self.descriptors)

    def _make_views(self, d: np.ndarray[Any, Any]) -> list[memoryview]:
        starts = (d["data_off"].astype(np.int64) + self._client._slab_base(self.slab)).tolist()
        view = self._client._view
        views = [view[s : s + n] for s, n in zip(starts, d["caplen"].tolist(), strict=True)]
        self._views.extend(views)
        return views

    def packets(self) -> list[Packet]:
        """Every packet of the batch, in order; built column by column."""
        with _no_gc():
            return self._packets(self._make_views(self.descriptors))

    def _packets(self, data: Iterable[memoryview | bytes]) -> list[Packet]:
        d = self.descriptors
        return list(map(_make_packet, zip(
            data, d["ts_ns"].tolist(), d["caplen"].tolist(), d["wirelen"].tolist(),
            d["linktype"].tolist(), d["iface"].tolist(), range(self.seq, self.seq + self.count),
            d["flags"].tolist(), strict=True)))

    def __iter__(self) -> Iterator[Packet]:
        return iter(self.packets())

    def release(self) -> None:
        """Gives the batch back to the broker; idempotent."""
        if self._released:
            return
        self._released = True
        deque(map(memoryview.release, self._views), maxlen=0)
        self._views.clear()
        self._desc = None
        self._client._release(self.seq)

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Client:
    """One named client of one broker. See connect()."""

    def __init__(self, server: str, client: str, *, policy: str | None = None,
                 credit: int | None = None, timeout: float = 5.0) -> None:
        check_name("client", client)
        if policy is not None and policy not in proto.POLICIES:
            raise ValueError(f"policy must be one of {', '.join(proto.POLICIES)}")
        if credit is not None and not 1 <= credit <= proto.MAX_CREDIT:
            raise ValueError(f"credit must be between 1 and {proto.MAX_CREDIT}")
        self.name = client
        self.server = server
        self.endpoint = control_endpoint(server)
        self._closed = True     # until there is a socket to close
        self._ended = False
        self._pending: deque[proto.Batch] = deque()
        self._held: set[int] = set()
        self._batches: weakref.WeakSet[Batch] = weakref.WeakSet()
        self.gaps: list[tuple[int, int]] = []
        self.end_error: str | None = None
        self._conn = proto.ClientConnection()
        _check_socket(server, ipc_path(self.endpoint))
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._closed = False
        self._sock.setsockopt(zmq.LINGER, 1000)
        self._sock.connect(self.endpoint)
        try:
            self._conn.hello(time.monotonic(), name=client, group=None, policy=policy,
                             credit=credit, pid=os.getpid())
            welcome = self._await_welcome(timeout)
            self._map(welcome)
        except BaseException:
            self._conn.bye(time.monotonic())    # BYE only if it was attached
            self._flush()
            self._teardown()
            raise
        self.welcome = welcome

    def _await_welcome(self, timeout: float) -> proto.Welcome:
        self._flush()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise BrokerNotRunning(
                        f"broker {self.server!r} did not answer within {timeout:g} s")
                continue
            try:
                events = self._conn.receive(self._sock.recv(), time.monotonic())
            except proto.RemoteProtocolError as e:
                raise BrokerNotRunning(f"{self.endpoint} is not a pktipc broker: {e}") from e
            for ev in events:
                if isinstance(ev, proto.Welcome):
                    return ev
                if isinstance(ev, proto.ErrorReply):
                    raise refusal(ev.code, f"broker {self.server!r} refused {self.name!r}: "
                                  f"{ev.text}")

    def _map(self, w: proto.Welcome) -> None:
        if w.layout != LAYOUT_VERSION:
            raise LayoutError(f"broker uses layout {w.layout}, this client reads "
                              f"{LAYOUT_VERSION}")
        try:
            shm = posix_ipc.SharedMemory(w.shm, read_only=True)
        except posix_ipc.ExistentialError:
            raise BrokerGone(f"segment {w.shm} of broker {self.server!r} is gone") from None
        try:
            self._mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ)
        finally:
            shm.close_fd()
        self._seg = Segment(self._mm)
        self._seg.check()
        if self._seg.header.epoch != w.epoch:
            raise LayoutError("segment epoch differs from the broker's")
        self._view = memoryview(self._mm)
        self._slabs_off = self._seg.geometry.slabs_off
        self._slab_size = self._seg.geometry.slab_size

    def _slab_base(self, slab: int) -> int:
        return self._slabs_off + self._slab_size * slab

    # -- public --
    @property
    def ifaces(self) -> list[Iface]:
        """The broker's sources (interfaces or files); a packet's `iface` indexes it."""
        self._check_open()
        return self._seg.ifaces()

    @property
    def ended(self) -> bool:
        return bool(self._ended) and not self._pending

    def next_batch(self, timeout: float | None = None) -> Batch | None:
        """The next batch; None if none came within `timeout` seconds (None:
        wait for ever). Raises EndOfStream after the broker's last batch,
        BrokerGone if the broker died or evicted this client."""
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            # Read what has come before handing out what was queued: an EVICT
            # behind queued batches means their slabs are no longer ours.
            self._receive_all()
            if self._pending:
                b = self._pending.popleft()
                self._held.add(b.seq)
                batch = Batch(self, b.seq, b.slab, b.gen, b.n)
                self._batches.add(batch)
                return batch
            if self._ended:
                raise EndOfStream(self.end_error)
            now = time.monotonic()
            wake = self._conn.get_timer()
            wait = 0.5 if wake is None else max(0.0, wake - now)
            if deadline is not None:
                if now >= deadline:
                    return None
                wait = min(wait, deadline - now)
            if self._sock.poll(int(wait * 1000) + (wait > 0)):
                self._receive_all()
            self._on_events(self._conn.handle_timer(time.monotonic()))
            self._flush()

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
                copies = b._packets(map(bytes, b._make_views(b.descriptors)))
            yield from copies

    def stats(self, timeout: float = 2.0) -> dict[str, Any]:
        """The broker's STATS reply."""
        self._check_open()
        self._conn.request_stats(time.monotonic())
        self._flush()
        deadline = time.monotonic() + timeout
        self._stats: dict[str, Any] | None = None
        while self._stats is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerGone(f"broker {self.server!r} did not answer STATS")
            if self._sock.poll(int(left * 1000) + 1):
                self._receive_all()
        return self._stats

    def close(self) -> None:
        """Detaches from the broker (BYE); idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
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
        for batch in list(self._batches):
            batch.release()         # its views must not read slabs the broker reuses
        self._sock.close()
        self._ctx.term()
        view = getattr(self, "_view", None)
        if view is not None:
            self._seg = None  # type: ignore[assignment]
            try:
                view.release()
                self._mm.close()
            except BufferError:
                pass  # NumPy views still use the mapping; it goes with them

    def _release(self, seq: int) -> None:
        if self._closed or seq not in self._held:
            return
        self._held.discard(seq)
        self._conn.release(time.monotonic(), [seq])
        self._flush()

    def _receive_all(self) -> None:
        events: list[proto.ClientEvent] = []
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                events += self._conn.receive(frame, time.monotonic())
            except proto.RemoteProtocolError as e:
                raise BrokerGone(f"broker {self.server!r} broke the protocol: {e}") from e
        self._on_events(events)

    def _on_events(self, events: list[proto.ClientEvent]) -> None:
        # An eviction voids the batches announced before it (their slabs may
        # already hold other packets), so it is handled first.
        events.sort(key=lambda ev: not isinstance(ev, proto.Evicted))
        for ev in events:
            if isinstance(ev, proto.Batch):
                if (ev.slab >= self._seg.geometry.slab_count
                        or self._seg.batch_rec(ev.slab).gen != ev.gen):
                    raise BrokerGone(f"batch {ev.seq} does not match the segment")
                self._pending.append(ev)
            elif isinstance(ev, proto.Gap):
                self.gaps.append((ev.start, ev.end))
            elif isinstance(ev, proto.EndOfStream):
                self._ended = True
                self.end_error = ev.error
            elif isinstance(ev, proto.StatsReply):
                self._stats = ev.stats
            elif isinstance(ev, proto.ErrorReply):
                raise refusal(ev.code, f"broker {self.server!r} refused a request: {ev.text}")
            elif isinstance(ev, proto.Evicted):
                self._pending.clear()
                raise BrokerGone(f"broker {self.server!r} evicted {self.name!r}: {ev.text}")
            elif isinstance(ev, proto.BrokerLost):
                raise BrokerGone(f"broker {self.server!r} stopped answering")

    def _flush(self) -> None:
        for frame in self._conn.frames_to_send():
            self._sock.send(frame)


def _check_socket(server: str, path: Path | None) -> None:
    """Fails fast, and says why, when a local broker's socket is not there or
    not ours to use (ZeroMQ would retry in silence)."""
    if path is None:
        return
    try:
        path.stat()
    except FileNotFoundError:
        raise BrokerNotRunning(f"broker {server!r} is not running (no {path})") from None
    except PermissionError:
        raise PermissionDenied(f"{path.parent}: permission denied (a broker admits its own "
                               "user, and a group given with serve --group)") from None
    if not os.access(path, os.R_OK | os.W_OK):
        raise PermissionDenied(f"{path}: permission denied (a broker admits its own user, "
                               "and a group given with serve --group)")


def connect(server: str, client: str, *, policy: str | None = None,
            credit: int | None = None, timeout: float = 5.0) -> Client:
    """Attaches to broker `server` (a name or "ipc://..."/"tcp://..." endpoint)
    as `client`, a name unique on that broker.

    policy: "block" (lossless: the broker waits for this client) or "drop"
    (the broker skips ahead when it lags, reporting Client.gaps); default:
    the broker's. credit: batches held at most at once.
    """
    return Client(server, client, policy=policy, credit=credit, timeout=timeout)


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
            if isinstance(ev, proto.StatsReply):
                return ev.stats
        raise BrokerNotRunning(f"{endpoint} did not answer STATS")
    except proto.RemoteProtocolError as e:
        raise BrokerNotRunning(f"{endpoint} is not a pktipc broker: {e}") from e
    finally:
        sock.close()
        ctx.term()


def brokers() -> list[str]:
    """Names of the brokers with a control socket in the runtime directory."""
    from ._paths import runtime_dir

    rdir = runtime_dir()
    if not rdir.is_dir():
        return []
    return sorted(p.name[: -len(".ctl")] for p in rdir.glob("*.ctl"))
