"""Sending: frames from the clients' TX areas into the kernel's TX rings.

A client that sends makes a TX area of its own (shm/pktipc_layout.h, struct
pktipc_tx_*), writes frames into its slots and names them, a batch at a
time, in TX messages. The broker maps the area read-only, reads each
descriptor once, checks it and copies the frame into the TX ring of its
interface, in C, one call per batch (engine/tx.c); a TX_DONE gives the
slots back. A client can only ever send what is in its own area: what it
writes there is never read by anyone else, and a frame it gets wrong is
refused, and counted against it. A ring that is full holds the batch (the
client waits for its slots, or is told busy); nothing is dropped.

No control socket here: the loop hands in what came and sends what this
returns.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .._errors import PermissionDenied, SourceError
from .._shm import ffi, lib

DEFAULT_FRAMES = 1024           # frames in each interface's TX ring
ALL = "*"                       # --tx without an interface: every one
# Why a frame was refused, by PKB_TX_* (engine/tx.h).
REASONS = ("empty", "too-short", "too-long", "no-such-iface", "not-sending")
AREA_NAME = re.compile(r"/[A-Za-z0-9_.-]{1,200}")
SHM_DIR = "/dev/shm"
RETRY_MIN, RETRY_MAX = 0.001, 0.1   # s: while frames wait, the next try (doubling while stuck)


class TxRefused(Exception):
    """A TX_OPEN or TX refused: `code` goes in the ERROR reply."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code


@dataclass
class Pending:
    """Slots first .. first + n - 1 named by one TX; `done` of them handled."""

    first: int
    n: int
    done: int = 0
    refused: int = 0
    error: str | None = None


@dataclass
class Sender:
    """One client's sending: its area, what it submitted, what it was told."""

    name: str
    area: Any                   # pkb_txarea *
    frames: int
    next: int = 0               # slots named so far: the next TX's first
    upto: int = 0               # every slot before it is the client's again
    queue: deque[Pending] = field(default_factory=deque)
    submitted: int = 0
    sent: int = 0               # taken by the kernel
    in_ring: int = 0            # copied into a ring, not taken yet
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def waiting(self) -> int:
        return sum(p.n - p.done for p in self.queue)


@dataclass(frozen=True)
class Done:
    """A TX handled: tell `name` TX_DONE."""

    name: str
    upto: int
    refused: int
    error: str | None


def allow_rule(users: list[str]) -> set[int]:
    """The uids of --allow-tx USER entries (names or uids)."""
    uids = set()
    for u in users:
        try:
            uids.add(int(u) if u.isdigit() else pwd.getpwnam(u).pw_uid)
        except KeyError:
            raise ValueError(f"--allow-tx {u}: no such user") from None
    return uids


