"""Sending through the broker: a client's TX area, and the frames in it.

The area is a POSIX shared-memory object this client makes and alone
writes (shm/pktipc_layout.h, struct pktipc_tx_*): a ring of slots, each a
descriptor and room for one frame. Frames are written into slots in ring
order and named, a batch at a time, in one TX message; the broker copies
them into the kernel's TX ring and gives the slots back with TX_DONE.
"""

from __future__ import annotations

import mmap
import os
import secrets
from types import TracebackType
from typing import TYPE_CHECKING, Any

import posix_ipc

from .._errors import BrokerGone, Busy, PktipcError, Refused
from .._paths import NAME_RE
from .._shm import ffi, lib

if TYPE_CHECKING:
    from .client import Client

DEFAULT_FRAMES = 1024
DEFAULT_FRAME_SIZE = 2048


class Area:
    """The TX area: made (mode 0600, or 0640 with the broker's group when
    the broker runs as another user than root), laid out, mapped."""

    def __init__(self, broker: str, client: str, frames: int, frame_size: int,
                 broker_uid: int | None, broker_gid: int | None) -> None:
        g = ffi.new("struct pktipc_tx_geometry *")
        if not (0 < frames <= lib.PKTIPC_TX_MAX_FRAMES and 0 < frame_size <= 1 << 31) or \
                lib.pktipc_tx_geometry(frames, frame_size, g) != 0:
            raise ValueError(f"a TX area holds a power of two of slots, up to "
                             f"{lib.PKTIPC_TX_MAX_FRAMES}, each a multiple of "
                             f"{lib.PKTIPC_TX_FRAME_ALIGN} bytes up to "
                             f"{lib.PKTIPC_TX_MAX_FRAME_SIZE}")
        where = broker if NAME_RE.fullmatch(broker) else "remote"
        self.name = f"/pktipc.{where}.tx-{client}-{os.getpid()}-{secrets.token_hex(4)}"
        self.frames, self.frame_size = frames, frame_size
        shm = posix_ipc.SharedMemory(self.name, posix_ipc.O_CREX, mode=0o600,
                                     size=int(g.total_size))
        try:
            if broker_uid not in (None, 0, os.geteuid()) and broker_gid is not None:
                os.fchown(shm.fd, -1, broker_gid)   # the broker reads it, as its group
                os.fchmod(shm.fd, 0o640)
            self.mm = mmap.mmap(shm.fd, int(g.total_size))
        except BaseException:
            self.unlink()
            raise
        finally:
            shm.close_fd()
        self.view = memoryview(self.mm)
        base = ffi.from_buffer(self.mm)
        h = ffi.cast("struct pktipc_tx_header *", base)
        h.layout_version = lib.PKTIPC_TX_LAYOUT_VERSION
        h.header_size = lib.PKTIPC_TX_HEADER_SIZE
        h.frame_count = frames
        h.frame_size = frame_size
        h.desc_size = lib.PKTIPC_TX_DESC_SIZE
        h.desc_off = g.desc_off
        h.frames_off = g.frames_off
        h.total_size = g.total_size
        h.magic = lib.PKTIPC_TX_MAGIC
        self.base, self.header = base, h
        self.desc = ffi.cast("struct pktipc_tx_desc *", base + g.desc_off)
        self.frames_off = int(g.frames_off)

    def slot(self, i: int) -> int:
        return self.frames_off + self.frame_size * i

    def unlink(self) -> None:
        """Removes the name (the broker maps it first); the memory stays
        while mapped."""
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        self.unlink()
        self.desc = self.base = self.header = None
        try:
            self.view.release()
            self.mm.close()
        except BufferError:
            pass        # a buffer handed out is still in use: the mapping goes with it


