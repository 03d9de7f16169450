"""The broker: sources into slabs, slabs to clients.

`Dispatcher` is the bookkeeping (who holds which slab, what each client is
owed, credit) with no I/O. `Broker` is the edge around it: the shared
segment, the ZeroMQ ROUTER socket, the sources, signals and the event loop.
"""

from __future__ import annotations

import bisect
import fcntl
import grp
import math
import mmap
import os
import pwd
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import posix_ipc
import zmq

from . import _protocol as proto
from . import _service
from ._errors import PermissionDenied, PktipcError, SourceError
from ._layout import Geometry, Iface, Segment, SlabPool, mask_of, select, share_counts
from ._live import LiveOptions, LiveSource
from ._paths import (
    check_name,
    control_endpoint,
    ipc_path,
    runtime_dir,
    segment_name,
    segment_prefix,
)
from ._shm import ffi, lib
from ._source import NO_LIMIT, FileSource

DEFAULT_SLAB_SIZE = 1 << 20
DEFAULT_SLAB_COUNT = 64
DEFAULT_CREDIT = 8
MAX_CLIENTS = 64


def _segment_pid(path: Path) -> int:
    """The broker pid recorded in a segment's header, 0 if unreadable."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return 0
    off = ffi.offsetof("struct pktipc_header", "broker_pid")
    return int.from_bytes(head[off : off + 4], "little") if len(head) == 64 else 0


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ValueError(f"--allow-group {group}: no such group") from None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Share:
    """The packets of one batch owed to one client: those set in `mask` (None:
    all) that `members`, if any, give to the client's slot. What a BATCH
    carries, plus how many packets that is."""

    packets: int
    members: tuple[int, ...] = ()
    mask: bytes | None = None


@dataclass
class ClientState:
    name: str
    peer: bytes | None                                  # None: detached, may resume
    group: str
    policy: str
    credit: int
    pid: int
    slot: int
    queue: deque[int] = field(default_factory=deque)   # published to it, not yet sent
    held: set[int] = field(default_factory=set)         # sent, not released
    shares: dict[int, Share] = field(default_factory=dict)  # of each seq queued or held
    later: dict[int, Share] = field(default_factory=dict)   # owed for a seq it holds
    sent_at: dict[int, float] = field(default_factory=dict)  # held seq -> when sent
    pidfd: int | None = None                            # local clients: death is readable
    detached_at: float = 0.0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # skipped, not yet told
    eos_sent: bool = False
    batches: int = 0
    packets: int = 0
    drops: int = 0
    gaps_sent: int = 0                                   # GAP messages


@dataclass
class Group:
    balance: str            # set by its first member
    last: int = -1          # round-robin: slot of the member given the last batch


def _add_gap(gaps: list[tuple[int, int]], start: int, end: int) -> None:
    """Inserts [start, end) into a sorted list of disjoint ranges, merging
    it with the ranges it touches."""
    gaps.append((start, end))
    gaps.sort()
    merged = [gaps[0]]
    for s, e in gaps[1:]:
        if s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(e, merged[-1][1]))
        else:
            merged.append((s, e))
    gaps[:] = merged


@dataclass
class Published:
    slab: int
    gen: int
    n: int


Descriptors = Callable[[int, int], "np.ndarray[Any, Any]"]


class Dispatcher:
    """Fan-out and balance bookkeeping: every group gets every batch, divided
    among its members (by flow or by batch); each client gets its shares in
    order, holding at most `credit` at once; a slab is free again when its
    last holder let go. `descriptors(slab, n)` reads a published slab's
    descriptors, for the flow hashes."""

    def __init__(self, conn: proto.BrokerConnection, pool: SlabPool, *,
                 default_policy: str, default_credit: int, max_clients: int,
                 lease: float | None = None, descriptors: Descriptors | None = None) -> None:
        self.conn = conn
        self.lease = lease
        self.pool = pool
        self.default_policy = default_policy
        self.default_credit = default_credit
        self.max_clients = max_clients
        self.descriptors = descriptors
        self.clients: dict[str, ClientState] = {}
        self.by_peer: dict[bytes, ClientState] = {}
        self.groups: dict[str, Group] = {}
        self.batches: dict[int, Published] = {}
        self.next_seq = 0
        self.ended = False
        self.end_error: str | None = None
        self.client_drops = 0
        self.clients_total = 0
        self.slots: dict[str, int] = {}     # a client that comes back gets its slot back

    # -- clients --
    def hello(self, ev: proto.Hello, now: float, welcome: dict[str, Any]) -> ClientState | None:
        group = ev.group or ev.name
        other = self.clients.get(ev.name)
        if other is not None and other.peer is not None:
            self.conn.refuse(ev.peer, now, "name-taken",
                             f"a client named {ev.name!r} is already attached (pid {other.pid})")
            return None
        if other is not None and other.group != group:
            self.conn.refuse(ev.peer, now, "group-mismatch",
                             f"{ev.name!r} is kept in group {other.group!r}, not {group!r}")
            return None
        g = self.groups.get(group)
        if g is not None and ev.balance not in (None, g.balance):
            self.conn.refuse(ev.peer, now, "balance-mismatch",
                             f"group {group!r} balances by {g.balance}, not {ev.balance}")
            return None
        if other is not None:
            return self._resume(other, ev, now, welcome)
        if len(self.clients) >= self.max_clients:
            self.conn.refuse(ev.peer, now, "too-many-clients",
                             f"this broker serves at most {self.max_clients} clients")
            return None
        policy = ev.policy or self.default_policy
        # Never more than the ring; a `drop` client, which the broker must
        # never wait for, at most half of it, so that what it holds never
        # leaves the others without a slab.
        most = len(self.pool.refs) if policy == "block" else max(1, len(self.pool.refs) // 2)
        c = ClientState(name=ev.name, peer=ev.peer, group=group,
                        policy=policy, credit=min(ev.credit or self.default_credit, most),
                        pid=ev.pid, slot=self.slots.setdefault(ev.name, len(self.slots)))
        g = self.groups.setdefault(group, Group(ev.balance or "flow"))
        self.clients_total += 1
        self.clients[c.name] = c
        self.by_peer[ev.peer] = c
        self.conn.accept(ev.peer, now, slot=c.slot, credit=c.credit, policy=c.policy,
                         group=group, balance=g.balance, **welcome)
        self.pump(c, now)
        return c

    def _resume(self, c: ClientState, ev: proto.Hello, now: float,
                welcome: dict[str, Any]) -> ClientState:
        """A detached client is back under its name: it continues where it
        stopped, from the batches it never released."""
        c.peer, c.pid = ev.peer, ev.pid
        self.by_peer[ev.peer] = c
        self.clients_total += 1
        self.conn.accept(c.peer, now, slot=c.slot, credit=c.credit, policy=c.policy,
                         group=c.group, balance=self.groups[c.group].balance, **welcome)
        self.pump(c, now)
        return c

    def members(self, group: str) -> list[ClientState]:
        """The members of a group, attached or kept for --grace, by slot."""
        return sorted((c for c in self.clients.values() if c.group == group),
                      key=lambda c: c.slot)

    def detach(self, c: ClientState, now: float) -> None:
        """Keeps a lost client's place: what it held and what it is owed wait
        for it under its name (see resume); `drop` clients may lose them."""
        assert c.peer is not None
        del self.by_peer[c.peer]
        c.peer = None
        c.detached_at = now
        held = sorted(c.held)
        c.held.clear()
        c.sent_at.clear()
        for seq in held:
            share = c.shares.pop(seq)
            self._enqueue(c, seq, share)
            later = c.later.pop(seq, None)
            if later is not None:
                self._owe(c, seq, later)
        if c.policy == "drop":
            self._pump_drop(now)

    def detached_before(self, when: float) -> list[ClientState]:
        return [c for c in self.clients.values() if c.peer is None and c.detached_at <= when]

    def remove(self, c: ClientState, now: float) -> None:
        """Forgets a client (bye, lost, evicted). What it held and what it was
        owed goes to the rest of its group, each packet to the member that
        owns its flow now; with nobody left, the slabs are let go."""
        owed = [(seq, c.shares[seq]) for seq in (*sorted(c.held), *c.queue)]
        owed += sorted(c.later.items())
        c.held.clear()
        c.sent_at.clear()
        c.queue.clear()
        c.shares.clear()
        c.later.clear()
        del self.clients[c.name]
        if c.peer is not None:
            del self.by_peer[c.peer]
        heirs = [m for m in self.members(c.group) if not m.eos_sent]
        for seq, share in owed:
            self._pass_on(c, seq, share, heirs)
        if not self.members(c.group):
            del self.groups[c.group]
        for m in heirs:
            self.pump(m, now)
        self._end_group(c.group, now)
        if c.policy == "drop":
            self._pump_drop(now)

    def _pass_on(self, gone: ClientState, seq: int, share: Share,
                 heirs: list[ClientState]) -> None:
        """Divides the share of a member that left among `heirs`."""
        if not heirs:
            self._unref(seq)
            return
        b = self.batches[seq]
        mask = share.mask
        if share.members:
            mask = mask_of(self._indexes(b, share, gone.slot), b.n)
        parts = self._divide(self.groups[gone.group], heirs, b, mask, share.packets)
        if not parts:
            self._unref(seq)
            return
        self.pool.ref(b.slab, len(parts) - 1)
        for m, part in parts:
            self._owe(m, seq, part)

    def release(self, c: ClientState, seqs: list[int], now: float) -> None:
        unknown = []
        for seq in seqs:
            if seq in c.held:
                c.held.remove(seq)
                del c.sent_at[seq]
                del c.shares[seq]
                self._unref(seq)
                later = c.later.pop(seq, None)
                if later is not None:
                    self._enqueue(c, seq, later)
            else:
                unknown.append(seq)     # never held, or released twice
        if unknown and c.peer is not None:
            self.conn.refuse(c.peer, now, "bad-release",
                             f"batches {unknown[:8]} are not held by {c.name!r}")
        self.pump(c, now)
        if c.policy == "drop":
            self._pump_drop(now)

    def _pump_drop(self, now: float) -> None:
        """What one `drop` client let go of may let another one on."""
        for c in self.clients.values():
            if c.policy == "drop":
                self.pump(c, now)

    def _unref(self, seq: int) -> None:
        if self.pool.unref(self.batches[seq].slab):
            del self.batches[seq]

    # -- shares --
    def _indexes(self, b: Published, share: Share, slot: int) -> np.ndarray[Any, Any]:
        if not share.members and share.mask is None:
            return np.arange(b.n, dtype=np.uint32)
        return select(self._descriptors(b), share.mask, share.members, slot)

    def _descriptors(self, b: Published) -> np.ndarray[Any, Any]:
        assert self.descriptors is not None, "flow balancing reads the descriptors"
        return self.descriptors(b.slab, b.n)

    def _divide(self, g: Group, members: list[ClientState], b: Published, mask: bytes | None,
                packets: int) -> list[tuple[ClientState, Share]]:
        """Shares of the packets set in `mask` (None: all of the batch) for
        `members` (by slot), none of them empty."""
        if len(members) == 1 or g.balance == "round-robin":
            # Round-robin: the next member after the last one served,
            # preferring those attached now, that do not need to catch up.
            ready = [m for m in members if m.peer is not None] or members
            m = next((m for m in ready if m.slot > g.last), ready[0])
            g.last = m.slot
            return [(m, Share(packets, (), mask))]
        slots = tuple(m.slot for m in members)
        counts = share_counts(self._descriptors(b), mask, slots)
        return [(m, Share(k, slots, mask)) for m, k in zip(members, counts, strict=True) if k]

    def _enqueue(self, c: ClientState, seq: int, share: Share) -> None:
        """Queues a share (holding one slab reference) in seq order."""
        c.shares[seq] = share
        if not c.queue or seq > c.queue[-1]:
            c.queue.append(seq)
        else:
            bisect.insort(c.queue, seq)

    def _owe(self, c: ClientState, seq: int, share: Share) -> None:
        """Adds a share (holding one slab reference) to what `c` is owed. A
        second share of a seq it holds waits until it gives that back; one
        of a seq queued for it is merged into the queued one."""
        if seq in c.held:
            if seq in c.later:
                c.later[seq] = self._merge(c, seq, c.later[seq], share)
            else:
                c.later[seq] = share
        elif seq in c.shares:
            c.shares[seq] = self._merge(c, seq, c.shares[seq], share)
        else:
            self._enqueue(c, seq, share)

    def _merge(self, c: ClientState, seq: int, a: Share, b: Share) -> Share:
        """One share for both (their reference counts as one)."""
        self._unref(seq)
        batch = self.batches[seq]
        both = np.union1d(self._indexes(batch, a, c.slot), self._indexes(batch, b, c.slot))
        return Share(len(both), (), mask_of(both, batch.n))

    # -- batches --
    def publish(self, slab: int, n: int, now: float) -> tuple[int, Published]:
        """Hands a filled slab to every group: (seq of its first packet, batch).
        BATCH messages are only queued: the caller writes the batch record
        before it flushes them."""
        seq = self.next_seq
        self.next_seq += n
        b = Published(slab, self.pool.gen[slab] + 1, n)
        owed: list[tuple[ClientState, Share]] = []
        for name, g in self.groups.items():
            owed += self._divide(g, self.members(name), b, None, n)
        gen = self.pool.publish(slab, holders=len(owed))
        assert gen == b.gen
        if owed:
            self.batches[seq] = b
        for c, share in owed:
            self._enqueue(c, seq, share)
            self.pump(c, now)
        return seq, b

    def pump(self, c: ClientState, now: float) -> None:
        """Sends what `c` is owed, as far as its credit allows."""
        if c.peer is None:
            return
        while c.queue and len(c.held) < c.credit and self._may_hold(c):
            seq = c.queue.popleft()
            b, share = self.batches[seq], c.shares[seq]
            self._tell_gaps(c, now, before=seq)
            self.conn.send_batch(c.peer, now, seq, b.slab, b.gen, b.n, share.members,
                                 share.mask)
            c.held.add(seq)
            c.sent_at[seq] = now
            c.batches += 1
            c.packets += share.packets
        if self.ended and not c.queue and not c.eos_sent:
            self._end_group(c.group, now)

    def _end_group(self, group: str, now: float) -> None:
        """End-of-stream goes to a group's members once none of them is owed
        anything: until then, one that leaves passes its shares on to them."""
        members = self.members(group)
        if not self.ended or any(m.queue or m.later for m in members):
            return
        for m in members:
            if m.peer is not None and not m.eos_sent:
                self._tell_gaps(m, now, before=self.next_seq)
                m.eos_sent = True
                self.conn.send_eos(m.peer, now, self.end_error)

    def _may_hold(self, c: ClientState) -> bool:
        """`drop` clients together hold at most half the ring, so that however
        many of them stall, the others always find a slab."""
        if c.policy != "drop":
            return True
        held = sum(len(x.held) for x in self.clients.values() if x.policy == "drop")
        return held < max(1, len(self.pool.refs) // 2)

    def _tell_gaps(self, c: ClientState, now: float, before: int) -> None:
        """Sends, in order, the gaps that come before seq `before`."""
        while c.gaps and c.gaps[0][0] < before and c.peer is not None:
            self.conn.send_gap(c.peer, now, *c.gaps.pop(0))
            c.gaps_sent += 1

    def end(self, now: float, error: str | None = None, *, abandon: bool = False) -> None:
        """No batch follows; each client is told end-of-stream after what it is
        owed, or at once with `abandon` (the broker is stopping)."""
        self.ended = True
        self.end_error = error
        for c in self.clients.values():
            if abandon:
                for seq in c.queue:
                    self._unref(seq)
                    del c.shares[seq]
                for seq in c.later:
                    self._unref(seq)
                c.queue.clear()
                c.later.clear()
        for c in list(self.clients.values()):
            self.pump(c, now)

    def reclaim(self) -> int | None:
        """Frees a slab by skipping the oldest batch that is owed, and not yet
        sent, only to `drop` clients; the skipped packets are counted against
        them alone, and each is told GAP where the batch would have been."""
        for seq in list(self.batches):     # oldest first
            holders = [c for c in self.clients.values() if seq in c.shares]
            if not holders or any(c.policy != "drop" or seq in c.held for c in holders):
                continue
            n = self.batches[seq].n
            for c in holders:
                c.queue.remove(seq)
                share = c.shares.pop(seq)
                c.drops += share.packets
                self.client_drops += share.packets
                _add_gap(c.gaps, seq, seq + n)
                self._unref(seq)
            return self.pool.take()
        return None

    def _lease_end(self, c: ClientState) -> float | None:
        """When the oldest batch `c` holds outlives its lease."""
        if self.lease is None or not c.sent_at:
            return None
        return min(c.sent_at.values()) + self.lease

    def lease_timer(self) -> float | None:
        ends = [e for e in map(self._lease_end, self.clients.values()) if e is not None]
        return min(ends, default=None)

    def expired(self, now: float) -> list[ClientState]:
        """Clients holding a batch past its lease: they are to be evicted."""
        return [c for c in self.clients.values()
                if (end := self._lease_end(c)) is not None and end <= now]

    @property
    def finished(self) -> bool:
        """Every client was sent everything and gave it all back (a client
        maps the segment after WELCOME: unlinking it earlier could beat it)."""
        return self.ended and all(c.eos_sent and not c.held for c in self.clients.values())


@dataclass
class ServeOptions:
    name: str
    files: list[str] = field(default_factory=list)
    live: LiveOptions | None = None     # capture from interfaces instead of files
    loops: int = 1
    speed: float | None = None          # None: as fast as the slowest client allows
    wait_clients: int | None = None     # None: 1 for files, 0 for interfaces
    linger: bool = False
    slab_size: int = DEFAULT_SLAB_SIZE
    slab_count: int = DEFAULT_SLAB_COUNT
    credit: int = DEFAULT_CREDIT
    max_clients: int = MAX_CLIENTS
    heartbeat: float = 1.0
    liveness: float = 30.0
    lease: float | None = 30.0          # seconds a client may hold a batch; None: for ever
    unix_group: str | None = None       # clients of this Unix group are admitted too
    grace: float = 0.0                  # seconds a lost client's place is kept for it
    user: str | None = None             # drop privileges to this user once capturing
    tunnel_hash: bool = False           # hash tunnelled packets on their inner flow


class Pacer:
    """Maps a file's timestamps onto the wall clock at `speed` times real time."""

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.base_ts: int | None = None
        self.base_wall = 0.0

    def reset(self) -> None:
        self.base_ts = None

    def limit(self, now: float, next_ts: int) -> int:
        if self.base_ts is None:
            self.base_ts, self.base_wall = next_ts, now
        return self.base_ts + int((now - self.base_wall) * self.speed * 1e9)

    def due(self, ts: int) -> float:
        assert self.base_ts is not None
        return self.base_wall + (ts - self.base_ts) / (self.speed * 1e9)


