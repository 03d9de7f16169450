"""PCAP-over-IP: a broker's packets as a plain pcap stream on TCP, for the
readers that take one (tshark -i TCP@HOST:PORT, Arkime's pcap-over-ip
reader, Zeek's PcapOverTcp, NetworkMiner).

Every TCP connection is a client of the broker, named after its peer (or,
with --connect, after the reader it dials). With a group, the connections
are members of one flow group: N readers on one port split the flows, each
flow whole to one of them. A connection holds at most its credit of batches
while their bytes wait to be written, so a reader that stalls costs only
itself: a `drop` client is skipped (and counted by the broker), a `block`
one holds the broker back as a block client does.

The stream is what these readers accept: classic little-endian pcap with
microsecond timestamps, snap length 65,535 (a longer frame is cut there,
its wire length kept), one link type: the broker's first source's. Packets
of sources of another link type are not sent, and counted.

The convention has no authentication and no encryption: listen on loopback
(the default), or use remote clients (CURVE) or a tunnel to cross a network.
"""

from __future__ import annotations

import errno
import hashlib
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import zmq

from .._client.client import Batch, Client, connect
from .._client.writer import PCAP_TS_END, pcap_header, records
from .._errors import EndOfStream, PktipcError
from .._paths import NAME_RE
from .._shm import lib

DEFAULT_PORT = 57012
SNAPLEN = 65535
RETRY_MAX = 10.0        # --connect: at most this long between attempts


@dataclass
class PcapOverIpOptions:
    server: str
    listen: list[tuple[str, int]] = field(default_factory=list)
    connect: list[tuple[str, int]] = field(default_factory=list)
    group: str | None = None
    balance: str | None = None
    policy: str | None = None
    credit: int | None = None
    timeout: float = 5.0


