"""The gateway: remote clients of a broker, over ZeroMQ TCP.

A process beside the broker, not a part of it. For each remote client it
attaches to the broker as an ordinary local client (same name, group,
policy and credit), maps the broker's segment read-only, and forwards: a
BATCH becomes one REMOTE_BATCH carrying the client's packets (descriptors
and bytes; the bytes of a whole batch sent by ZeroMQ straight from the
segment), a RELEASE from the remote client a RELEASE to the broker, GAP,
END-OF-STREAM, EVICT and STATS as they come. So the broker's loop does not
change at all, a flow group may mix local and remote members, and what a
remote client or its network costs is its own attachment's: its credit,
its policy, its lease.

TCP is CURVE-encrypted and authenticated (ZeroMQ's ironhouse: the gateway
holds a key pair, and admits the client public keys in a directory, read
again whenever it changes) unless `insecure`: peers that fail the handshake
never reach the protocol machine; they are counted and logged.

A remote client that is lost (silent for the liveness, its connection
gone) leaves its attachment with DETACH: the broker keeps its place for
--grace. One that comes back under its name, with the same key, on a new
connection takes its attachment over at once. A client whose connection
went before it was heard after its WELCOME (an attempt it gave up while
the broker was slow to answer) may have missed all the broker sent: its
attachment waits for it (--liveness), and is given to it when it comes
back, with all the broker sent since WELCOME.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .. import _protocol as proto
from .._client.session import _check_socket, _Mapping
from .._errors import PktipcError
from .._layout import IFACE_SIZE, LAYOUT_VERSION, PKT_DTYPE, select
from .._paths import check_name, control_endpoint, ipc_path
from .._shm import ffi, lib

DEFAULT_PORT = 57010
MAX_SESSIONS = 64
ZERO_COPY = 1 << 16      # bytes from which ZeroMQ sends from the segment rather than a copy
_LISTEN = re.compile(r"(?:tcp://)?(?:(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.*-]+):)?(\d{1,5})")


def listen_endpoint(text: str, default_port: int) -> str:
    """tcp://ADDR:PORT of "ADDR:PORT", "PORT" (on loopback) or "tcp://ADDR:PORT"."""
    m = _LISTEN.fullmatch(text.strip())
    if m is None or not 0 <= int(m[2]) < 65536:
        raise ValueError(f"--listen {text}: give ADDR:PORT (ADDR 127.0.0.1 by default, "
                         "0.0.0.0 or * for every address, [::1] for IPv6; PORT 0: any free "
                         "one)")
    return f"tcp://{m[1] or '127.0.0.1'}:{m[2]}"


def load_server_key(path: str) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--key {path}: cannot read it ({e})") from None
    if secret is None:
        raise ValueError(f"--key {path}: holds no secret key (give the .key_secret file "
                         "pktipc keygen wrote)")
    return public, secret


def keygen(directory: str, name: str) -> tuple[str, str]:
    """Writes NAME.key (the public key, to give out) and NAME.key_secret
    (both keys; readable by its owner only) in `directory`."""
    check_name("key", name)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for p in (d / f"{name}.key", d / f"{name}.key_secret"):
        if p.exists():
            raise ValueError(f"{p} exists: give another name, or remove it first")
    old = os.umask(0o077)
    try:
        public, secret = zmq.auth.create_certificates(str(d), name)
    finally:
        os.umask(old)
    os.chmod(public, 0o644)
    return public, secret


class _Keys:
    """The client keys admitted: the public keys in a directory, read again
    whenever the directory changes. Called by the authenticator's thread."""

    def __init__(self, directory: str, log: Callable[[str], None]) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise ValueError(f"--keys {directory}: not a directory (of the client public "
                             "keys to admit)")
        self.log = log
        self.stamp: float | None = None
        self.keys: dict[bytes, bool] = {}
        self.refused = 0
        self._load()
        if not self.keys:
            log(f"pktipc gateway: no client key in {self.dir} yet: nobody is admitted")

    def _load(self) -> None:
        stamp = self.dir.stat().st_mtime
        if stamp != self.stamp:
            self.stamp = stamp
            self.keys = zmq.auth.load_certificates(str(self.dir))

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            self._load()
        except OSError as e:
            self.log(f"pktipc gateway: cannot read {self.dir}: {e}")
        if key in self.keys:
            return True
        self.refused += 1
        self.log(f"pktipc gateway: refused a client whose key {key.decode()} is not in "
                 f"{self.dir} ({self.refused} refused)")
        return False


