"""The broker's loop: a source into slabs, slabs to clients.

The bookkeeping is the Dispatcher's (dispatch.py), the protocol the
BrokerConnection's (_protocol.py), the footing in the OS runtime.py's, the
ZeroMQ socket control.py's. This file wires them together and keeps time.
"""

from __future__ import annotations

import math
import os
import pwd
import select
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, TextIO

import numpy as np
import posix_ipc
import zmq

from .. import _protocol as proto
from .._errors import PermissionDenied
from .._layout import Geometry, Segment
from .._paths import check_name, control_endpoint, runtime_dir, segment_name
from .._shm import ffi, lib
from . import runtime, service
from .control import MAX_MESSAGE, ControlSocket, Sent
from .dispatch import ClientState, Dispatcher, SlabPool
from .files import FileSource
from .live import LiveOptions, LiveSource
from .relay import RelayOptions, RemoteSource
from .sources import Source, Status
from .tx import DEFAULT_FRAMES, Transmitter, TxRefused, allow_rule
from .xdp import XdpOptions, XdpSource

DEFAULT_SLAB_SIZE = 1 << 20
DEFAULT_SLAB_COUNT = 64
DEFAULT_CREDIT = 8
MAX_CLIENTS = 16
MAX_RECORDINGS = 4
EVICT_BACKOFF = 10.0            # seconds an evicted client's name is refused
MAX_CONTROL_PER_TURN = 512      # control messages read before the loop goes on
# Reading what an unreachable peer sent before it went (see _flush) takes at
# most this many turns' worth of messages; those of the other peers come
# between its own, a fair share each, and each peer has at most RECV_HWM queued.
DRAIN_TURNS = 16
STOP_WAIT = 1.0                 # stopping, seconds to wait for welcomed clients to map


@dataclass
class ServeOptions:
    name: str
    files: list[str] = field(default_factory=list)
    live: LiveOptions | None = None     # capture from interfaces instead of files
    relay: RelayOptions | None = None   # relay a remote broker instead
    xdp: XdpOptions | None = None       # capture from an interface through AF_XDP
    loops: int = 1
    speed: float | None = None          # None: as fast as the slowest client allows
    wait_clients: int | None = None     # None: 1 for files, 0 for interfaces
    linger: bool = False
    slab_size: int = DEFAULT_SLAB_SIZE
    slab_count: int = DEFAULT_SLAB_COUNT
    credit: int = DEFAULT_CREDIT
    max_clients: int = MAX_CLIENTS
    max_recordings: int = MAX_RECORDINGS    # pktipc record: at most this many at once
    heartbeat: float = 1.0
    liveness: float = 30.0
    lease: float | None = 30.0          # seconds a client may hold a batch; None: for ever
    unix_group: str | None = None       # clients of this Unix group are admitted too
    grace: float = 0.0                  # seconds a lost client's place is kept for it
    user: str | None = None             # drop privileges to this user once capturing
    tunnel_hash: bool = False           # hash tunnelled packets on their inner flow
    allow_block: list[str] = field(default_factory=list)  # live: who may ask for block
    evict_backoff: float = EVICT_BACKOFF
    max_connections: int | None = None  # None: 4 per client, and 64 more
    control_rate: float = proto.CONTROL_RATE    # messages a second a peer may send
    tx: list[str] = field(default_factory=list)    # interfaces sent on ("*": every one)
    allow_tx: list[str] = field(default_factory=list)  # users who may send, beyond ours
    tx_frames: int = DEFAULT_FRAMES                 # frames in each TX ring
    tx_qdisc_bypass: bool = False


def block_rule(entries: list[str]) -> Callable[[str, int | None], bool]:
    """Who may ask for `block` on a live broker: client names (shell-style
    patterns, e.g. suricata-*) and users ("user:NAME" or "user:UID", the
    client's uid as the kernel gives it)."""
    names, uids = [], set()
    for e in entries:
        if not e.startswith("user:"):
            check_name("client", e.replace("*", "x").replace("?", "x"))
            names.append(e)
            continue
        who = e[len("user:"):]
        try:
            uids.add(int(who) if who.isdigit() else pwd.getpwnam(who).pw_uid)
        except KeyError:
            raise ValueError(f"--allow-block {e}: no such user") from None

    def may_block(name: str, uid: int | None) -> bool:
        return uid in uids or any(fnmatchcase(name, n) for n in names)
    return may_block


