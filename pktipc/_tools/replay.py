"""pktipc replay: a capture file's frames out of an interface, through a
broker that sends there (serve -i IFACE --tx), as tcpreplay does: at the
file's pace (--speed), at a rate (--pps), or as fast as they go.

The file is read in C (libpcap, or the mapped reader of classic pcap
files), a slab at a time, and each slab's frames are written into the TX
area in C: the broker takes them a batch per message."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .._broker.files import NO_LIMIT, Pacer, _open
from .._client.client import Client, connect
from .._errors import PktipcError, Refused, SourceError
from .._shm import ffi, lib

SLAB = 1 << 20                 # frames read from the file at a time (bytes)
FRAMES = 4096                  # slots of the TX area
BATCH = 256                    # frames a TX message
RAW = {101, 228, 229}          # LINKTYPE_RAW, _IPV4, _IPV6: an interface with no link layer


@dataclass
class Replayed:
    sent: int = 0
    bytes: int = 0
    skipped: int = 0            # longer than the interface sends, or of another link type
    refused: int = 0
    seconds: float = 0.0
    why: str = ""

    def summary(self, iface: str) -> str:
        rate = self.sent / self.seconds if self.seconds > 0 else 0.0
        mbit = self.bytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0
        line = (f"sent {self.sent} frames ({self.bytes} bytes) out of {iface} in "
                f"{self.seconds:.3f} s: {rate:,.0f} frames/s, {mbit:,.1f} Mbit/s")
        if self.skipped or self.refused:
            line += f"; not sent: {self.skipped + self.refused} ({self.why})"
        return line


def _fits(iface_linktype: int, file_linktype: int) -> bool:
    return iface_linktype == file_linktype or {iface_linktype, file_linktype} <= RAW


def replay(server: str, client: str, iface: str, files: list[str], *, speed: float | None = 1.0,
           pps: float | None = None, loops: int = 1) -> Replayed:
    """Sends the files' frames out of `iface`, each file `loops` times (0:
    for ever): paced by their timestamps at `speed` times real time, or at
    `pps` frames a second, or (both None) as fast as they go."""
    if loops < 0:
        raise ValueError("--loop must be 0 (for ever) or more")
    if speed is not None and not 1e-6 <= speed <= 1e6:
        raise ValueError("--speed must be between 1e-6 and 1e6")
    if pps is not None and not 0 < pps <= 1e9:
        raise ValueError("--pps must be above 0")
    for path in files:
        _open(path)         # a missing or unreadable file is refused before anything is sent
    with connect(server, client) as c:
        names = [i.name for i in c.ifaces]
        if iface not in names:
            raise ValueError(f"broker {server!r} has no interface {iface!r} "
                             f"({', '.join(names)})")
        i = names.index(iface)
        tx_info = c.stats().sources[i].tx
        if tx_info is None:
            raise PktipcError(f"broker {server!r} does not send on {iface} "
                              f"(serve -i {iface} --tx)")
        size = min(lib.PKTIPC_TX_MAX_FRAME_SIZE, -(-(tx_info.max_len + 4) // 64) * 64)
        return _Replay(c, i, size, speed, pps).run(files, loops, c.ifaces[i].linktype)


class _Replay:
    def __init__(self, client: Client, iface: int, frame_size: int, speed: float | None,
                 pps: float | None) -> None:
        self.client = client
        self.iface = iface
        self.tx = client.tx(frames=FRAMES, frame_size=frame_size, batch=BATCH)
        self.max_len = self.tx.max_len[iface]
        self.pacer = Pacer(speed) if speed is not None else None
        self.pps = pps
        self.slab = bytearray(SLAB)
        self.fill = ffi.new("struct pkb_fill *")
        self.out = Replayed()
        self.start = 0.0

    def run(self, files: list[str], loops: int, linktype: int) -> Replayed:
        tx, out = self.tx, self.out
        n = 0
        while loops == 0 or n < loops:
            n += 1
            for path in files:
                src = _open(path)
                if not _fits(linktype, int(lib.pkb_src_linktype(src))):
                    raise SourceError(f"{path}: link type {lib.pkb_src_linktype(src)}, the "
                                      f"interface's is {linktype}")
                if self.pacer is not None:
                    self.pacer.reset()
                self._file(path, src)
        try:
            tx.flush()
        except Refused:
            pass            # counted below, with the first reason
        out.seconds = time.monotonic() - self.start if self.start else 0.0
        out.refused = tx.refused
        out.sent -= tx.refused
        if tx.errors:
            out.why = tx.errors[0]
        elif out.skipped:
            out.why = f"longer than {self.client.ifaces[self.iface].name} sends"
        return out

    def _file(self, path: str, src: Any) -> None:
        tx, fill, out = self.tx, self.fill, self.out
        buf = ffi.from_buffer(self.slab)
        while True:
            if not tx.free:
                tx._submit()
                self.client._poll_tx(None, until=lambda: tx.free > 0)
            now = time.monotonic()
            most, limit = tx.free, NO_LIMIT
            if self.pacer is not None:
                limit = self.pacer.limit(now, int(lib.pkb_src_peek_ts(src)))
            elif self.pps is not None:
                if not self.start:
                    self.start = now
                most = min(most, int((now - self.start) * self.pps) + 1 - self._done())
                if most <= 0:
                    self._sleep(self.start + self._done() / self.pps)
                    continue
            lib.pkb_fill_begin(fill, buf, SLAB, 0)
            status = lib.pkb_src_fill(src, fill, limit, most)
            if fill.count:
                if not self.start:
                    self.start = now
                placed, nbytes, skipped = tx._put(buf, fill.count, self.iface)
                out.sent += placed
                out.skipped += skipped
                out.bytes += nbytes
                if self.pacer is not None or self.pps is not None:
                    tx._submit()        # paced: each frame goes when due
            if status == lib.PKB_FILL_EOF:
                return
            if status == lib.PKB_FILL_ERROR:
                msg = ffi.string(lib.pkb_src_error(src)).decode(errors="replace")
                raise SourceError(f"{path}: {msg}")
            if status == lib.PKB_FILL_TOOBIG:
                raise SourceError(f"{path}: a frame longer than {SLAB} bytes")
            if status == lib.PKB_FILL_LIMIT:
                assert self.pacer is not None
                self._sleep(self.pacer.due(int(lib.pkb_src_peek_ts(src))))

    def _done(self) -> int:
        return self.out.sent + self.out.skipped

    def _sleep(self, until: float) -> None:
        """Waits until `until`, hearing the broker meanwhile."""
        self.client._poll_tx(max(0.0, until - time.monotonic()), until=None)