# ERRORs the broker sends an attached peer about a RELEASE, or a DETACH from
# a peer it no longer knows: never a refusal of a HELLO.
OLD_ERRORS = ("bad-release", "not-attached")


@dataclass
class GatewayOptions:
    server: str                         # the broker's name
    listen: str                         # tcp://ADDR:PORT
    keys: str | None = None             # directory of the client public keys admitted
    key: str | None = None              # the gateway's own key pair (.key_secret)
    insecure: bool = False              # plain TCP: no encryption, no authentication
    heartbeat: float = 1.0
    liveness: float = 10.0              # a remote client silent this long is lost
    control_rate: float = proto.CONTROL_RATE
    max_clients: int = MAX_SESSIONS


@dataclass
class _Session:
    """A remote client and its attachment to the broker."""

    name: str
    key: str | None                     # its CURVE key (z85), None with --insecure
    peer: bytes | None                  # its connection (routing id); None: gone
    sock: zmq.Socket[bytes]             # to the broker
    conn: proto.ClientConnection
    owner: int | None = None            # the broker's uid, as its socket says
    mapping: _Mapping | None = None
    welcome: proto.Welcomed | None = None
    # What the broker sent since WELCOME while the client has not been
    # heard since (see _orphan); None once it has.
    backlog: list[proto.ClientEvent] | None = None
    orphan_until: float | None = None   # its connection went before it was heard
    # Taken over (see _take_over): what the broker sent the old attachment
    # before it read the DETACH comes until the new one's WELCOME or ERROR.
    taken_over: bool = False
    unsent: dict[int, zmq.MessageTracker] = field(default_factory=dict)  # zero-copy sends
    batches: int = 0
    packets: int = 0
    bytes: int = 0