def _check(opts: ServeOptions) -> None:
    check_name("broker", opts.name)
    if opts.wait_clients is not None and opts.wait_clients < 0:
        raise ValueError("--wait-clients must be 0 or more")
    if opts.speed is not None and not (math.isfinite(opts.speed) and 1e-6 <= opts.speed <= 1e6):
        raise ValueError("--speed must be between 1e-6 and 1e6")
    if opts.loops < 0:
        raise ValueError("--loop must be 0 (forever) or more")
    if opts.lease is not None and not (math.isfinite(opts.lease) and opts.lease > 0):
        raise ValueError("--lease must be a positive number of seconds (0: never)")
    if not (math.isfinite(opts.grace) and opts.grace >= 0):
        raise ValueError("--grace must be 0 or more seconds")
    if not 0 < opts.heartbeat < opts.liveness:
        raise ValueError("--heartbeat must be positive and below --liveness")
    if not 1 <= opts.max_clients <= proto.MAX_MEMBERS:
        raise ValueError(f"--max-clients must be between 1 and {proto.MAX_MEMBERS}")
    if opts.max_recordings < 0:
        raise ValueError("--max-recordings must be 0 or more")
    if not 1 <= opts.credit <= proto.MAX_CREDIT:
        raise ValueError(f"--credit must be between 1 and {proto.MAX_CREDIT}")
    if not (math.isfinite(opts.control_rate) and opts.control_rate >= 1):
        raise ValueError("--control-rate must be 1 or more messages a second")
    if opts.max_connections is not None and opts.max_connections < 1:
        raise ValueError("--max-connections must be 1 or more")
    if not (math.isfinite(opts.evict_backoff) and opts.evict_backoff >= 0):
        raise ValueError("--evict-backoff must be 0 or more seconds")
    if opts.tx and opts.live is None:
        raise ValueError("--tx sends on the interfaces the broker captures on (-i); a broker "
                         "serving files has none, and one capturing with --xdp does not send")
    if opts.live is not None and opts.slab_size < opts.live.block_size:
        raise ValueError("--slab-size must be at least --block-size, so that a block always "
                         "fits in a slab")
    if opts.xdp is not None and opts.user is not None:
        raise ValueError("--user: --xdp binds its sockets once the segment exists, which "
                         "needs the privileges --user would have dropped; run as a user with "
                         "CAP_NET_RAW, CAP_NET_ADMIN and CAP_BPF instead")