class Transmitter:
    """The TX rings of the interfaces the broker sends on (interface i of
    the broker's table is `ifaces[i]`; `tx` those it sends on), and the
    clients that send. Who may send: the broker's own user, root, and the
    uids of `allowed`, as the kernel gives them (never by client name, which
    any client chooses)."""

    def __init__(self, ifaces: list[str], tx: list[str], frames: int = DEFAULT_FRAMES,
                 qdisc_bypass: bool = False, allowed: set[int] | None = None) -> None:
        names = set(ifaces) if ALL in tx else set(tx)
        unknown = sorted(names - set(ifaces))
        if unknown:
            raise ValueError(f"--tx {unknown[0]}: not an interface this broker captures on "
                             f"({', '.join(ifaces)})")
        if not 1 <= frames <= lib.PKTIPC_TX_MAX_FRAMES:
            raise ValueError(f"--tx-frames must be between 1 and {lib.PKTIPC_TX_MAX_FRAMES}")
        self.ifaces = ifaces
        self.allowed = (allowed or set()) | {0, os.geteuid()}
        self.senders: dict[str, Sender] = {}
        self.rings: list[Any] = []
        self.errors: list[Counter[str]] = [Counter() for _ in ifaces]   # the kernel's, by errno
        self.taken = [0] * len(ifaces)
        self._runs: list[deque[list[Any]]] = [deque() for _ in ifaces]  # [name, frames] in ring
        self._turn = 0
        self._wait = RETRY_MIN
        errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
        err = ffi.new("int *")
        for name in ifaces:
            if name not in names:
                self.rings.append(ffi.NULL)
                continue
            c_name = ffi.new("char[]", name.encode())
            o = ffi.new("struct pkb_txring_opts *", {"ifname": c_name, "frame_count": frames,
                                                     "qdisc_bypass": qdisc_bypass})
            ring = lib.pkb_txring_open(o, err, errbuf)
            if ring == ffi.NULL:
                self.close()
                msg = ffi.string(errbuf).decode(errors="replace")
                raise (PermissionDenied if err[0] == lib.PKB_RING_EPERM else SourceError)(msg)
            self.rings.append(ring)
        self._rings = ffi.new("pkb_txring *[]", self.rings)
        self._io = ffi.new("struct pkb_tx_io[]", len(ifaces))
        self._res = ffi.new("struct pkb_tx_result *")

    @property
    def fds(self) -> list[int]:
        return [int(lib.pkb_txring_fd(r)) for r in self.rings if r != ffi.NULL]

    def max_len(self) -> list[int]:
        return [int(lib.pkb_txring_max_len(r)) if r != ffi.NULL else 0 for r in self.rings]

    def refresh(self) -> None:
        """Reads the interfaces' MTUs again."""
        for r in self.rings:
            if r != ffi.NULL:
                lib.pkb_txring_refresh(r)

    # -- clients --
    def open(self, name: str, uid: int | None, shm: str) -> list[int]:
        """Maps client `name`'s TX area: the longest frame of each interface,
        or TxRefused."""
        if uid is None or uid not in self.allowed:
            raise TxRefused("tx-refused", "sending is for the broker's own user, root and "
                            "the users serve --allow-tx names; this client's is "
                            f"{'unknown (not local)' if uid is None else f'uid {uid}'}")
        if name in self.senders:
            raise TxRefused("tx-area", f"{name!r} has a TX area already")
        if not AREA_NAME.fullmatch(shm) or shm in ("/.", "/.."):
            raise TxRefused("tx-area", f"{shm!r} is not a shared-memory object's name")
        path = SHM_DIR + shm
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TxRefused("tx-area", f"TX area {shm}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            # Only what the client itself made: not another user's object,
            # nor a file with other names that might be someone else's.
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_nlink != 1:
                raise TxRefused("tx-area", f"TX area {shm} is not a shared-memory object of "
                                f"the client's own user (uid {uid}) with one name")
            errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
            area = lib.pkb_txarea_open(fd, st.st_size, errbuf)
            if area == ffi.NULL:
                raise TxRefused("tx-area", f"TX area {shm}: "
                                + ffi.string(errbuf).decode(errors="replace"))
        finally:
            os.close(fd)
        self.senders[name] = Sender(name, area, int(lib.pkb_txarea_frame_count(area)))
        return self.max_len()

    def submit(self, name: str, first: int, n: int) -> None:
        """A TX of client `name`: queued, or TxRefused if it breaks the rules
        (slots named in order, never more than it has back)."""
        s = self.senders.get(name)
        if s is None:
            raise TxRefused("bad-tx", "TX before a TX area was offered (TX_OPEN)")
        if first != s.next:
            raise TxRefused("bad-tx", f"TX names slot {first}, the next is {s.next}")
        if s.next + n - s.upto > s.frames:
            raise TxRefused("bad-tx", f"TX names {n} slots, {s.frames - (s.next - s.upto)} "
                            "are the client's to name")
        s.queue.append(Pending(first, n))
        s.next += n
        s.submitted += n

    def forget(self, name: str) -> None:
        """A client gone: what it submitted and was not copied yet is not sent."""
        s = self.senders.pop(name, None)
        if s is not None:
            lib.pkb_txarea_close(s.area)

    # -- sending --
    @property
    def busy(self) -> bool:
        """Frames wait: in a client's queue, or in a ring for the kernel."""
        return (any(s.queue for s in self.senders.values())
                or any(lib.pkb_txring_pending(r) for r in self.rings if r != ffi.NULL))

    def pump(self) -> tuple[list[Done], list[tuple[str, str]]]:
        """Copies what the clients submitted into the rings, a batch at a
        time, the clients in turn, as far as the rings have room; hands the
        kernel what waits in them. Returns the TXs now handled, and the
        clients whose area failed under the copy (name, why)."""
        done: list[Done] = []
        faulted: list[tuple[str, str]] = []
        flushed: set[int] = set()
        before = sum(self.taken)
        for s in self._in_turn():
            while s.queue:
                p = s.queue[0]
                status = self._copy(s, p, flushed)
                if status == lib.PKB_TX_FAULT:
                    faulted.append((s.name, "its TX area shrank while the broker read it"))
                    break
                if status == lib.PKB_TX_FULL:
                    break
                s.queue.popleft()
                s.upto = p.first + p.n
                done.append(Done(s.name, s.upto, p.refused, p.error))
        self._flush(skip=flushed)
        for name, _ in faulted:
            self.forget(name)
        moved = bool(done) or sum(self.taken) > before
        self._wait = RETRY_MIN if moved else min(2 * self._wait, RETRY_MAX)
        return done, faulted

    def retry_in(self) -> float | None:
        """Seconds until the next pump is due while frames wait (the kernel
        took none lately: longer and longer), None if none wait."""
        return self._wait if self.busy else None

    def _in_turn(self) -> Iterator[Sender]:
        senders = list(self.senders.values())
        if senders:
            self._turn = (self._turn + 1) % len(senders)
        return iter(senders[self._turn:] + senders[:self._turn])

    def _copy(self, s: Sender, p: Pending, flushed: set[int]) -> int:
        io, res = self._io, self._res
        ffi.memmove(io, b"\0" * ffi.sizeof(io), ffi.sizeof(io))
        status = int(lib.pkb_tx_copy(s.area, p.first + p.done, p.n - p.done, self._rings,
                                     len(self.rings), io, res))
        refused = [int(x) for x in res.refused]
        if any(refused):
            if p.error is None:
                p.error = self._why(p.done + int(res.first_refused), res)
            for reason, k in zip(REASONS, refused, strict=True):
                if k:
                    s.refused[reason] += k
            p.refused += sum(refused)
        p.done += int(res.done)
        for i in range(len(self.rings)):
            if io[i].placed:
                self._runs[i].append([s.name, int(io[i].placed)])
                s.in_ring += int(io[i].placed)
                flushed.add(i)
            self._took(i, io[i])
        return status

    def _why(self, j: int, res: Any) -> str:
        iface, length = int(res.first_iface), int(res.first_len)
        where = (self.ifaces[iface] if iface < len(self.ifaces) else f"interface {iface}")
        reason = int(res.first_reason)
        if reason == lib.PKB_TX_EMPTY:
            return f"frame {j} of the batch is empty"
        if reason == lib.PKB_TX_NOIFACE:
            return (f"frame {j} of the batch is for interface {iface}; the broker has "
                    f"{len(self.ifaces)}")
        if reason == lib.PKB_TX_NOTX:
            return f"frame {j} of the batch is for {where}, which the broker does not send on"
        if reason == lib.PKB_TX_SHORT:
            return f"frame {j} of the batch has {length} bytes, shorter than {where}'s header"
        most = self.max_len()[iface]
        return (f"frame {j} of the batch has {length} bytes; {where} sends at most {most} "
                "(on Ethernet, 4 fewer unless 802.1Q-tagged)")

    def _flush(self, skip: set[int]) -> None:
        for i, r in enumerate(self.rings):
            if r != ffi.NULL and i not in skip and lib.pkb_txring_pending(r):
                io = self._io + i
                ffi.memmove(io, b"\0" * ffi.sizeof("struct pkb_tx_io"),
                            ffi.sizeof("struct pkb_tx_io"))
                lib.pkb_txring_flush(r, io)
                self._took(i, io[0])

    def _took(self, i: int, io: Any) -> None:
        """Credits the frames the kernel took from ring i to their clients,
        in ring order, and counts its refusal."""
        if io.error:
            self.errors[i][errno.errorcode.get(int(io.error), str(int(io.error)))] += 1
        k = int(io.taken)
        self.taken[i] += k
        runs = self._runs[i]
        while k:
            run = runs[0]
            m = min(k, run[1])
            s = self.senders.get(run[0])
            if s is not None:
                s.sent += m
                s.in_ring -= m
            run[1] -= m
            k -= m
            if not run[1]:
                runs.popleft()

    # -- reporting --
    def client_stats(self, name: str) -> dict[str, Any] | None:
        s = self.senders.get(name)
        if s is None:
            return None
        return {"frames": s.frames, "submitted": s.submitted, "sent": s.sent,
                "refused": dict(s.refused), "in_ring": s.in_ring, "waiting": s.waiting}

    def iface_stats(self, i: int) -> dict[str, Any] | None:
        r = self.rings[i]
        if r == ffi.NULL:
            return None
        return {"sent": self.taken[i], "pending": int(lib.pkb_txring_pending(r)),
                "max_len": int(lib.pkb_txring_max_len(r)), "kernel_errors": dict(self.errors[i])}

    def close(self) -> None:
        for name in list(self.senders):
            self.forget(name)
        for r in self.rings:
            if r != ffi.NULL:
                lib.pkb_txring_close(r)
        self.rings = [ffi.NULL] * len(self.rings)