def host_port(text: str, default_host: str | None) -> tuple[str, int]:
    """(host, port) of "HOST:PORT", "[V6]:PORT" or "PORT" (with a default host)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = default_host or ""
    host = host.strip("[]") or (default_host or "")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text}: give HOST:PORT (PORT 0 to listen on any free one)")
    return host, int(port)


def client_name(host: str, port: int) -> str:
    name = f"pcap-{host.replace(':', '.')}-{port}"
    if NAME_RE.fullmatch(name):
        return name
    return "pcap-" + hashlib.blake2b(f"{host}:{port}".encode(), digest_size=8).hexdigest()


@dataclass
class _Conn:
    sock: socket.socket | None
    peer: tuple[str, int]
    name: str
    target: bool = False                # dialled (--connect): dialled again once it ends
    client: Client | None = None
    out: deque[tuple[Batch | None, memoryview]] = field(default_factory=deque)
    linktype: int = 1
    packets: int = 0
    skipped: int = 0                    # of another link type, or a time pcap cannot hold
    ended: bool = False                 # end-of-stream: closed once written
    retry_at: float = 0.0
    backoff: float = 0.5


class PcapOverIp:
    def __init__(self, opts: PcapOverIpOptions, log: TextIO = sys.stderr) -> None:
        if not opts.listen and not opts.connect:
            raise ValueError("give --listen ADDR:PORT, --connect HOST:PORT, or both")
        self.opts = opts
        self.log = log
        self.stopping = False
        self.listeners: list[socket.socket] = []
        self.conns: list[_Conn] = []
        try:
            for host, port in opts.listen:
                self.listeners.append(self._listen(host, port))
        except BaseException:
            self.close()
            raise
        for host, port in opts.connect:
            self.conns.append(_Conn(None, (host, port), client_name(host, port), target=True))

    def _say(self, line: str) -> None:
        print(f"pktipc pcap-over-ip: {line}", file=self.log, flush=True)

    def _listen(self, host: str, port: int) -> socket.socket:
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise PktipcError(f"cannot listen on {host}:{port}: {e}") from None
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(16)
            s.setblocking(False)
        except OSError as e:
            s.close()
            raise PktipcError(f"cannot listen on {host}:{port}: {e.strerror}") from None
        return s

    def close(self) -> None:
        for c in self.conns:
            self._close(c, None)
        for s in self.listeners:
            s.close()

    def serve(self) -> int:
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT,
                                                                    signal.SIGTERM)}
        where = ", ".join("{}:{}".format(*s.getsockname()[:2]) for s in self.listeners)
        to = ", ".join(f"{h}:{p}" for h, p in self.opts.connect)
        self._say(f"broker {self.opts.server!r}" + (f", listening on {where}" if where else "")
                  + (f", sending to {to}" if to else ""))
        try:
            while not self.stopping:
                self._turn()
            return 0
        finally:
            self.close()
            for sig, h in old.items():
                signal.signal(sig, h)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _turn(self) -> None:
        now = time.monotonic()
        poller = zmq.Poller()
        for s in self.listeners:
            poller.register(s.fileno(), zmq.POLLIN)
        wake = now + 0.2
        for c in self.conns:
            if c.sock is None:
                wake = min(wake, c.retry_at)
                continue
            poller.register(c.sock.fileno(), zmq.POLLIN | (zmq.POLLOUT if c.out or c.client
                                                           is None else 0))
            if c.client is not None and c.client._sock is not None:
                poller.register(c.client._sock, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int((wake - now) * 1000)) + 1))
        for s in self.listeners:
            if s.fileno() in ready:
                self._accept(s)
        now = time.monotonic()
        for c in list(self.conns):
            if c.sock is None:
                if c.target and now >= c.retry_at:
                    self._dial(c)
                continue
            ev = ready.get(c.sock.fileno(), 0)
            if c.client is None and c.target and ev & zmq.POLLOUT:
                self._dialled(c)
            if c.sock is not None and ev & zmq.POLLIN:
                self._read(c)
            if c.client is not None:
                self._take(c)
            if c.sock is not None and c.out:
                self._write(c)
            if c.ended and not c.out and c.sock is not None:
                self._close(c, f"end of the stream, after {c.packets} packets")

    # -- connections --
    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, addr = listener.accept()
        except OSError:
            return
        c = _Conn(sock, (addr[0], addr[1]), client_name(addr[0], addr[1]))
        self.conns.append(c)
        self._attach(c)

    def _dial(self, c: _Conn) -> None:
        host, port = c.peer
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except OSError as e:
            self._retry(c, str(e))
            return
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex((host, port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._retry(c, errno.errorcode.get(err, str(err)))
            return
        c.sock = sock

    def _dialled(self, c: _Conn) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            c.sock.close()
            c.sock = None
            self._retry(c, errno.errorcode.get(err, str(err)))
            return
        c.backoff = 0.5
        self._attach(c)

    def _retry(self, c: _Conn, why: str) -> None:
        c.retry_at = time.monotonic() + c.backoff
        if c.backoff == 0.5:
            self._say(f"{c.peer[0]}:{c.peer[1]}: {why}; trying again")
        c.backoff = min(2 * c.backoff, RETRY_MAX)

    def _attach(self, c: _Conn) -> None:
        o = self.opts
        assert c.sock is not None
        c.sock.setblocking(False)
        try:
            c.client = connect(o.server, c.name, group=o.group, balance=o.balance,
                               policy=o.policy, credit=o.credit, timeout=o.timeout, reconnect=0)
        except PktipcError as e:
            self._close(c, str(e))
            return
        ifaces = c.client.ifaces
        c.linktype = ifaces[0].linktype if ifaces else 1
        others = [i.name for i in ifaces if i.linktype != c.linktype]
        if others:
            self._say(f"{c.name}: link type {c.linktype} of {ifaces[0].name}; packets of "
                      f"{', '.join(others)} (another link type) are not sent")
        c.packets = c.skipped = 0
        c.ended = False
        c.out.append((None, memoryview(pcap_header(c.linktype, SNAPLEN, micro=True))))
        self._say(f"{c.peer[0]}:{c.peer[1]}: attached as client {c.name!r}"
                  + (f" of group {c.client.group!r}" if o.group else ""))

    def _read(self, c: _Conn) -> None:
        """A reader sends nothing: what comes is its end (or noise, ignored)."""
        assert c.sock is not None
        try:
            if c.sock.recv(4096):
                return
            why = "closed by the reader"
        except BlockingIOError:
            return
        except OSError as e:
            why = f"closed: {e.strerror}"
        self._close(c, f"{why}, after {c.packets} packets")

    def _take(self, c: _Conn) -> None:
        """The batches that came, made into pcap records, held (within the
        client's credit) until written: each batch's records in a buffer of
        their own, built in C in one call."""
        client = c.client
        assert client is not None
        while not c.ended:
            try:
                batch = client.next_batch(timeout=0)
            except EndOfStream:
                c.ended = True
                break
            except PktipcError as e:
                self._close(c, str(e))
                return
            if batch is None:
                break
            desc, idx = batch.descriptors, batch.mine
            d = desc[idx]
            ok = (d["linktype"] == c.linktype) & (d["ts_ns"] >= 0) & (d["ts_ns"] < PCAP_TS_END)
            if not ok.all():
                c.skipped += int((~ok).sum())
                idx, d = idx[ok], d[ok]
            size = int(np.minimum(d["caplen"], SNAPLEN).sum(dtype=np.int64)) + 16 * len(d)
            try:
                data = records(lib.CAPW_PCAP_US, desc, batch.buffer(), idx, bytearray(size),
                               size, snaplen=SNAPLEN)
            except PktipcError as e:
                batch.release()
                self._close(c, str(e))
                return
            c.packets += len(d)
            c.out.append((batch, data))

    def _write(self, c: _Conn) -> None:
        assert c.sock is not None
        while c.out:
            batch, data = c.out[0]
            try:
                n = c.sock.send(data)
            except BlockingIOError:
                return
            except OSError as e:
                self._close(c, f"closed: {e.strerror}, after {c.packets} packets")
                return
            if n < len(data):
                c.out[0] = (batch, data[n:])
                return
            c.out.popleft()
            if batch is not None:
                batch.release()

    def _close(self, c: _Conn, why: str | None) -> None:
        if why is not None:
            extra = f"; {c.skipped} not sent (link type or time)" if c.skipped else ""
            gaps = c.client.gaps if c.client is not None else []
            if gaps:
                lost = sum(hi - lo for lo, hi in gaps)
                extra += (f"; {lost} packets in {len(gaps)} gaps: the broker skipped it "
                          "while it lagged")
            self._say(f"{c.peer[0]}:{c.peer[1]}: {why}{extra}")
        for batch, _ in c.out:
            if batch is not None:
                batch.release()
        c.out.clear()
        if c.client is not None:
            c.client.close()
            c.client = None
        if c.sock is not None:
            c.sock.close()
            c.sock = None
        if c.target and not self.stopping:
            c.retry_at = time.monotonic() + c.backoff
        elif c in self.conns:
            self.conns.remove(c)