class Gateway:
    def __init__(self, opts: GatewayOptions, log: TextIO = sys.stderr) -> None:
        check_name("broker", opts.server)
        if not opts.insecure and (opts.keys is None or opts.key is None):
            raise ValueError("CURVE needs --key (the gateway's key pair, from pktipc keygen) "
                             "and --keys (a directory of the client public keys to admit); "
                             "--insecure for plain TCP, with neither encryption nor "
                             "authentication")
        if not 0 < opts.heartbeat < opts.liveness:
            raise ValueError("--heartbeat must be positive and below --liveness")
        self.opts = opts
        self.log = log
        self.endpoint = control_endpoint(opts.server)
        self.conn = proto.BrokerConnection(heartbeat=opts.heartbeat, liveness=opts.liveness,
                                           rate=opts.control_rate, remote=True)
        self.sessions: dict[str, _Session] = {}
        self.by_peer: dict[bytes, _Session] = {}
        self.by_sock: dict[zmq.Socket[bytes], _Session] = {}
        self.fds: dict[bytes, int] = {}             # peer -> its connection's descriptor
        self.stopping = False
        self.counters = {"connections": 0, "handshakes_failed": 0, "attachments": 0,
                         "batches": 0, "packets": 0, "bytes": 0, "cut": 0,
                         "stale_dropped": 0}
        self.refused: dict[str, int] = {}
        self._backs: list[tuple[proto.HelloReceived, str | None]] = []
        self._mapping: _Mapping | None = None
        self._broker_pidfd: int | None = None
        self._stats_sock: zmq.Socket[bytes] | None = None
        self._stats_conn: proto.ClientConnection | None = None
        self._stats_waiting: deque[bytes] = deque()
        self._keys: _Keys | None = None
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        try:
            self._bind()
        except BaseException:
            self.close()
            raise

    def _say(self, line: str) -> None:
        print(line, file=self.log, flush=True)

    def _bind(self) -> None:
        o = self.opts
        self.router = r = self.ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.MAXMSGSIZE, proto.MAX_FRAME)
        r.setsockopt(zmq.SNDHWM, 2 * proto.MAX_CREDIT + 64)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        if not o.insecure:
            assert o.key is not None and o.keys is not None
            public, secret = load_server_key(o.key)
            self._keys = _Keys(o.keys, self._say)
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve_callback("*", credentials_provider=self._keys)
            r.curve_secretkey = secret
            r.curve_publickey = public
            r.curve_server = True
        self.monitor = r.get_monitor_socket(
            zmq.EVENT_ACCEPTED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        try:
            r.bind(o.listen)
        except zmq.ZMQError as e:
            raise PktipcError(f"cannot listen on {o.listen}: {e}") from None
        self.listening = r.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        for s in list(self.sessions.values()):
            s.sock.close(linger=0)
        if self._stats_sock is not None:
            self._stats_sock.close(linger=0)
        if getattr(self, "monitor", None) is not None:
            self.router.disable_monitor()
            self.monitor.close(linger=0)
        if getattr(self, "router", None) is not None:
            self.router.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self._broker_pidfd is not None:
            os.close(self._broker_pidfd)
        self.ctx.term()
        if self._mapping is not None:
            self._mapping.close()

    # -- the loop --
    def serve(self) -> int:
        old = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        what = "in clear, unauthenticated (--insecure)" if self.opts.insecure else \
            f"CURVE, admitting the keys in {self.opts.keys}"
        self._say(f"pktipc gateway: broker {self.opts.server!r} on {self.listening}, {what}")
        try:
            while not self.stopping:
                self._turn()
            for s in list(self.sessions.values()):
                self._lose(s, time.monotonic(), None)
            return 0
        finally:
            self.close()
            for sig, h in old.items():
                signal.signal(sig, h)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _turn(self) -> None:
        poller = zmq.Poller()
        for sock in (self.router, self.monitor, *self.by_sock):
            poller.register(sock, zmq.POLLIN)
        if self._stats_sock is not None:
            poller.register(self._stats_sock, zmq.POLLIN)
        if self._broker_pidfd is not None:
            poller.register(self._broker_pidfd, zmq.POLLIN)
        timers = [t for t in (self.conn.get_timer(), *(s.conn.get_timer() for s in
                                                        self.sessions.values()),
                              *(s.orphan_until for s in self.sessions.values()))
                  if t is not None]
        now = time.monotonic()
        wait = max(0.0, min([now + 0.2, *timers]) - now)
        ready = dict(poller.poll(int(wait * 1000) + 1))
        if self.monitor in ready:
            self._monitor_events()
        if self._broker_pidfd is not None and self._broker_pidfd in ready:
            self._broker_gone("the broker exited")
        for sock in [s for s in ready if s in self.by_sock]:
            self._from_broker(self.by_sock[sock])
        if self._stats_sock is not None and self._stats_sock in ready:
            self._stats_replies()
        if self.router in ready:
            self._from_remotes()
        now = time.monotonic()
        for ev in self.conn.handle_timer(now):
            self._remote_event(ev, now)
        for s in list(self.sessions.values()):
            if s.orphan_until is not None and now >= s.orphan_until:
                self._lose(s, now, f"it did not come back within {self.opts.liveness:g} s")
                continue
            self._local_events(s, s.conn.handle_timer(now), now)
            self._flush_local(s)
        self._flush()

    def _monitor_events(self) -> None:
        while True:
            try:
                ev = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if ev["event"] == zmq.EVENT_ACCEPTED:
                self.counters["connections"] += 1
            else:
                self.counters["handshakes_failed"] += 1

    # -- remote clients --
    def _from_remotes(self) -> bool:
        """Reads what came (a bounded number); whether every message that
        had come is read."""
        if not self._read_remotes():
            return False
        # HELLOs of clients back on a new connection, taken once what
        # came on the old one is read (see _hello).
        backs, self._backs = self._backs, []
        for ev, key in backs:
            self._hello(ev, key, time.monotonic(), back=True)
        return True

    def _read_remotes(self) -> bool:
        """Whether every message that had come is read."""
        for _ in range(512):
            try:
                parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            peer = parts[0].bytes
            now = time.monotonic()
            if peer not in self.fds:
                self.fds[peer] = int(parts[-1].get(zmq.SRCFD))
                while len(self.fds) > 4 * MAX_SESSIONS * 16:
                    del self.fds[next(iter(self.fds))]
            if len(parts) != 2:
                self.conn.refuse(peer, now, "malformed", "expected one frame per message")
                continue
            key = str(parts[1].get("User-Id")) if not self.opts.insecure else None
            try:
                events = self.conn.receive(peer, parts[1].bytes, now,
                                           key=key or parts[1].get("Peer-Address"))
            except proto.RemoteProtocolError:
                continue    # the ERROR reply is queued
            for ev in events:
                if isinstance(ev, proto.HelloReceived):
                    self._hello(ev, key, now)
                else:
                    self._remote_event(ev, now)
        return False

    def _refuse(self, peer: bytes, now: float, code: str, text: str) -> None:
        self.refused[code] = self.refused.get(code, 0) + 1
        self.conn.refuse(peer, now, code, text)

    def _hello(self, ev: proto.HelloReceived, key: str | None, now: float,
               back: bool = False) -> None:
        if ev.server != self.opts.server:
            self._refuse(ev.peer, now, "no-such-broker",
                         f"this gateway serves broker {self.opts.server!r}, not {ev.server!r}")
            return
        s = self.sessions.get(ev.name)
        if s is not None and s.key == key and s.orphan_until is not None:
            self._adopt(s, ev, now)
            return
        if s is not None:
            if s.key != key or s.peer is None or s.conn.state is not proto.State.ATTACHED:
                self._refuse(ev.peer, now, "name-taken",
                             f"a remote client named {ev.name!r} is attached"
                             + (" with another key" if s.key != key else ""))
                return
            if not back:
                # Its old connection may still hold messages the router has
                # not handed over (it takes one from each connection in
                # turn): its RELEASEs, its BYE. Taken over now, they would
                # be dropped with it, and the broker, resuming the place,
                # would send again batches the client gave back. So the
                # HELLO waits for the end of this read of the router.
                self._backs.append((ev, key))
                return
            self._take_over(s, ev, now)
            return
        if len(self.sessions) >= self.opts.max_clients:
            self._refuse(ev.peer, now, "too-many-clients",
                         f"this gateway serves at most {self.opts.max_clients} clients")
            return
        try:
            owner = _check_socket(self.opts.server, ipc_path(self.endpoint))
        except PktipcError as e:
            self._refuse(ev.peer, now, "not-running", f"{e} (on the gateway's host)")
            return
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.endpoint)
        s = _Session(ev.name, key, ev.peer, sock, proto.ClientConnection(), owner)
        self.sessions[s.name] = s
        self.by_peer[ev.peer] = s
        self.by_sock[sock] = s
        self._local_hello(s, ev, now)

    def _local_hello(self, s: _Session, ev: proto.HelloReceived, now: float) -> None:
        s.conn.hello(now, name=ev.name, group=ev.group, policy=ev.policy, credit=ev.credit,
                     pid=os.getpid(), balance=ev.balance)
        self._flush_local(s)

    def _take_over(self, s: _Session, ev: proto.HelloReceived, now: float) -> None:
        """The client is back on a new connection while its old one still
        seems alive: the old one is dropped, and the attachment handed over
        (DETACH then HELLO on the same connection to the broker, in order:
        it resumes with what it held)."""
        if s.peer is not None and s.backlog is not None and not self.conn.heard(s.peer):
            # Its old connection never said a word after WELCOME: nothing
            # of the attachment reached it, or it would have.
            self._forget_peer(s)
            self._adopt(s, ev, now)
            return
        self._say(f"pktipc gateway: client {s.name!r} is back on a new connection")
        self._forget_peer(s)
        s.conn.detach(now)
        self._flush_local(s)
        s.conn = proto.ClientConnection()
        s.taken_over = True
        s.peer = ev.peer
        self.by_peer[ev.peer] = s
        self._local_hello(s, ev, now)

    def _orphan(self, s: _Session, now: float) -> None:
        """The client's connection is gone before it was heard after its
        WELCOME: it gave that attempt up, perhaps before the WELCOME came.
        The broker may have sent it all its stream since: the attachment,
        and what came on it, wait for the client's next attempt."""
        self._say(f"pktipc gateway: client {s.name!r} went before it heard its WELCOME: "
                  f"its attachment waits {self.opts.liveness:g} s for it")
        self._forget_peer(s)
        s.orphan_until = now + self.opts.liveness

    def _adopt(self, s: _Session, ev: proto.HelloReceived, now: float) -> None:
        """The client back, on a new connection, for an attachment it never
        heard of: WELCOME again, and all the broker sent since."""
        self._say(f"pktipc gateway: client {s.name!r} is back: it is given its attachment")
        assert s.backlog is not None
        s.orphan_until = None
        s.peer = ev.peer
        self.by_peer[ev.peer] = s
        self._accept(s, now)
        for e in list(s.backlog):
            self._deliver(s, ev.peer, e, now)

    def _forget_peer(self, s: _Session) -> None:
        if s.peer is None:
            return
        if s.unsent and not all(t.done for t in s.unsent.values()):
            # ZeroMQ still has bytes of the segment to send it, which the
            # broker may reuse once this attachment is gone: cut instead.
            self._cut(s.peer)
        s.unsent.clear()
        self.conn.forget(s.peer)
        self.by_peer.pop(s.peer, None)
        s.peer = None

    def _cut(self, peer: bytes) -> None:
        """Closes a peer's connection from this side (see control.py's cut_off)."""
        fd = self.fds.pop(peer, None)
        if fd is None:
            return
        try:
            with socket.socket(fileno=os.dup(fd)) as sk:
                sk.shutdown(socket.SHUT_RDWR)
            self.counters["cut"] += 1
        except OSError:
            pass

    def _remote_event(self, ev: proto.BrokerEvent, now: float) -> None:
        if isinstance(ev, proto.StatsRequested):
            s = self.by_peer.get(ev.peer)
            if s is not None and s.conn.state in (proto.State.ATTACHED, proto.State.ENDED):
                s.conn.request_stats(now)
                self._flush_local(s)
            else:
                self._stranger_stats(ev.peer, now)
            return
        s = self.by_peer.get(getattr(ev, "peer", b""))
        if s is None:
            return
        if isinstance(ev, proto.ReleaseReceived):
            for seq in ev.seqs:
                s.unsent.pop(seq, None)
            if s.conn.state in (proto.State.ATTACHED, proto.State.ENDED):
                s.conn.release(now, ev.seqs)
                self._flush_local(s)
        elif isinstance(ev, proto.ByeReceived):
            self.by_peer.pop(ev.peer, None)
            s.peer = None
            s.conn.bye(now)
            self._end(s)
        elif isinstance(ev, proto.DetachReceived):
            self._lose(s, now, "it detached")
        elif isinstance(ev, proto.PeerTimedOut):
            self._lose(s, now, f"nothing heard from it for {self.opts.liveness:g} s")
        elif isinstance(ev, proto.PeerFlooding):
            self._cut(ev.peer)
            self._lose(s, now, "it sent more messages than it may")

    def _lose(self, s: _Session, now: float, why: str | None) -> None:
        """The remote client is gone (or the gateway stops): its attachment
        is left with DETACH, for the broker to keep its place."""
        if why is not None:
            self._say(f"pktipc gateway: client {s.name!r} lost: {why}")
        self._forget_peer(s)
        s.conn.detach(now)
        self._end(s)

    def _end(self, s: _Session) -> None:
        self._flush_local(s)
        self._forget_peer(s)
        s.sock.close(linger=1000)
        del self.by_sock[s.sock]
        del self.sessions[s.name]

    # -- the broker --
    def _flush_local(self, s: _Session) -> None:
        for frame in s.conn.frames_to_send():
            try:
                s.sock.send(frame, zmq.NOBLOCK)
            except zmq.Again:
                pass     # the broker does not read: its liveness will tell

    def _from_broker(self, s: _Session) -> None:
        events: list[proto.ClientEvent] = []
        while s.name in self.sessions:
            try:
                frame = s.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if s.taken_over and self._of_old_attachment(s, frame):
                self.counters["stale_dropped"] += 1
                continue
            try:
                events += s.conn.receive(frame, time.monotonic())
            except proto.RemoteProtocolError as e:
                self._say(f"pktipc gateway: broker broke the protocol: {e}")
                events = [proto.Evicted("protocol", f"the broker broke the protocol: {e}")]
                break
        # An eviction voids the batches announced before it.
        events.sort(key=lambda ev: not isinstance(ev, proto.Evicted))
        self._local_events(s, events, time.monotonic())

    @staticmethod
    def _of_old_attachment(s: _Session, frame: bytes) -> bool:
        """Whether a message that comes after a take-over, before the new
        attachment's WELCOME, is one the broker sent the old attachment
        before it read the DETACH (on the same connection, in order): BATCH,
        GAP, HEARTBEAT, END-OF-STREAM, EVICT, a STATS reply, an ERROR about
        a RELEASE, or the DETACH's own ERROR if the old attachment was gone
        already. Dropped: the broker, resuming the place, sends again what
        the old attachment held and tells again GAPs and END-OF-STREAM. The
        new attachment's WELCOME, or the ERROR refusing its HELLO, ends it."""
        try:
            mtype, f = proto.decode(frame, proto.MAX_BROKER_FRAME)
        except proto.RemoteProtocolError:
            return False        # the connection's receive tells it
        if mtype == "welcome" or (mtype == "error" and f["code"] not in OLD_ERRORS):
            s.taken_over = False
            return False
        return True

    def _local_events(self, s: _Session, events: list[proto.ClientEvent], now: float) -> None:
        for ev in events:
            if s.name not in self.sessions:
                return
            peer = s.peer
            if isinstance(ev, proto.Welcomed):
                self._welcomed(s, ev, now)
            elif isinstance(ev, proto.RequestRefused):
                if peer is not None:
                    self._refuse(peer, now, ev.code, ev.text)
                if s.conn.state is proto.State.CLOSED:      # its HELLO was refused
                    self._end(s)
            elif isinstance(ev, proto.Evicted):
                if peer is not None and peer in self.conn.peers:
                    self._forget_peer_evicted(s, ev, now)
                self._end(s)
            elif isinstance(ev, proto.ConnectionLost):
                self._say(f"pktipc gateway: the broker {ev.why}")
                self._forget_peer(s)      # its next message is told not-attached: it retries
                self._end(s)
            else:
                if s.backlog is not None and peer is not None and self.conn.heard(peer):
                    s.backlog = None        # the client has it all
                if s.backlog is not None and isinstance(
                        ev, proto.BatchAnnounced | proto.GapReported | proto.StreamEnded):
                    s.backlog.append(ev)
                if peer is not None and peer in self.conn.peers:
                    self._deliver(s, peer, ev, now)

    def _deliver(self, s: _Session, peer: bytes, ev: proto.ClientEvent, now: float) -> None:
        if isinstance(ev, proto.BatchAnnounced):
            self._forward(s, peer, ev, now)
        elif isinstance(ev, proto.GapReported):
            self.conn.send_gap(peer, now, ev.start, ev.end)
        elif isinstance(ev, proto.StreamEnded):
            self.conn.send_eos(peer, now, ev.error)
        elif isinstance(ev, proto.StatsReceived):
            self.conn.send_stats(peer, now, {**ev.stats, "gateway": self.stats()})

    def _forget_peer_evicted(self, s: _Session, ev: proto.Evicted, now: float) -> None:
        assert s.peer is not None
        self.conn.evict(s.peer, now, ev.code, ev.text)
        self._flush()
        self._forget_peer(s)

    def _welcomed(self, s: _Session, w: proto.Welcomed, now: float) -> None:
        try:
            s.mapping = self._map(w, s)
        except PktipcError as e:
            s.conn.failed(now)
            if s.peer is not None:
                self._refuse(s.peer, now, "not-running", str(e))
            self._end(s)
            return
        s.conn.mapped(now)
        self._flush_local(s)
        if s.peer is None:
            s.conn.detach(now)
            self._end(s)
            return
        self.counters["attachments"] += 1
        s.welcome = w
        s.backlog = []
        self._accept(s, now)

    def _accept(self, s: _Session, now: float) -> None:
        """REMOTE_WELCOME to the client, of the attachment WELCOME made."""
        w, m = s.welcome, s.mapping
        assert w is not None and m is not None and s.peer is not None
        table = bytes(ffi.buffer(m.seg.iface(0), IFACE_SIZE * len(m.seg.ifaces())))
        self.conn.accept(s.peer, now, slot=w.slot, credit=w.credit, policy=w.policy,
                         group=w.group, balance=w.balance, epoch=w.epoch, layout=LAYOUT_VERSION,
                         ifaces=table)

    def _map(self, w: proto.Welcomed, s: _Session) -> _Mapping:
        """The broker's segment, mapped once for every session; a new broker
        (epoch) is watched through a pidfd, to see it die at once."""
        m = self._mapping
        if m is not None and m.epoch == w.epoch:
            return m
        m = _Mapping(w, self.opts.server, getattr(s, "owner", None))
        if self._mapping is not None:
            self._mapping.close()
        if self._broker_pidfd is not None:
            os.close(self._broker_pidfd)
            self._broker_pidfd = None
        self._mapping = m
        try:
            self._broker_pidfd = os.pidfd_open(int(m.seg.header.broker_pid))
        except OSError:
            pass            # not ours to see (another pid namespace): liveness will do
        return m

    def _broker_gone(self, why: str) -> None:
        self._say(f"pktipc gateway: {why}; its clients are told when they next speak")
        assert self._broker_pidfd is not None
        os.close(self._broker_pidfd)
        self._broker_pidfd = None
        for s in list(self.sessions.values()):
            self._forget_peer(s)
            self._end(s)

    def _forward(self, s: _Session, peer: bytes, b: proto.BatchAnnounced, now: float) -> None:
        """The client's packets of a BATCH, in one REMOTE_BATCH."""
        m = s.mapping
        assert m is not None
        seg = m.seg
        if b.slab >= m.slab_count or b.n * PKT_DTYPE.itemsize > m.slab_size:
            return self._broken(s, now, b)
        rec = seg.batch_rec(b.slab)
        if (rec.gen, rec.seq, rec.count, rec.slab) != (b.gen, b.seq, b.n, b.slab):
            return self._broken(s, now, b)
        desc = seg.descriptors(b.slab, b.n).copy()
        if seg.pkts_check(b.slab, desc) < b.n:
            return self._broken(s, now, b)
        mask = None
        data: Any
        shared = bool(b.members) or b.mask is not None
        ends = desc["data_off"].astype(np.int64) + desc["caplen"]
        if shared or int(ends.max(initial=0)) > m.slab_size:
            # The client's share, or frames in the segment's frame area
            # (AF_XDP's UMEM): gathered, in C.
            idx = (select(desc, b.mask, b.members, s.conn.slot or 0) if shared
                   else np.arange(b.n, dtype=np.uint32))
            out = np.empty(len(idx), dtype=PKT_DTYPE)
            size = int(desc["caplen"][idx].sum())
            data = bytearray(size)
            got = lib.pkb_gather(seg.slab_ptr(b.slab), ffi.from_buffer("struct pktipc_pkt[]", desc),
                                 ffi.from_buffer("uint32_t[]", idx), len(idx),
                                 ffi.from_buffer(data), size,
                                 ffi.from_buffer("struct pktipc_pkt[]", out))
            assert got == size
            if shared:
                bits = np.zeros(b.n, dtype=bool)
                bits[idx] = True
                mask = np.packbits(bits, bitorder="little").tobytes()
            desc = out
        else:
            base = m.slab_base(b.slab)
            low = int(desc["data_off"].min())
            data = m.view[base + low : base + m.slab_size]
            desc["data_off"] -= low
        if not len(desc):
            if s.backlog is not None and b in s.backlog:
                s.backlog.remove(b)         # nothing of it for the client: given back once
            s.conn.release(now, [b.seq])
            self._flush_local(s)
            return None
        self.conn.send_remote_batch(peer, now, b.seq, b.n, len(desc), mask, desc.tobytes(), data)
        s.batches += 1
        s.packets += len(desc)
        s.bytes += len(data)
        self.counters["batches"] += 1
        self.counters["packets"] += len(desc)
        self.counters["bytes"] += len(data)
        return None

    def _broken(self, s: _Session, now: float, b: proto.BatchAnnounced) -> None:
        why = f"batch {b.seq} does not match the segment"
        self._say(f"pktipc gateway: broker broke the protocol: {why}")
        if s.peer is not None and s.peer in self.conn.peers:
            self._forget_peer_evicted(s, proto.Evicted("protocol", why), now)
        s.conn.bye(now)
        self._end(s)

    # -- STATS of peers not attached --
    def _stranger_stats(self, peer: bytes, now: float) -> None:
        if self._stats_sock is None:
            try:
                _check_socket(self.opts.server, ipc_path(self.endpoint))
            except PktipcError as e:
                self._refuse(peer, now, "not-running", f"{e} (on the gateway's host)")
                return
            self._stats_sock = self.ctx.socket(zmq.DEALER)
            self._stats_sock.setsockopt(zmq.LINGER, 0)
            self._stats_sock.connect(self.endpoint)
            self._stats_conn = proto.ClientConnection()
        assert self._stats_conn is not None
        self._stats_waiting.append(peer)
        self._stats_conn.request_stats(now)
        for frame in self._stats_conn.frames_to_send():
            self._stats_sock.send(frame, zmq.NOBLOCK)

    def _stats_replies(self) -> None:
        assert self._stats_sock is not None and self._stats_conn is not None
        while True:
            try:
                frame = self._stats_sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            try:
                events = self._stats_conn.receive(frame, now)
            except proto.RemoteProtocolError:
                continue
            for ev in events:
                if isinstance(ev, proto.StatsReceived) and self._stats_waiting:
                    self.conn.send_stats(self._stats_waiting.popleft(), now,
                                         {**ev.stats, "gateway": self.stats()})

    # -- sending --
    def _flush(self) -> None:
        gone: list[bytes] = []
        for peer, frame, payload in self.conn.messages_to_send():
            s = self.by_peer.get(peer)
            try:
                if payload:
                    zero_copy = len(payload[1]) >= ZERO_COPY
                    tracker = self.router.send_multipart([peer, frame, *payload], zmq.NOBLOCK,
                                                         copy=not zero_copy, track=zero_copy)
                    if tracker is not None and s is not None:
                        s.unsent[_seq_of(frame)] = tracker
                else:
                    self.router.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.Again:
                if s is not None:
                    self._cut(peer)
                    self._lose(s, time.monotonic(), "it does not read its messages")
            except zmq.ZMQError:
                if peer not in gone:
                    gone.append(peer)
        if not gone:
            return
        # The peer's connection is gone, but what it sent before it went
        # (its last RELEASEs, its BYE) may wait unread: libzmq takes a
        # connection away from sending at once, from receiving once what came
        # on it is read. Read first: a client that said BYE is not lost (its
        # DETACH would hand the batches it released to the rest of its group).
        for _ in range(16):
            if self._from_remotes():
                break
        for peer in gone:
            self.fds.pop(peer, None)
            s = self.by_peer.get(peer)
            if s is None:
                continue
            if s.backlog is not None and not self.conn.heard(peer) and \
                    s.conn.state in (proto.State.ATTACHED, proto.State.ENDED):
                self._orphan(s, time.monotonic())
            else:
                self._lose(s, time.monotonic(), "its connection is gone")
        self._flush()       # what was read may have queued more

    def stats(self) -> dict[str, Any]:
        keys = self._keys
        return {
            "listen": self.listening, "pid": os.getpid(), "curve": not self.opts.insecure,
            **self.counters,
            "keys_refused": keys.refused if keys is not None else 0,
            "refused": dict(self.refused),
            "clients": [{"name": s.name, "key": s.key, "attached": s.peer is not None,
                         "batches": s.batches, "packets": s.packets, "bytes": s.bytes}
                        for s in self.sessions.values()],
        }


def _seq_of(frame: bytes) -> int:
    """The seq of a REMOTE_BATCH frame this gateway encoded."""
    return int(proto.decode(frame)[1]["seq"])