class Tx:
    """Frames sent through the broker, out of the interfaces it sends on
    (`pktipc serve -i IFACE --tx`). See Client.tx().

        with client.tx() as tx:
            buf = tx.allocate(len(frame), iface="eth1")
            buf[:] = frame
            tx.send(buf)
        # flushed: every frame is in the kernel's TX ring, or refused

    Frames go out in the order they are sent. `sent` counts the frames the
    broker took, `refused` those it refused (and `errors` why)."""

    def __init__(self, client: Client, area: Area, max_len: tuple[int, ...], wait: bool,
                 batch: int) -> None:
        self._client = client
        self._area = area
        self.max_len = max_len      # per interface of the broker: the longest frame (0: none)
        self.wait = wait
        self._batch = batch
        self._next = 0              # slots sent (tx.send), ever
        self._submitted = 0         # slots named in TX messages, ever
        self._upto = 0              # slots given back, ever
        self._cur: memoryview | None = None
        self._cur_len = 0
        self.sent = 0
        self.refused = 0
        self.errors: list[str] = []     # why frames were refused (the first of each batch)
        self._unreported = 0            # refused since the last flush
        self._broken: str | None = None

    # -- the API --
    def allocate(self, length: int, iface: int | str = 0) -> memoryview:
        """A writable buffer of `length` bytes in the next free slot, for a
        frame to send out of `iface` (an index into client.ifaces, or its
        name). With no slot free, waits for the broker to give some back,
        or raises Busy if the Tx does not wait. A buffer not sent is given
        back by the next allocate()."""
        self._check()
        i = self._iface(iface)
        most = min(self.max_len[i], self._area.frame_size)
        if not 0 < length <= most:
            name = self._client.ifaces[i].name
            raise ValueError(f"a frame for {name} has 1 to {most} bytes, not {length}" if most
                             else f"the broker does not send on {name}")
        if self._cur is not None:
            self._drop_cur()
        if self._next - self._upto >= self._area.frames:
            self._submit()      # the broker can give back only what it was given
            if not self.wait:
                self._client._poll_tx(0.0)
                if self._next - self._upto >= self._area.frames:
                    raise Busy(f"all {self._area.frames} slots of the TX area wait for the "
                               "broker")
            self._client._poll_tx(None, until=lambda: self._next - self._upto
                                  < self._area.frames)
            self._check()
        slot = self._next % self._area.frames
        d = self._area.desc[slot]
        d.iface = i
        d.len = length
        start = self._area.slot(slot)
        self._cur = self._area.view[start : start + length]
        self._cur_len = length
        return self._cur

    def send(self, buf: memoryview, length: int | None = None) -> None:
        """Sends the buffer allocate() gave last, whole or its first `length`
        bytes; it is the broker's from now on (the view is released). Sent
        with others in one TX message, once enough wait or on flush()."""
        self._check()
        if buf is not self._cur or self._cur is None:
            raise ValueError("send() takes the buffer allocate() gave last")
        if length is not None:
            if not 0 < length <= self._cur_len:
                raise ValueError(f"length must be 1 to {self._cur_len}")
            self._area.desc[self._next % self._area.frames].len = length
        self._drop_cur()
        self._next += 1
        if self._next - self._submitted >= self._batch:
            self._submit()

    def flush(self, wait: bool = True, timeout: float | None = None) -> None:
        """Submits every frame sent, in one TX message; with `wait`, then
        waits (at most `timeout` seconds; None: as long as it takes) until
        the broker has copied each into the kernel's TX ring or refused it.
        Raises Refused (code "frame-refused") once it has refused any since
        the last such report, Busy if frames still wait after `timeout`,
        BrokerGone if the broker went."""
        self._check()
        self._submit()
        if not wait:
            self._client._poll_tx(0.0)
        else:
            self._client._poll_tx(timeout, until=lambda: self._upto >= self._submitted)
            self._check()
            if self._upto < self._submitted:
                raise Busy(f"{self._submitted - self._upto} frames still wait for broker "
                           f"{self._client.server!r} after {timeout:g} s")
        if self._unreported and (self._upto >= self._submitted or not wait):
            n, self._unreported = self._unreported, 0
            raise Refused("frame-refused", f"broker {self._client.server!r} refused {n} "
                          f"frame(s): {self.errors[-1]}")

    @property
    def free(self) -> int:
        """Slots free for frames now."""
        return self._area.frames - (self._next - self._upto) - (self._cur is not None)

    def _put(self, slab: Any, count: int, iface: int) -> tuple[int, int, int]:
        """The frames of a slab filled by pkb_src_fill (at most `free`), sent
        at once, in C: frames sent, their bytes, frames skipped as longer
        than a slot."""
        self._check()
        skipped, nbytes = ffi.new("uint32_t *"), ffi.new("uint64_t *")
        placed = int(lib.pkb_tx_put(slab, count, self._area.base, self._area.header,
                                    self._next, iface, skipped, nbytes))
        self._next += placed
        if self._next - self._submitted >= self._batch:
            self._submit()
        return placed, int(nbytes[0]), int(skipped[0])

    @property
    def pending(self) -> int:
        """Frames sent and not yet taken or refused by the broker."""
        return self._next - self._upto

    def __enter__(self) -> Tx:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.flush()
        elif self._broken is None and not self._client._closed:
            try:
                self._submit()      # what was sent goes, whatever the block raised
            except PktipcError:
                pass

    # -- internals --
    def _iface(self, iface: int | str) -> int:
        if isinstance(iface, str):
            names = [i.name for i in self._client.ifaces]
            if iface not in names:
                raise ValueError(f"the broker has no interface {iface!r} ({', '.join(names)})")
            return names.index(iface)
        if not 0 <= iface < len(self.max_len):
            raise ValueError(f"interface {iface}: the broker has {len(self.max_len)}")
        return iface

    def _drop_cur(self) -> None:
        assert self._cur is not None
        try:
            self._cur.release()
        except BufferError:
            pass
        self._cur = None

    def _check(self) -> None:
        if self._broken is not None:
            raise BrokerGone(self._broken)
        self._client._check_open()

    def _submit(self) -> None:
        n = self._next - self._submitted
        if n:
            self._client._send_tx(self._submitted, n)
            self._submitted += n

    def _taken(self, upto: int, refused: int, error: str | None) -> None:
        """TX_DONE: the broker is done with every slot before `upto`."""
        self.sent += upto - self._upto - refused
        self.refused += refused
        self._unreported += refused
        if error is not None:
            self.errors.append(error)
            del self.errors[:-100]
        self._upto = upto

    def _lost(self, why: str) -> None:
        self._broken = why
        self._area.close()

    def close(self) -> None:
        if self._cur is not None:
            self._drop_cur()
        self._broken = self._broken or "the client is closed"
        self._area.close()

