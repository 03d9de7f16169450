"""The broker's bookkeeping, with no I/O: which slab is free, who holds which
batch, what each client is owed, groups and their shares, credit, gaps.

Nothing here touches a socket, a file or the clock: the loop (broker.py)
hands in events and `now`, and the protocol machine it is given collects
the frames to send.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import _protocol as proto
from .._layout import mask_ptr, select, u32s
from .._paths import is_recording
from .._shm import ffi, lib


def share_counts(desc: np.ndarray[Any, Any], mask: bytes | None,
                 members: Sequence[int]) -> list[int]:
    """How many packets of `desc` (of those set in `mask`) each member owns."""
    counts = np.zeros(len(members), dtype=np.uint32)
    lib.pktipc_share_counts(ffi.from_buffer("struct pktipc_pkt[]", desc), len(desc),
                            mask_ptr(mask), u32s(members), len(members),
                            ffi.from_buffer("uint32_t[]", counts))
    return [int(x) for x in counts]


def mask_of(indexes: np.ndarray[Any, Any], n: int) -> bytes:
    """The BATCH mask of a set of packet indexes, in a batch of n."""
    bits = np.zeros(n, dtype=bool)
    bits[indexes] = True
    return np.packbits(bits, bitorder="little").tobytes()


class SlabPool:
    """Which slabs are free, and how many holders each published slab has.

    A slab returns to the free list only when its last holder lets it go
    (and `freed(slab)` is told, at that moment); its generation counts how
    many times it was published.
    """

    def __init__(self, count: int, freed: Callable[[int], None] | None = None) -> None:
        self.free: deque[int] = deque(range(count))
        self.refs = [0] * count
        self.gen = [0] * count
        self.freed = freed

    def take(self) -> int | None:
        return self.free.popleft() if self.free else None

    def publish(self, slab: int, holders: int) -> int:
        """Marks a filled slab handed to `holders`; returns its generation."""
        self.gen[slab] += 1
        if holders:
            self.refs[slab] = holders
        else:
            self._free(slab)
        return self.gen[slab]

    def unref(self, slab: int) -> bool:
        """Drops one holder; True when the slab became free."""
        if self.refs[slab] <= 0:
            raise ValueError(f"slab {slab} has no holder")
        self.refs[slab] -= 1
        if self.refs[slab] == 0:
            self._free(slab)
            return True
        return False

    def _free(self, slab: int) -> None:
        self.free.append(slab)
        if self.freed is not None:
            self.freed(slab)

    def ref(self, slab: int, more: int) -> None:
        """Adds holders to a published slab that has some."""
        if self.refs[slab] <= 0:
            raise ValueError(f"slab {slab} has no holder")
        self.refs[slab] += more

    def give_back(self, slab: int) -> None:
        """Returns a slab taken but never published."""
        self.free.appendleft(slab)

    @property
    def in_use(self) -> int:
        return len(self.refs) - len(self.free)


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
    uid: int | None = None                              # local clients: from the kernel
    queue: deque[int] = field(default_factory=deque)   # published to it, not yet sent
    held: set[int] = field(default_factory=set)         # sent, not released
    shares: dict[int, Share] = field(default_factory=dict)  # of each seq queued or held
    later: dict[int, Share] = field(default_factory=dict)   # owed for a seq it holds
    sent_at: dict[int, float] = field(default_factory=dict)  # held seq -> when sent
    sent_no: dict[int, int] = field(default_factory=dict)    # held seq -> its `batches` number
    pidfd: int | None = None                            # local clients: death is readable
    detached_at: float = 0.0
    gaps: list[tuple[int, int]] = field(default_factory=list)  # skipped, not yet told
    # Told, but not known to have arrived: (start, end, batches sent before
    # it). A RELEASE of a batch sent after it says it did (a connection
    # delivers in order); one that may not have is told again on resuming.
    told: list[tuple[int, int, int]] = field(default_factory=list)
    # Held when its connection was lost, queued to be sent again: the client
    # may have it already, and takes the copy for one (see detach).
    resent: set[int] = field(default_factory=set)
    eos_sent: bool = False
    batches: int = 0
    packets: int = 0
    drops: int = 0
    gaps_sent: int = 0                                  # GAP messages
    reconnections: int = 0                              # kept place resumed


@dataclass
class Group:
    balance: str            # set by its first member
    owner: str | None = None    # the client whose own group it is (nobody else joins it)
    last: int = -1          # round-robin: slot of the member given the last batch
    changes: int = 0        # members that joined or left


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


def slot_of(name: str, taken: set[int]) -> int:
    """A client's slot: a hash of its name, so that a member that comes back
    under its name, however long after, owns the same flows again, and the
    broker keeps no table of names; the next hash of it if another member
    of the group has it."""
    for i in itertools.count():
        key = name if i == 0 else f"{name}#{i}"
        slot = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=4).digest(), "little")
        if slot not in taken:
            return slot
    raise AssertionError("unreachable")


class Dispatcher:
    """Fan-out and balance bookkeeping: every group gets every batch, divided
    among its members (by flow or by batch); each client gets its shares in
    order, holding at most `credit` at once; a slab is free again when its
    last holder let go. `descriptors(slab, n)` reads a published slab's
    descriptors, for the flow hashes.

    Flow hashes are computed only while a group balances by flow among two or
    more members (needs_hash); `descriptors` gives hashes for a slab filled
    without them too (flag PKTIPC_F_NO_HASH kept), and its shares then name
    each member's packets, since the members could not find them.

    Admission: a `drop` client holds at most its own part of the ring,
    (slabs - 1) / max_clients, so that any number of them stalled leave the
    others theirs, and the source a slab; `block`, which lets one client
    stall the source, only if `may_block(name, uid)` says so; a client
    evicted comes back only after `backoff` seconds; a group named after a
    client is that client's alone unless it asked for it by name; at most
    `max_recordings` recordings (clients named as recordings) at once."""

    def __init__(self, conn: proto.BrokerConnection, pool: SlabPool, *,
                 default_policy: str, default_credit: int, max_clients: int,
                 lease: float | None = None, descriptors: Descriptors | None = None,
                 may_block: Callable[[str, int | None], bool] | None = None,
                 backoff: float = 0.0, max_recordings: int | None = None) -> None:
        self.conn = conn
        self.lease = lease
        self.pool = pool
        self.default_policy = default_policy
        self.default_credit = default_credit
        self.max_clients = max_clients
        self.descriptors = descriptors
        self.may_block = may_block
        self.backoff = backoff
        self.max_recordings = max_recordings
        self.drop_credit = max(1, (len(pool.refs) - 1) // max_clients)
        self.clients: dict[str, ClientState] = {}
        self.by_peer: dict[bytes, ClientState] = {}
        self.groups: dict[str, Group] = {}
        self.batches: dict[int, Published] = {}
        self.banned: dict[str, float] = {}      # evicted name -> when it may come back
        self.refused: Counter[str] = Counter()  # HELLOs refused, by code
        self.next_seq = 0
        self.ended = False
        self.end_error: str | None = None
        self.client_drops = 0
        self.clients_total = 0

    # -- clients --
    def _refuse(self, ev: proto.HelloReceived, now: float, code: str, text: str) -> None:
        self.refused[code] += 1
        self.conn.refuse(ev.peer, now, code, text)

    def hello(self, ev: proto.HelloReceived, now: float,
              welcome: dict[str, Any]) -> ClientState | None:
        group = ev.group or ev.name
        other = self.clients.get(ev.name)
        if other is not None and other.peer is not None and self._given_up(other, ev):
            self.conn.forget(other.peer)
            self.detach(other, now)
        if other is not None and other.peer is not None:
            self._refuse(ev, now, "name-taken",
                         f"a client named {ev.name!r} is already attached (pid {other.pid})")
            return None
        if other is not None and other.uid != ev.uid:
            self._refuse(ev, now, "name-taken",
                         f"{ev.name!r} is kept for the user it belongs to (uid {other.uid})")
            return None
        if other is not None and other.group != group:
            self._refuse(ev, now, "group-mismatch",
                         f"{ev.name!r} is kept in group {other.group!r}, not {group!r}")
            return None
        until = self.banned.get(ev.name)
        if until is not None and now < until:
            self._refuse(ev, now, "backoff", f"{ev.name!r} was evicted; it may come back in "
                         f"{until - now:.1f} s")
            return None
        g = self.groups.get(group)
        if g is not None and g.owner is not None and g.owner != ev.name:
            self._refuse(ev, now, "group-private",
                         f"group {group!r} is client {g.owner!r}'s own (a client shares its "
                         "group only if it asks for it by name)")
            return None
        if g is not None and ev.group is None and g.owner is None and other is None:
            self._refuse(ev, now, "group-taken",
                         f"other clients share a group named {group!r}: ask for it by name "
                         "to join it, or take another name")
            return None
        if g is not None and ev.balance not in (None, g.balance):
            self._refuse(ev, now, "balance-mismatch",
                         f"group {group!r} balances by {g.balance}, not {ev.balance}")
            return None
        if other is not None:
            return self._resume(other, ev, now, welcome)
        if len(self.clients) >= self.max_clients:
            self._refuse(ev, now, "too-many-clients",
                         f"this broker serves at most {self.max_clients} clients")
            return None
        if (self.max_recordings is not None and is_recording(ev.name)
                and sum(map(is_recording, self.clients)) >= self.max_recordings):
            self._refuse(ev, now, "too-many-recordings",
                         f"this broker runs at most {self.max_recordings} recordings at once "
                         "(serve --max-recordings); stop one first (pktipc record stop)")
            return None
        policy = ev.policy or self.default_policy
        if policy == "block" and self.may_block is not None and not self.may_block(ev.name,
                                                                                   ev.uid):
            self._refuse(ev, now, "block-refused",
                         "block would let one client stall the capture for every client; "
                         "the broker's operator allows it per client (serve --allow-block)")
            return None
        most = len(self.pool.refs) if policy == "block" else self.drop_credit
        g = self.groups.setdefault(group, Group(ev.balance or "flow",
                                                owner=None if ev.group else ev.name))
        c = ClientState(name=ev.name, peer=ev.peer, group=group,
                        policy=policy, credit=min(ev.credit or self.default_credit, most),
                        pid=ev.pid, uid=ev.uid,
                        slot=slot_of(ev.name, {m.slot for m in self.members(group)}))
        g.changes += 1
        self.clients_total += 1
        self.clients[c.name] = c
        self.by_peer[ev.peer] = c
        self.conn.accept(ev.peer, now, slot=c.slot, credit=c.credit, policy=c.policy,
                         group=group, balance=g.balance, **welcome)
        self.pump(c, now)
        return c

    def evicted(self, c: ClientState, now: float) -> None:
        """`c` broke its lease or its liveness: its name may not come back
        for `backoff` seconds."""
        self.banned = {n: t for n, t in self.banned.items() if t > now}
        if self.backoff > 0:
            self.banned[c.name] = now + self.backoff

    def _given_up(self, c: ClientState, ev: proto.HelloReceived) -> bool:
        """Whether `ev` is the process that holds `c`'s name asking again,
        before it was heard on the connection the broker welcomed: it gave up
        waiting for that WELCOME (a loaded machine, a broker slow to start),
        and that connection went with the attempt. Who asks is the kernel's
        word (SO_PEERCRED), never the client's."""
        return (c.peer is not None and ev.uid is not None
                and (ev.pid, ev.uid) == (c.pid, c.uid) and not self.conn.heard(c.peer))

    def _resume(self, c: ClientState, ev: proto.HelloReceived, now: float,
                welcome: dict[str, Any]) -> ClientState:
        """A detached client is back under its name: it continues where it
        stopped, from the batches it never released."""
        c.peer, c.pid = ev.peer, ev.pid
        c.reconnections += 1
        self.by_peer[ev.peer] = c
        self.clients_total += 1
        self.conn.accept(c.peer, now, slot=c.slot, credit=c.credit, policy=c.policy,
                         group=c.group, balance=self.groups[c.group].balance, **welcome)
        self.pump(c, now)
        return c

    @property
    def needs_hash(self) -> bool:
        """Whether a group balances by flow among two or more members (kept
        ones too): batches published now must have flow hashes."""
        counts = Counter(c.group for c in self.clients.values())
        return any(g.balance == "flow" and counts[name] > 1 for name, g in self.groups.items())

    def members(self, group: str) -> list[ClientState]:
        """The members of a group, attached or kept for --grace, by slot."""
        return sorted((c for c in self.clients.values() if c.group == group),
                      key=lambda c: c.slot)

    def detach(self, c: ClientState, now: float) -> None:
        """Keeps a lost client's place: what it held and what it is owed wait
        for it under its name (see resume); `drop` clients may lose them.
        GAPs it may not have received (lost with its connection, as the
        batches it held may have been) are told again, and so is END-OF-STREAM:
        until the place is resumed or given up, the broker is not finished."""
        assert c.peer is not None
        del self.by_peer[c.peer]
        c.peer = None
        c.detached_at = now
        held = sorted(c.held)
        c.held.clear()
        c.sent_at.clear()
        c.sent_no.clear()
        for start, end, _ in c.told:
            _add_gap(c.gaps, start, end)
        c.told.clear()
        c.eos_sent = False
        # Sent again as they were: a client that has one takes the copy for
        # it, so what it is owed besides (a leaver's share) stays apart
        # until the copy is given back.
        for seq in held:
            self._enqueue(c, seq, c.shares.pop(seq))
            c.resent.add(seq)

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
        c.sent_no.clear()
        c.told.clear()
        c.resent.clear()
        c.queue.clear()
        c.shares.clear()
        c.later.clear()
        del self.clients[c.name]
        if c.peer is not None:
            del self.by_peer[c.peer]
        heirs = [m for m in self.members(c.group) if not m.eos_sent]
        for seq, share in owed:
            self._pass_on(c, seq, share, heirs)
        if self.members(c.group):
            self.groups[c.group].changes += 1
        else:
            del self.groups[c.group]
        for m in heirs:
            self.pump(m, now)
        self._end_group(c.group, now)

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
                sent = c.sent_no.pop(seq)
                if c.told and c.told[0][2] <= sent:
                    c.told = [t for t in c.told if t[2] > sent]
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
        desc = self._descriptors(b)
        counts = share_counts(desc, mask, slots)
        if b.n and desc["flags"][0] & lib.PKTIPC_F_NO_HASH:
            # Filled before anyone balanced by flow: its members cannot see
            # the hashes, so each is told which packets are its own.
            return [(m, Share(k, (), mask_of(select(desc, mask, slots, m.slot), b.n)))
                    for m, k in zip(members, counts, strict=True) if k]
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
        if seq in c.held or seq in c.resent:
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
        while c.queue and len(c.held) < c.credit:
            seq = c.queue.popleft()
            b, share = self.batches[seq], c.shares[seq]
            self._tell_gaps(c, now, before=seq)
            self.conn.send_batch(c.peer, now, seq, b.slab, b.gen, b.n, share.members,
                                 share.mask)
            c.held.add(seq)
            c.resent.discard(seq)
            c.sent_at[seq] = now
            c.sent_no[seq] = c.batches
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

    def _tell_gaps(self, c: ClientState, now: float, before: int) -> None:
        """Sends, in order, the gaps that come before seq `before`."""
        while c.gaps and c.gaps[0][0] < before and c.peer is not None:
            start, end = c.gaps.pop(0)
            self.conn.send_gap(c.peer, now, start, end)
            c.told.append((start, end, c.batches))
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
                c.resent.clear()
        for c in list(self.clients.values()):
            self.pump(c, now)

    def reclaim(self) -> int | None:
        """Frees a slab by skipping the oldest batch that is owed, and not yet
        sent, only to `drop` clients; the skipped packets are counted against
        them alone, and each is told GAP where the batch would have been. A
        batch queued again for a kept place is as good as held: its client
        may be reading it still."""
        for seq in list(self.batches):     # oldest first
            holders = [c for c in self.clients.values() if seq in c.shares]
            if not holders or any(c.policy != "drop" or seq in c.held or seq in c.resent
                                  for c in holders):
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
        """Every client was sent everything and gave it all back, and each
        has said it mapped the segment (a client maps it after WELCOME:
        unlinking it earlier could beat it, even for a client given nothing)."""
        return self.ended and all(c.eos_sent and not c.held and self.mapped(c)
                                  for c in self.clients.values())

    def mapped(self, c: ClientState) -> bool:
        return c.peer is None or self.conn.heard(c.peer)
