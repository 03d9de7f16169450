"""The broker's ZeroMQ edge: one ROUTER socket, where control frames come in
(with who sent them, as the kernel says) and go out.

Nothing a peer does here costs the others more than a bounded amount: the
queues each way are bounded; a connection is admitted (ZAP, at its
handshake) only while there are fewer than `max_connections` and its
process is not banned; a connection can be cut, from this side, when its
peer floods or does not read.
"""

from __future__ import annotations

import enum
import os
import socket
import stat
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils.monitor import parse_monitor_message

from .._errors import PktipcError
from .._paths import ipc_path
from .._shm import lib

ZAP_ENDPOINT = "inproc://zeromq.zap.01"     # where libzmq asks whether to admit a peer
HANDSHAKE_MS = 2000         # a connection that says nothing is closed after this
RECV_HWM = 1000             # messages queued from one peer before it must wait
MAX_MESSAGE = 1 << 20       # a longer frame makes libzmq close the connection
MAX_KNOWN = 4096            # peers whose connection is remembered, for cutting it


@dataclass(frozen=True)
class Credentials:
    """Who is at the other end of a local (ipc://) connection: the kernel's
    SO_PEERCRED, which libzmq hands over as the frames' Peer-Address
    ("host:uid:gid:pid"). Remote peers have none."""

    uid: int
    gid: int
    pid: int


def _credentials(addr: str) -> Credentials | None:
    parts = addr.rsplit(":", 3)
    if len(parts) != 4 or not all(p.isdigit() for p in parts[1:]):
        return None
    return Credentials(int(parts[1]), int(parts[2]), int(parts[3]))


class Sent(enum.Enum):
    OK = "ok"
    FULL = "full"       # the peer does not read: its queue is at its bound
    GONE = "gone"       # no such peer any more


class ControlSocket:
    def __init__(self, endpoint: str, *, group_access: bool, max_connections: int,
                 send_hwm: int) -> None:
        self.endpoint = endpoint
        self.path: Path | None = ipc_path(endpoint)
        self.max_connections = max_connections
        self.connections = 0
        self.refused = 0            # connections refused: too many, or banned
        self.failed = 0             # handshakes that failed (silent, or refused)
        self.cut = 0                # connections cut from this side
        self.banned: dict[int, float] = {}    # pid -> until (time.monotonic)
        self._known: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # peer -> fd, inode
        # libzmq would abort at an accept() that finds the file table full:
        # it waits instead (engine/acceptguard.h).
        if lib.pkb_accept_guard() <= 0:
            print("pktipc: warning: libzmq's accept() is not guarded here: a flood of "
                  "connections that fills the file table would abort the broker",
                  file=sys.stderr)
        self.ctx = zmq.Context()
        # The ZAP handler must be there before the first connection comes.
        self.zap = self.ctx.socket(zmq.ROUTER)
        self.zap.bind(ZAP_ENDPOINT)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, send_hwm)
        self.sock.setsockopt(zmq.RCVHWM, RECV_HWM)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        self.sock.setsockopt(zmq.ZAP_DOMAIN, b"pktipc")
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        if self.path is not None:
            self.path.unlink(missing_ok=True)   # left by a dead broker; we hold the lock
        # Born with its final mode, in a directory no one else can write:
        # 0600, or 0660 with the group the (setgid) directory gives it.
        old = os.umask(0o117 if group_access else 0o177)
        try:
            self.sock.bind(endpoint)
        except zmq.ZMQError as e:
            self.close()
            raise PktipcError(f"cannot listen on {endpoint}: {e}") from None
        finally:
            os.umask(old)

    @property
    def sockets(self) -> list[zmq.Socket[bytes]]:
        """What the loop polls for this edge."""
        return [self.sock, self.zap, self.monitor]

    def receive(self) -> tuple[bytes, list[bytes], Credentials | None] | None:
        """One message: (peer, its frames, credentials), or None when none waits."""
        try:
            parts = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        peer, last = parts[0].bytes, parts[-1]
        if peer not in self._known:
            self._remember(peer, int(last.get(zmq.SRCFD)))
        return peer, [p.bytes for p in parts[1:]], _credentials(str(last.get("Peer-Address")))

    def _remember(self, peer: bytes, fd: int) -> None:
        try:
            self._known[peer] = (fd, os.fstat(fd).st_ino)
        except OSError:
            return
        while len(self._known) > MAX_KNOWN:
            self._known.popitem(last=False)

    def send(self, peer: bytes, frame: bytes) -> Sent:
        try:
            self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.Again:
            return Sent.FULL
        except zmq.ZMQError:
            return Sent.GONE
        return Sent.OK

    def forget(self, peer: bytes) -> None:
        self._known.pop(peer, None)

    def cut_off(self, peer: bytes) -> bool:
        """Closes the connection `peer` came on, from this side (ZeroMQ has no
        call for that on a ROUTER): the socket is shut down through a
        duplicate of libzmq's descriptor, once the duplicate is checked to
        be the same connection (a descriptor number is reused)."""
        fd_ino = self._known.pop(peer, None)
        if fd_ino is None:
            return False
        fd, ino = fd_ino
        try:
            dup = os.dup(fd)
            st = os.fstat(dup)
        except OSError:
            return False
        if not stat.S_ISSOCK(st.st_mode) or st.st_ino != ino:
            os.close(dup)
            return False
        with socket.socket(fileno=dup) as s:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                return False
        self.cut += 1
        return True

    @property
    def accepts_deferred(self) -> int:
        """Accepts that found the file table full: the connection waited."""
        return int(lib.pkb_accept_emfile())

    def ban(self, pid: int, until: float) -> None:
        """Refuses new connections of process `pid` until `until`."""
        self.banned[pid] = until

    def handle_zap(self, now: float) -> None:
        """Answers libzmq's requests to admit a connection (RFC 27), at its
        handshake: refused while there are max_connections, or for a banned
        process. The count is brought up to date first: a flood's
        connections are accepted well before their requests come."""
        self.handle_monitor()
        while True:
            try:
                req = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(req) < 6:
                continue
            self.banned = {p: t for p, t in self.banned.items() if t > now}
            creds = _credentials(req[5].decode(errors="replace"))
            if self.connections > self.max_connections:
                status, text = b"400", b"too many connections"
            elif creds is not None and creds.pid in self.banned:
                status, text = b"400", b"banned for a while"
            else:
                status, text = b"200", b"OK"
            if status != b"200":
                self.refused += 1
            self.zap.send_multipart([req[0], b"", b"1.0", req[3], status, text, b"", b""])

    def handle_monitor(self) -> None:
        """Keeps count of the connections open now."""
        while True:
            try:
                msg = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)["event"]
            if event == zmq.EVENT_ACCEPTED:
                self.connections += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self.connections = max(0, self.connections - 1)
            else:
                self.failed += 1

    def close(self) -> None:
        for s in (self.monitor, self.sock, self.zap):
            s.close(linger=1000 if s is self.sock else 0)
        self.ctx.term()
        if self.path is not None:
            self.path.unlink(missing_ok=True)