class Broker:
    def __init__(self, opts: ServeOptions, log: TextIO = sys.stderr) -> None:
        _check(opts)
        self.opts = opts
        self.log = log
        try:
            self.user = pwd.getpwnam(opts.user) if opts.user else None
        except KeyError:
            raise ValueError(f"--user {opts.user}: no such user") from None
        self.gid = runtime.group_id(opts.unix_group) if opts.unix_group is not None else None
        self.may_block = block_rule(opts.allow_block)
        self.source: Source = (LiveSource(opts.live) if opts.live is not None
                               else XdpSource(opts.xdp) if opts.xdp is not None
                               else RemoteSource(opts.relay) if opts.relay is not None
                               else FileSource(opts.files, opts.loops, opts.speed))
        self.ifaces = self.source.ifaces
        try:
            self.geometry = Geometry(opts.slab_size, opts.slab_count, len(self.ifaces),
                                     self.source.frame_size, self.source.frame_count)
        except ValueError:
            self.source.close()
            raise
        self._hash_opts = lib.PKB_HASH_TUNNELS if opts.tunnel_hash else 0
        self.tx: Transmitter | None = None
        if opts.tx:
            assert opts.live is not None
            try:
                self.tx = Transmitter(opts.live.interfaces, opts.tx, opts.tx_frames,
                                      opts.tx_qdisc_bypass, allow_rule(opts.allow_tx))
            except BaseException:
                self.source.close()
                raise
        self.tx_refused: Counter[str] = Counter()   # TX_OPEN and TX refused, by code
        self.wait_clients = (opts.wait_clients if opts.wait_clients is not None
                             else self.source.default_wait_clients)
        self.endpoint = control_endpoint(opts.name)
        self.epoch = time.time_ns()
        self.shm_name = segment_name(opts.name, self.epoch)
        self.stopping = False
        self._stop_by = 0.0         # stopping: when to stop waiting for clients to map
        self.exit_status = 0
        self._cleanup: list[Any] = [self.source.close]
        if self.tx is not None:
            self._cleanup.append(self.tx.close)
        self._wake = 0.0            # produce again then, not before (paced files, HOLD)
        self._started = self.wait_clients == 0
        self._fill = ffi.new("struct pkb_fill *")
        self._open_slab: int | None = None
        self._starved = False       # no slab for what the source holds
        self._fds_polled: list[Any] = []
        self._next_stats = 0.0
        self._kernel_drops = 0      # as of the previous batch, for its record
        self._stats: dict[str, Any] | None = None     # answer to the STATS of this turn
        self.max_clients = opts.max_clients
        self.evictions = 0          # clients detached by the broker, not by their BYE
        self.connections_dropped = 0    # by libzmq, under a client that lives

    # -- set-up and teardown --
    def _drop_privileges(self, pw: pwd.struct_passwd) -> None:
        """The capture sockets are open: the rest runs as `pw`. The runtime
        directory depends on the uid, so it is chosen (and made for `pw`)
        before the switch."""
        rdir = runtime_dir()
        os.environ["PKTIPC_RUNTIME_DIR"] = str(rdir)
        runtime.make_runtime_dir(rdir, owner=pw)
        try:
            os.initgroups(pw.pw_name, pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
        except PermissionError:
            raise PermissionDenied(f"--user {pw.pw_name}: only root can switch to another "
                                   "user") from None
        if not os.access(rdir, os.W_OK | os.X_OK):
            raise PermissionDenied(f"--user {pw.pw_name}: that user cannot write in the "
                                   f"runtime directory {rdir} (give it the directory, or "
                                   "set PKTIPC_RUNTIME_DIR)")

    def _set_up(self) -> None:
        if self.user is not None:
            self._drop_privileges(self.user)
        dirfd = runtime.open_runtime_dir(runtime_dir(), self.gid)
        self._cleanup.append(lambda: os.close(dirfd))
        lock = runtime.Lock(dirfd, self.opts.name)
        self._cleanup.append(lock.release)
        runtime.sweep_stale_segments(self.opts.name, self.log)
        self._limit_files()
        mm = runtime.create_segment(self.shm_name, self.geometry.total_size, self.gid)
        self._cleanup.append(lambda: posix_ipc.unlink_shared_memory(self.shm_name))
        self.seg = Segment(mm, writable=True)

        def unmap() -> None:
            del self.seg
            mm.close()
        self._cleanup.append(unmap)
        self.seg.init(self.geometry, name=self.opts.name, epoch=self.epoch, ifaces=self.ifaces)
        self.source.bind(self.seg)
        self.control = ControlSocket(
            self.endpoint, group_access=self.gid is not None,
            max_connections=self.max_connections,
            # Room for every batch a client may hold, twice, and the rest.
            send_hwm=max(1024, 2 * self.geometry.slab_count + 64))
        self._cleanup.append(self.control.close)

    def _limit_files(self) -> None:
        """Running out of descriptors would abort libzmq: the limit is raised
        as far as it goes, and clients and connections are capped below it
        (the rest refused, and counted)."""
        limit = runtime.raise_fd_limit()
        spare = limit - 64 - len(self.ifaces)     # the broker's own, and slack
        self.max_clients = max(1, min(self.opts.max_clients, spare // 3))
        if self.max_clients < self.opts.max_clients:
            print(f"pktipc: at most {self.max_clients} clients: the limit on open files is "
                  f"{limit}", file=self.log, flush=True)
        want = self.opts.max_connections or 4 * self.max_clients + 64
        self.max_connections = max(1, min(want, spare - self.max_clients))

    def close(self) -> None:
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except Exception as e:  # keep cleaning up the rest
                print(f"pktipc: cleanup: {e}", file=self.log)

    def serve(self) -> int:
        # Our handlers stay until cleanup is over: a SIGTERM arriving while
        # the sockets close must not cut the removal of the segment short.
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._start()
            self._loop()
            return self.exit_status
        finally:
            self.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _start(self) -> None:
        """Sets up the segment, the control socket and the bookkeeping: the
        broker is then ready to run its loop."""
        self._set_up()
        self.conn = proto.BrokerConnection(heartbeat=self.opts.heartbeat,
                                           liveness=self.opts.liveness,
                                           rate=self.opts.control_rate)
        self.pool = SlabPool(self.geometry.slab_count, freed=self.source.recycle)
        self.disp = Dispatcher(self.conn, self.pool,
                               default_policy=self.source.default_policy,
                               default_credit=self.opts.credit,
                               max_clients=self.max_clients, lease=self.opts.lease,
                               descriptors=self._descriptors,
                               may_block=(self.may_block
                                          if self.source.default_policy == "drop" else None),
                               backoff=self.opts.evict_backoff,
                               max_recordings=self.opts.max_recordings)
        self.seg.header.state = lib.PKTIPC_STATE_RUNNING
        service.ready(self.log, f"serving clients on {self.endpoint}")
        wait = (f", waiting for {self.wait_clients} client(s)"
                if self.wait_clients else "")
        print(f"pktipc: {self.source.describe()} as {self.opts.name!r} on "
              f"{self.endpoint}{wait}", file=self.log, flush=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if not self.stopping:
            self._stop_by = time.monotonic() + STOP_WAIT
        self.stopping = True

    # -- the loop --
    def _loop(self) -> None:
        self.poller = poller = zmq.Poller()
        for sock in self.control.sockets:
            poller.register(sock, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if self.stopping and not self.disp.ended:
                self._end(now, "broker stopped", stopped=True)
            busy = self._produce(now) if self._can_produce(now) else False
            self._flush()
            if self.disp.finished and not self.opts.linger:
                break
            if self.stopping and self.disp.ended and (
                    now >= self._stop_by or all(map(self.disp.mapped, self.disp.clients.values()))):
                break
            timeout = 0.0 if busy else self._timeout(now)
            self._poll_fds(self._reading() and not self._starved and now >= self._wake)
            ready = dict(poller.poll(int(timeout * 1000 + 0.999)))
            now = time.monotonic()
            if self.control.monitor in ready:
                self.control.handle_monitor()
            if self.control.zap in ready:
                self.control.handle_zap(now)
            if self.control.sock in ready:
                self._receive_all()
            now = time.monotonic()
            self._send_frames(now)
            self._fd_events(ready, now)
            for c in [c for c in self.disp.clients.values() if c.pidfd in ready]:
                self._drop(c, now, "its process exited", resume=True)
            timer = self.conn.get_timer()
            if timer is not None and timer <= now:
                for ev in self.conn.handle_timer(now):
                    self._handle(ev, now)
            for c in self.disp.expired(now):
                self._drop(c, now, f"it held a batch for more than {self.opts.lease:g} s",
                           code="lease")
                self.disp.evicted(c, now)
            for c in self.disp.detached_before(now - self.opts.grace):
                print(f"pktipc: client {c.name!r} did not come back within "
                      f"{self.opts.grace:g} s", file=self.log, flush=True)
                self.disp.remove(c, now)
            self._sync_counters()
        self._flush()

    def _poll_fds(self, on: bool) -> None:
        """A source's fds are polled only while a slab can take what they
        announce: a ready block that cannot be read would wake the loop for
        nothing. Meanwhile the kernel holds packets, then drops them (counted
        as kernel drops)."""
        want = list(self.source.fds) if on else []
        if want == self._fds_polled:
            return
        for fd in self._fds_polled:
            self.poller.unregister(fd)
        for fd in want:
            self.poller.register(fd, zmq.POLLIN | zmq.POLLERR)
        self._fds_polled = want

    def _fd_events(self, ready: dict[Any, int], now: float) -> None:
        for i, fd in enumerate(self.source.fds):
            if ready.get(fd, 0) & zmq.POLLERR:
                # Reading the error clears it; the kernel resumes the capture
                # by itself if the interface comes back up.
                print(f"pktipc: {self.source.error(i)}", file=self.log, flush=True)
        if now >= self._next_stats:
            self._read_counters()

    def _read_counters(self) -> None:
        """Brings the interfaces' kernel counters up to date."""
        self._next_stats = time.monotonic() + 0.5
        self.source.read_counters([self.seg.iface(i) for i in range(len(self.ifaces))])
        if self.tx is not None:
            self.tx.refresh()

    def _timeout(self, now: float) -> float:
        t = 0.2   # upper bound, so signals are noticed promptly
        detached = [c.detached_at + self.opts.grace for c in self.disp.clients.values()
                    if c.peer is None]
        for timer in (self.conn.get_timer(), self.disp.lease_timer(), min(detached, default=None)):
            if timer is not None:
                t = min(t, timer - now)
        if self._wake > now and self._reading():
            t = min(t, self._wake - now)
        retry = self.tx.retry_in() if self.tx is not None else None
        if retry is not None:
            t = min(t, retry)
        return max(t, 0.0)

    def _reading(self) -> bool:
        # A file source pauses while nobody is attached, so nothing is
        # replayed to nobody; --wait-clients 0 asks for the replay regardless.
        return (self._started and not self.disp.ended
                and (bool(self.disp.clients) or self.wait_clients == 0
                     or not self.source.pauses_without_clients))

    def _can_produce(self, now: float) -> bool:
        return self._reading() and now >= self._wake

    def _receive_all(self) -> bool:
        """Reads at most MAX_CONTROL_PER_TURN messages; True when none is
        left to read."""
        self._stats = None
        for _ in range(MAX_CONTROL_PER_TURN):
            msg = self.control.receive()
            if msg is None:
                return True
            peer, frames, creds = msg
            now = time.monotonic()
            if len(frames) != 1:
                self.conn.refuse(peer, now, "malformed",
                                 f"expected one frame per message, got {len(frames)}")
                continue
            try:
                # Peers not attached share a budget per process.
                events = self.conn.receive(peer, frames[0], now,
                                           key=creds.pid if creds is not None else None)
            except proto.RemoteProtocolError:
                continue    # the ERROR reply is queued and counted
            for ev in events:
                if isinstance(ev, proto.HelloReceived) and creds is not None:
                    # Who it is, as the kernel says, not as it says.
                    ev = replace(ev, pid=creds.pid, uid=creds.uid)
                if isinstance(ev, proto.PeerFlooding):
                    self._cut_off(peer, now, "it sent more messages than it may",
                                  creds.pid if creds else None)
                else:
                    self._handle(ev, now)
        return False

    def _handle(self, ev: proto.BrokerEvent, now: float) -> None:
        d = self.disp
        if isinstance(ev, proto.HelloReceived):
            welcome = dict(shm=self.shm_name, epoch=self.epoch,
                           layout=lib.PKTIPC_LAYOUT_VERSION)
            c = d.hello(ev, now, welcome)
            if c is not None:
                self._watch(c)
                if not self._started:
                    self._started = len(d.clients) >= self.wait_clients
        elif isinstance(ev, proto.ReleaseReceived):
            c = d.by_peer.get(ev.peer)
            if c is not None:
                d.release(c, ev.seqs, now)
        elif isinstance(ev, proto.StatsRequested):
            if self._stats is None:
                self._stats = self.stats()
            self.conn.send_stats(ev.peer, now, self._stats)
        elif isinstance(ev, proto.ByeReceived):
            c = d.by_peer.get(ev.peer)
            if c is not None:
                self._drop(c, now, None)
        elif isinstance(ev, proto.DetachReceived):
            c = d.by_peer.get(ev.peer)
            if c is not None:      # a gateway's client whose remote end was lost
                kept = f", its place kept for {self.opts.grace:g} s" if self.opts.grace else ""
                print(f"pktipc: client {c.name!r} detached{kept}", file=self.log, flush=True)
                self._drop(c, now, None, resume=True)
        elif isinstance(ev, proto.PeerTimedOut):
            c = d.by_peer.get(ev.peer)
            if c is not None:      # the protocol has told it already
                self._drop(c, now, "nothing heard from it within the liveness", resume=True)
        elif isinstance(ev, proto.TxAreaOffered | proto.FramesSubmitted):
            self._tx_request(ev, now)

    def _tx_request(self, ev: proto.TxAreaOffered | proto.FramesSubmitted, now: float) -> None:
        c = self.disp.by_peer.get(ev.peer)
        if c is None:               # the protocol takes these from attached peers only
            return
        try:
            if self.tx is None:
                raise TxRefused("tx-refused", "this broker does not send (serve -i IFACE --tx)")
            if isinstance(ev, proto.TxAreaOffered):
                self.conn.send_tx_ready(ev.peer, now, self.tx.open(c.name, c.uid, ev.shm))
            else:
                self.tx.submit(c.name, ev.first, ev.n)
        except TxRefused as e:
            self.tx_refused[e.code] += 1
            self.conn.refuse(ev.peer, now, e.code, str(e))

    def _send_frames(self, now: float) -> None:
        """Copies what clients submitted into the TX rings; tells them."""
        if self.tx is None or not self.tx.busy:
            return
        done, faulted = self.tx.pump()
        for d in done:
            c = self.disp.clients.get(d.name)
            if c is not None and c.peer is not None:
                self.conn.send_tx_done(c.peer, now, d.upto, d.refused, d.error)
        for name, why in faulted:
            c = self.disp.clients.get(name)
            if c is not None and c.peer is not None:
                self._drop(c, now, why, code="tx-area")

    def _watch(self, c: ClientState) -> None:
        """A local client's death is seen at once through a pidfd, beside
        heartbeats; pids mean nothing across hosts, so only for ipc://."""
        if c.pid <= 0 or not self.endpoint.startswith("ipc://"):
            return
        try:
            c.pidfd = os.pidfd_open(c.pid)
        except (OSError, OverflowError):
            return          # no such process (or no pidfd): heartbeats will do
        self.poller.register(c.pidfd, zmq.POLLIN)

    def _drop(self, c: ClientState, now: float, why: str | None, code: str = "gone",
              resume: bool = False) -> None:
        """Detaches a client. `why` is logged, and told to the client if it is
        still attached and reachable. A client that was lost (not one that
        said BYE or broke its lease) keeps its place for --grace seconds;
        otherwise its slabs are taken back at once."""
        assert c.peer is not None
        keep = resume and self.opts.grace > 0
        if self.tx is not None:
            self.tx.forget(c.name)      # a TX area is its process's: a new one is offered
        if why is not None:
            self.evictions += 1     # detached by the broker, not by its own BYE
            what = f"detached, its place kept for {self.opts.grace:g} s" if keep else "dropped"
            print(f"pktipc: client {c.name!r} {what}: {why}", file=self.log, flush=True)
            if c.peer in self.conn.peers:
                self.conn.evict(c.peer, now, code, why)
        self.conn.forget(c.peer)
        self.control.forget(c.peer)
        if c.pidfd is not None:
            self.poller.unregister(c.pidfd)
            os.close(c.pidfd)
            c.pidfd = None
        if keep:
            self.disp.detach(c, now)
        else:
            self.disp.remove(c, now)

    def _cut_off(self, peer: bytes, now: float, why: str, pid: int | None) -> None:
        """Ends what a peer that floods or does not read costs: its client is
        evicted, its connection closed, and its process refused for the
        back-off."""
        cut = self.control.cut_off(peer)
        c = self.disp.by_peer.get(peer)
        if c is not None:
            self._drop(c, now, why, code="flood")
            self.disp.evicted(c, now)
            pid = c.pid
        elif cut:
            print(f"pktipc: a connection cut off: {why}", file=self.log, flush=True)
        self.conn.forget(peer)
        if pid:
            self.control.ban(pid, now + self.opts.evict_backoff)

    def _flush(self) -> None:
        gone: list[bytes] = []
        for peer, frame in self.conn.frames_to_send():
            sent = self.control.send(peer, frame)
            if sent is Sent.FULL:
                self._cut_off(peer, time.monotonic(), "it does not read its messages", None)
            elif sent is Sent.GONE and peer not in gone:
                gone.append(peer)
        if not gone:
            return
        # Unroutable (ROUTER_MANDATORY): the peer's connection is gone. What
        # it sent before it went is still there to read, though: libzmq
        # takes a connection away from sending at once, and from receiving
        # only once what came on it is read. A client that released its
        # batches, said BYE and closed is read first, so that its BYE, not
        # its silence, is what ends it: were it dropped as lost, the batches
        # it released (but which the broker had not read it release) would
        # go to the rest of its group, which would see its packets twice.
        for _ in range(DRAIN_TURNS):
            if self._receive_all():
                break
        for peer in gone:
            c = self.disp.by_peer.get(peer)
            self.conn.forget(peer)
            self.control.forget(peer)
            if c is not None:
                self._drop(c, time.monotonic(), self._gone_why(c), resume=True)
        self._flush()       # what was read, and the drops, may have queued more

    def _gone_why(self, c: ClientState) -> str:
        """Why a client's connection went, though it never said BYE: its
        process died, or (it lives) libzmq closed the connection under it,
        which it does, unheard, for a frame over the size limit or a broken
        ZMTP stream; that is counted."""
        if c.pidfd is None or select.select([c.pidfd], [], [], 0)[0]:
            return "unreachable"
        self.connections_dropped += 1
        return (f"its connection was closed under it, its process alive: a frame over "
                f"{MAX_MESSAGE >> 20} MiB, or a broken ZeroMQ stream")

    # -- producing --
    def _take_slab(self) -> int | None:
        if self._open_slab is not None:
            return self._open_slab
        slab = self.pool.take()
        if slab is None:
            slab = self.disp.reclaim()
        if slab is not None:
            lib.pkb_fill_begin(self._fill, self.seg.slab_ptr(slab),
                               self.geometry.slab_size, 0)
            self._fill.hash_opts = self._hash_opts
            self._fill.no_hash = not self.disp.needs_hash   # decided again at publish
            self._open_slab = slab
        return slab

    def _produce(self, now: float) -> bool:
        """Fills a slab from the source, published once full or once the
        source has nothing more for now; True if more may follow at once."""
        if self._take_slab() is None:
            self._starved = True        # every slab is held: wait for releases
            return False
        self._starved = False
        res = self.source.produce(self._fill, now)
        for i, n, nbytes in res.added:
            entry = self.seg.iface(i)
            entry.packets += n
            entry.bytes += nbytes
        while self.source.short and (slab := self.disp.reclaim()) is not None:
            self.pool.give_back(slab)       # what it named went back to the source
        if res.status is Status.MORE:
            return True
        if res.status is Status.HOLD:
            assert res.wake is not None
            self._wake = res.wake
            return False
        if self._fill.count:
            self._publish(now)
        if res.status is Status.END:
            self._end(now, res.error)
            return False
        if res.wake is not None:
            self._wake = res.wake
        return res.status is Status.FULL

    def _publish(self, now: float) -> None:
        slab, fill = self._open_slab, self._fill
        assert slab is not None
        self._open_slab = None
        if fill.no_hash and self.disp.needs_hash:
            lib.pkb_fill_hash(fill)     # a group balances by flow since the slab was begun
        seq, b = self.disp.publish(slab, fill.count, now)
        self._read_counters()
        total = sum(int(self.seg.iface(i).kernel_drops) for i in range(len(self.ifaces)))
        kernel_drops, self._kernel_drops = total - self._kernel_drops, total
        lib.pkb_batch_publish(self.seg.batch_rec(slab), slab, b.gen, seq, fill,
                              kernel_drops, 0)
        c = self.seg.header.counters
        c.packets += fill.count
        c.bytes += fill.bytes
        c.batches += 1

    def _end(self, now: float, error: str | None = None, *, stopped: bool = False) -> None:
        if self._open_slab is not None:
            if self._fill.count:
                self._publish(now)
            else:
                self.pool.give_back(self._open_slab)
                self._open_slab = None
        if stopped:
            print("pktipc: stopped", file=self.log, flush=True)
        elif error:
            print(f"pktipc: error: {error}", file=self.log, flush=True)
            self.exit_status = 1
        self.disp.end(now, error, abandon=stopped)
        self.seg.header.state = lib.PKTIPC_STATE_ENDED

    def _descriptors(self, slab: int, n: int) -> np.ndarray[Any, Any]:
        """A published slab's descriptors, with flow hashes: those of a slab
        filled without (PKTIPC_F_NO_HASH) are computed into a copy."""
        d = self.seg.descriptors(slab, n)
        if n and d["flags"][0] & lib.PKTIPC_F_NO_HASH:
            d = d.copy()
            lib.pkb_pkts_hash(self.seg.slab_ptr(slab), ffi.from_buffer("struct pktipc_pkt[]", d),
                              n, self._hash_opts)
        return d

    def _sync_counters(self) -> None:
        c = self.seg.header.counters
        c.clients = len(self.disp.clients)
        c.clients_total = self.disp.clients_total
        c.client_drops = self.disp.client_drops
        c.protocol_errors = self.conn.errors

    def stats(self) -> dict[str, Any]:
        self._read_counters()
        h = self.seg.header
        now = time.monotonic()
        return {
            "name": self.opts.name,
            "pid": os.getpid(),
            "epoch": self.epoch,
            "shm": self.shm_name,
            "endpoint": self.endpoint,
            "state": {0: "starting", 1: "running", 2: "ended"}.get(int(h.state), "?"),
            "uptime_s": round((time.time_ns() - h.start_time_ns) / 1e9, 3),
            "start_time_s": h.start_time_ns / 1e9,
            "counters": {**self.seg.counters(), "evictions": self.evictions},
            "slabs": {"size": self.geometry.slab_size, "count": self.geometry.slab_count,
                      "free": len(self.pool.free)},
            "sources": [
                {"name": s.name, "linktype": s.linktype, "snaplen": s.snaplen,
                 "packets": int(self.seg.iface(i).packets),
                 "bytes": int(self.seg.iface(i).bytes),
                 **self.source.stats(i, self.seg.iface(i)),
                 **({"tx": t} if self.tx and (t := self.tx.iface_stats(i)) else {})}
                for i, s in enumerate(self.ifaces)
            ],
            "clients": [
                {"name": c.name, "group": c.group, "slot": c.slot, "policy": c.policy,
                 "credit": c.credit, "pid": c.pid, "batches": c.batches, "packets": c.packets,
                 "drops": c.drops, "held": len(c.held), "queued": len(c.queue),
                 "attached": c.peer is not None, "gaps": c.gaps_sent,
                 "reconnections": c.reconnections,
                 # owed to it and not given back yet; how long it has held its oldest
                 "lag_packets": sum(s.packets for s in (*c.shares.values(),
                                                        *c.later.values())),
                 "lag_s": round(now - min(c.sent_at.values()), 3) if c.sent_at else 0.0,
                 **({"tx": t} if self.tx and (t := self.tx.client_stats(c.name)) else {})}
                for c in self.disp.clients.values()
            ],
            "groups": [
                {"name": name, "balance": g.balance, "shared": g.owner is None,
                 "members": [c.name for c in self.disp.members(name)],
                 "changes": g.changes,
                 "packets": sum(c.packets for c in self.disp.members(name))}
                for name, g in self.disp.groups.items()
            ],
            "refused": dict(self.disp.refused),
            "tx_refused": dict(self.tx_refused),
            "control": {
                "connections": self.control.connections,
                "max_connections": self.max_connections,
                "connections_refused": self.control.refused,
                "handshakes_failed": self.control.failed,
                "connections_cut": self.control.cut,
                "messages_over_budget": self.conn.dropped,
                "connections_dropped": self.connections_dropped,
                "accepts_deferred": self.control.accepts_deferred,
            },
        }