class Broker:
    def __init__(self, opts: ServeOptions, log: TextIO = sys.stderr) -> None:
        check_name("broker", opts.name)
        self.wait_clients: int = (opts.wait_clients if opts.wait_clients is not None
                                  else 0 if opts.live else 1)
        if self.wait_clients < 0:
            raise ValueError("--wait-clients must be 0 or more")
        if opts.speed is not None and not (math.isfinite(opts.speed) and
                                           1e-6 <= opts.speed <= 1e6):
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
        if not 1 <= opts.credit <= proto.MAX_CREDIT:
            raise ValueError(f"--credit must be between 1 and {proto.MAX_CREDIT}")
        self.opts = opts
        self.log = log
        try:
            self.user = pwd.getpwnam(opts.user) if opts.user else None
        except KeyError:
            raise ValueError(f"--user {opts.user}: no such user") from None
        self.geometry = Geometry(opts.slab_size, opts.slab_count,
                                 len(opts.live.interfaces) if opts.live else len(opts.files))
        self.live: LiveSource | None = None
        self.files: FileSource | None = None
        if opts.live is not None:
            if opts.slab_size < opts.live.block_size:
                raise ValueError("--slab-size must be at least --block-size, so that a "
                                 "block always fits in a slab")
            self.live = LiveSource(opts.live)
            self.ifaces = self.live.ifaces
            self._kernel_drops = 0      # as of the previous batch, for its record
        else:
            self.files = FileSource(opts.files, opts.loops)
            self.ifaces = self.files.ifaces
        self.endpoint = control_endpoint(opts.name)
        self.epoch = time.time_ns()
        self.shm_name = segment_name(opts.name, self.epoch)
        self.pacer = Pacer(opts.speed) if opts.speed else None
        self.gid = _group_id(opts.unix_group) if opts.unix_group is not None else None
        self.stopping = False
        self.exit_status = 0
        self._cleanup: list[Any] = []
        self._wake = 0.0            # paced source: when the next packet is due
        self._started = self.wait_clients == 0
        self._fill = ffi.new("struct pktipc_fill *")
        self._open_slab: int | None = None
        self._starved = False       # live: no slab for what the rings hold
        self._rings_polled = False
        self._next_stats = 0.0
        self.evictions = 0          # clients detached by the broker, not by their BYE
        self.reconnections: Counter[str] = Counter()   # HELLOs of names served before

    # -- setup and teardown --
    def _drop_privileges(self, pw: pwd.struct_passwd) -> None:
        """The capture sockets are open: the rest runs as `pw`. The runtime
        directory depends on the uid, so it is chosen before the switch."""
        rdir = runtime_dir()
        os.environ["PKTIPC_RUNTIME_DIR"] = str(rdir)
        if not rdir.exists():
            rdir.mkdir(mode=0o750, parents=True)
            os.chown(rdir, pw.pw_uid, pw.pw_gid)
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

    def _lock(self) -> None:
        rdir = runtime_dir()
        rdir.mkdir(mode=0o750, parents=True, exist_ok=True)
        if self.gid is not None and rdir.stat().st_gid == os.getegid():
            os.chown(rdir, -1, self.gid)      # so that the group can reach the socket
        lock_path = rdir / f"{self.opts.name}.lock"
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 32, 0).decode(errors="replace").strip()
                os.close(fd)
                raise PktipcError(f"a broker named {self.opts.name!r} is already running"
                                  + (f" (pid {other})" if other else "")) from None
            # The previous holder unlinks the file as it exits: a lock taken on
            # the unlinked file guards nothing, so take it again on the new one.
            try:
                if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)

        def unlock() -> None:
            lock_path.unlink(missing_ok=True)
            os.close(fd)
        self._cleanup.append(unlock)
        # Segments of this name whose broker is dead were left by a killed
        # broker. (Checking the pid, not only our lock, spares a live broker of
        # the same name under another runtime directory.)
        pattern = re.compile(re.escape(segment_prefix(self.opts.name)) + "[0-9a-f]{16}")
        for stale in Path("/dev/shm").iterdir():
            if pattern.fullmatch(stale.name) and not _alive(_segment_pid(stale)):
                stale.unlink(missing_ok=True)

    def _create_segment(self) -> None:
        g = self.geometry
        shm = posix_ipc.SharedMemory(self.shm_name, posix_ipc.O_CREX, mode=0o600,
                                     size=g.total_size)
        self._cleanup.append(shm.unlink)
        try:
            # Reserve the memory now: a sparse segment that cannot be backed
            # later would kill the broker with SIGBUS mid-run.
            os.posix_fallocate(shm.fd, 0, g.total_size)
            if self.gid is not None:
                os.fchown(shm.fd, -1, self.gid)
                os.fchmod(shm.fd, 0o640)     # the group maps it read-only, as anyone
            self._mm = mmap.mmap(shm.fd, g.total_size)
        except OSError as e:
            raise PktipcError(f"cannot allocate {g.total_size >> 20} MiB of shared memory "
                              f"in /dev/shm ({e.strerror}); lower --slabs or --slab-size"
                              ) from None
        finally:
            shm.close_fd()
        self._cleanup.append(self._close_map)
        self.seg = Segment(self._mm, writable=True)
        self.seg.init(g, name=self.opts.name, epoch=self.epoch, ifaces=self.ifaces)

    def _close_map(self) -> None:
        del self.seg
        self._mm.close()

    def _bind(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        self.sock.setsockopt(zmq.LINGER, 1000)
        path = ipc_path(self.endpoint)
        if path is not None:
            path.unlink(missing_ok=True)   # left by a dead broker; we hold the lock
        # The socket is born 0600: from its first instant it has its final mode
        # (or, with a group, a narrower one until chmod below).
        old = os.umask(0o177)
        try:
            self.sock.bind(self.endpoint)
        except zmq.ZMQError as e:
            raise PktipcError(f"cannot listen on {self.endpoint}: {e}") from None
        finally:
            os.umask(old)
        if path is not None:
            if self.gid is not None:
                os.chown(path, -1, self.gid)
            os.chmod(path, 0o600 if self.gid is None else 0o660)

        def close() -> None:
            self.sock.close()
            self.ctx.term()
            if path is not None:
                path.unlink(missing_ok=True)
        self._cleanup.append(close)

    def close(self) -> None:
        while self._cleanup:
            try:
                self._cleanup.pop()()
            except Exception as e:  # keep cleaning up the rest
                print(f"pktipc: cleanup: {e}", file=self.log)

    # -- the loop --
    def serve(self) -> int:
        # Our handlers stay until cleanup is over: a SIGTERM arriving while
        # the sockets close must not cut the removal of the segment short.
        old_handlers = {s: signal.signal(s, self._on_signal)
                        for s in (signal.SIGINT, signal.SIGTERM)}
        if self.live is not None:
            self._cleanup.append(self.live.close)
        try:
            if self.user is not None:
                self._drop_privileges(self.user)
            self._lock()
            self._create_segment()
            self._bind()
            self.conn = proto.BrokerConnection(heartbeat=self.opts.heartbeat,
                                               liveness=self.opts.liveness)
            self.pool = SlabPool(self.geometry.slab_count)
            self.disp = Dispatcher(self.conn, self.pool,
                                   default_policy="drop" if self.live else "block",
                                   default_credit=self.opts.credit,
                                   max_clients=self.opts.max_clients, lease=self.opts.lease,
                                   # late-bound: the segment must be closable
                                   descriptors=lambda slab, n: self.seg.descriptors(slab, n))
            self.seg.header.state = lib.PKTIPC_STATE_RUNNING
            _service.ready(self.log, f"serving clients on {self.endpoint}")
            self._say_hello()
            self._loop()
            return self.exit_status
        finally:
            self.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)

    def _say_hello(self) -> None:
        if self.live is not None:
            lo = self.live.opts
            what = "capturing on " + ", ".join(lo.interfaces)
            if lo.filter:
                what += f" (filter {lo.filter!r})"
            if lo.fanout is not None:
                what += f", fanout group {', '.join(map(str, self.live.fanout_ids))}"
        else:
            n = len(self.opts.files)
            what = "serving " + (self.opts.files[0] if n == 1 else f"{n} files")
        wait = (f", waiting for {self.wait_clients} client(s)"
                if self.wait_clients else "")
        print(f"pktipc: {what} as {self.opts.name!r} on {self.endpoint}{wait}",
              file=self.log, flush=True)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def _loop(self) -> None:
        self.poller = poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            now = time.monotonic()
            if self.stopping and not self.disp.ended:
                self._end(now, "broker stopped", stopped=True)
            busy = False
            if self._can_produce(now):
                busy = self._produce_live(now) if self.live else self._produce(now)
            self._flush()
            if self.disp.finished and not self.opts.linger:
                break
            if self.stopping and self.disp.ended:
                break
            timeout = 0.0 if busy else self._timeout(now)
            self._poll_rings(self._reading() and not self._starved)
            ready = dict(poller.poll(int(timeout * 1000 + 0.999)))
            if self.sock in ready:
                self._receive_all()
            now = time.monotonic()
            if self.live is not None:
                self._ring_events(ready, now)
            for c in [c for c in self.disp.clients.values() if c.pidfd in ready]:
                self._drop(c, now, "its process exited", resume=True)
            timer = self.conn.get_timer()
            if timer is not None and timer <= now:
                for ev in self.conn.handle_timer(now):
                    self._handle(ev, now)
            for c in self.disp.expired(now):
                self._drop(c, now, f"it held a batch for more than {self.opts.lease:g} s",
                           code="lease")
            for c in self.disp.detached_before(now - self.opts.grace):
                print(f"pktipc: client {c.name!r} did not come back within "
                      f"{self.opts.grace:g} s", file=self.log, flush=True)
                self.disp.remove(c, now)
            self._sync_counters()
        self._flush()

    def _poll_rings(self, on: bool) -> None:
        """Rings are polled only while a slab can take what they hold: a ready
        block that cannot be read would wake the loop for nothing. Meanwhile
        the kernel holds packets, then drops them (counted as kernel drops)."""
        if self.live is None or on == self._rings_polled:
            return
        for fd in self.live.fds:
            if on:
                self.poller.register(fd, zmq.POLLIN | zmq.POLLERR)
            else:
                self.poller.unregister(fd)
        self._rings_polled = on

    def _ring_events(self, ready: dict[Any, int], now: float) -> None:
        assert self.live is not None
        for i, fd in enumerate(self.live.fds):
            if ready.get(fd, 0) & zmq.POLLERR:
                # Reading the error clears it; the kernel resumes the capture
                # by itself if the interface comes back up.
                print(f"pktipc: {self.live.error(i)}", file=self.log, flush=True)
        if now >= self._next_stats:
            self._read_kernel_stats()

    def _read_kernel_stats(self) -> None:
        """Brings the interfaces' kernel counters up to date (the kernel resets
        its own when read)."""
        assert self.live is not None
        self._next_stats = time.monotonic() + 0.5
        for i in range(len(self.live.rings)):
            self.live.read_stats(self.seg.iface(i), i)

    def _timeout(self, now: float) -> float:
        t = 0.2   # upper bound, so signals are noticed promptly
        detached = [c.detached_at + self.opts.grace for c in self.disp.clients.values()
                    if c.peer is None]
        for timer in (self.conn.get_timer(), self.disp.lease_timer(), min(detached, default=None)):
            if timer is not None:
                t = min(t, timer - now)
        if self._wake > now and self._reading():
            t = min(t, self._wake - now)
        return max(t, 0.0)

    def _reading(self) -> bool:
        # A file source pauses while nobody is attached, so nothing is
        # replayed to nobody; --wait-clients 0 asks for the replay regardless.
        # Interfaces are read regardless: packets not read are kernel drops.
        if self.live is not None:
            return self._started and not self.disp.ended
        return (self._started and not self.disp.ended
                and (bool(self.disp.clients) or self.wait_clients == 0))

    def _can_produce(self, now: float) -> bool:
        return self._reading() and now >= self._wake

    def _receive_all(self) -> None:
        for _ in range(10000):
            try:
                parts = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.monotonic()
            if len(parts) != 2:
                self.conn.refuse(parts[0], now, "malformed",
                                 f"expected one frame per message, got {len(parts) - 1}")
                continue
            try:
                events = self.conn.receive(parts[0], parts[1], now)
            except proto.RemoteProtocolError:
                continue    # the ERROR reply is queued and counted
            for ev in events:
                self._handle(ev, now)

    def _handle(self, ev: proto.BrokerEvent, now: float) -> None:
        d = self.disp
        if isinstance(ev, proto.Hello):
            welcome = dict(shm=self.shm_name, epoch=self.epoch,
                           layout=lib.PKTIPC_LAYOUT_VERSION)
            known = ev.name in d.slots
            c = d.hello(ev, now, welcome)
            if c is not None:
                self.reconnections[c.name] += known
                self._watch(c)
                if not self._started:
                    self._started = len(d.clients) >= self.wait_clients
        elif isinstance(ev, proto.Release):
            c = d.by_peer.get(ev.peer)
            if c is not None:
                d.release(c, ev.seqs, now)
        elif isinstance(ev, proto.StatsRequest):
            self.conn.send_stats(ev.peer, now, self.stats())
        elif isinstance(ev, proto.Bye):
            c = d.by_peer.get(ev.peer)
            if c is not None:
                self._drop(c, now, None)
        elif isinstance(ev, proto.PeerLost):
            c = d.by_peer.get(ev.peer)
            if c is not None:      # the protocol has told it already
                self._drop(c, now, "nothing heard from it within the liveness", resume=True)

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
        if why is not None:
            self.evictions += 1
            what = f"detached, its place kept for {self.opts.grace:g} s" if keep else "dropped"
            print(f"pktipc: client {c.name!r} {what}: {why}", file=self.log, flush=True)
            if c.peer in self.conn.peers:
                self.conn.evict(c.peer, now, code, why)
        self.conn.forget(c.peer)
        if c.pidfd is not None:
            self.poller.unregister(c.pidfd)
            os.close(c.pidfd)
            c.pidfd = None
        if keep:
            self.disp.detach(c, now)
        else:
            self.disp.remove(c, now)

    def _flush(self) -> None:
        for peer, frame in self.conn.frames_to_send():
            try:
                self.sock.send_multipart([peer, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                # Unroutable (ROUTER_MANDATORY): the peer is gone.
                c = self.disp.by_peer.get(peer)
                self.conn.forget(peer)
                if c is not None:
                    self._drop(c, time.monotonic(), "unreachable", resume=True)

    # -- producing --
    def _take_slab(self) -> int | None:
        if self._open_slab is not None:
            return self._open_slab
        slab = self.pool.take()
        if slab is None:
            slab = self.disp.reclaim()
        if slab is not None:
            lib.pktipc_fill_begin(self._fill, self.seg.slab_ptr(slab),
                                  self.geometry.slab_size, 0)
            self._fill.hash_opts = lib.PKTIPC_HASH_TUNNELS if self.opts.tunnel_hash else 0
            self._open_slab = slab
        return slab

    def _produce(self, now: float) -> bool:
        """Fills and publishes at most one slab; True if more may follow at once."""
        slab = self._take_slab()
        if slab is None:
            return False        # every slab is held: wait for releases
        src, fill = self.files, self._fill
        assert src is not None
        while True:
            limit = NO_LIMIT
            if self.pacer is not None:
                nts = src.next_ts()
                limit = self.pacer.limit(now, nts) if nts != NO_LIMIT else NO_LIMIT
            res = src.fill(fill, limit)
            entry = self.seg.iface(src.index)
            entry.packets += res.packets
            entry.bytes += res.bytes
            if res.status == lib.PKTIPC_FILL_FULL:
                self._publish(now)
                return True
            if res.status == lib.PKTIPC_FILL_LIMIT:
                assert self.pacer is not None
                self._wake = self.pacer.due(src.next_ts())
                if fill.count:
                    self._publish(now)
                return False
            if res.status == lib.PKTIPC_FILL_EOF:
                if self.pacer is not None:
                    self.pacer.reset()
                try:
                    more = src.next_file()
                except SourceError as e:
                    self._end(now, str(e))
                    return False
                if more:
                    # Back to the loop at every file boundary, so signals and
                    # control messages are seen however short the files are.
                    return True
                self._end(now)
                return False
            # ERROR or TOOBIG: serve what was read, then end the stream.
            self._end(now, res.error)
            return False

    def _produce_live(self, now: float) -> bool:
        """Drains the rings into one slab, published once full or once the
        rings are empty; True if more may wait in the rings."""
        assert self.live is not None
        if self._take_slab() is None:
            self._starved = True
            return False
        self._starved = False
        status, added = self.live.fill(self._fill)
        for i, n, nbytes in added:
            entry = self.seg.iface(i)
            entry.packets += n
            entry.bytes += nbytes
        if status == lib.PKTIPC_FILL_TOOBIG:    # a block always fits a slab: a bug
            self._end(now, "a frame does not fit an empty slab")
            return False
        if self._fill.count:
            self._publish(now)
        return bool(status == lib.PKTIPC_FILL_FULL)

    def _publish(self, now: float) -> None:
        slab, fill = self._open_slab, self._fill
        assert slab is not None
        self._open_slab = None
        seq, b = self.disp.publish(slab, fill.count, now)
        kernel_drops = 0
        if self.live is not None:
            self._read_kernel_stats()
            total = sum(int(self.seg.iface(i).kernel_drops) for i in range(len(self.ifaces)))
            kernel_drops, self._kernel_drops = total - self._kernel_drops, total
        lib.pktipc_batch_publish(self.seg.batch_rec(slab), slab, b.gen, seq, fill,
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

    def _sync_counters(self) -> None:
        c = self.seg.header.counters
        c.clients = len(self.disp.clients)
        c.clients_total = self.disp.clients_total
        c.client_drops = self.disp.client_drops
        c.protocol_errors = self.conn.errors

    def _source_stats(self, i: int, s: Iface) -> dict[str, Any]:
        e = self.seg.iface(i)
        out = {"name": s.name, "linktype": s.linktype, "snaplen": s.snaplen,
               "packets": int(e.packets), "bytes": int(e.bytes)}
        if self.live is not None:
            out.update(kind="interface", ifindex=s.ifindex,
                       kernel_packets=int(e.kernel_packets), kernel_drops=int(e.kernel_drops),
                       kernel_freezes=int(e.kernel_freezes))
            if self.live.opts.fanout is not None:
                out.update(fanout_id=self.live.fanout_ids[i],
                           fanout_mode=self.live.opts.fanout_mode)
        else:
            out.update(kind="file")
        return out

    def stats(self) -> dict[str, Any]:
        if self.live is not None:
            self._read_kernel_stats()
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
            "sources": [self._source_stats(i, s) for i, s in enumerate(self.ifaces)],
            "clients": [
                {"name": c.name, "group": c.group, "slot": c.slot, "policy": c.policy,
                 "credit": c.credit, "pid": c.pid, "batches": c.batches, "packets": c.packets,
                 "drops": c.drops, "held": len(c.held), "queued": len(c.queue),
                 "attached": c.peer is not None, "gaps": c.gaps_sent,
                 "reconnections": self.reconnections[c.name],
                 # owed to it and not given back yet; how long it has held its oldest
                 "lag_packets": sum(s.packets for s in (*c.shares.values(),
                                                        *c.later.values())),
                 "lag_s": round(now - min(c.sent_at.values()), 3) if c.sent_at else 0.0}
                for c in self.disp.clients.values()
            ],
            "groups": [
                {"name": name, "balance": g.balance,
                 "members": [c.name for c in self.disp.members(name)],
                 "packets": sum(c.packets for c in self.disp.members(name))}
                for name, g in self.disp.groups.items()
            ],
        }
