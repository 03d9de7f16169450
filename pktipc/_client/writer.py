"""Writing what a client receives as pcap (nanosecond) or pcapng files: one
file (CaptureWriter), or a rolling set of them (RollingWriter). The records
are built in C (engine/capwrite.c), one call per batch."""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import metadata
from typing import Any, BinaryIO

import numpy as np

from .._errors import PktipcError
from .._layout import Iface
from .._shm import ffi, lib

PCAP_NS_MAGIC = 0xA1B23C4D
PCAP_US_MAGIC = 0xA1B2C3D4
PCAP_TS_END = (1 << 32) * 1_000_000_000   # pcap seconds are an unsigned 32-bit count
MAX_COMMENT = 256                  # bytes of a block's comment kept
_DIR_MASK, _DIR_SHIFT = lib.PKTIPC_F_DIR_MASK, lib.PKTIPC_F_DIR_SHIFT

# pcapng: block types and option codes (draft-ietf-opsawg-pcapng)
_SHB, _IDB, _ISB = 0x0A0D0D0A, 1, 5
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_TSRESOL = 2, 9
_ISB_STARTTIME, _ISB_ENDTIME, _ISB_IFRECV, _ISB_IFDROP = 2, 3, 4, 5
_ISB_FILTERACCEPT, _ISB_OSDROP, _ISB_USRDELIV = 6, 7, 8
# An interface statistics block at its largest: header, interface, time,
# a comment, two times, five counters, end of options, trailer.
ISB_MAX = 8 + 12 + 4 + MAX_COMMENT + 2 * 12 + 5 * 12 + 4 + 4


def pcap_header(linktype: int, snaplen: int, micro: bool = False) -> bytes:
    """A classic pcap file header, little-endian, of nanosecond (or
    microsecond) timestamps."""
    return struct.pack("<IHHiIII", PCAP_US_MAGIC if micro else PCAP_NS_MAGIC, 2, 4, 0, 0,
                       snaplen, linktype)


def records(fmt: int, desc: np.ndarray[Any, Any], slab: Any, idx: np.ndarray[Any, Any],
            out: bytearray, size: int, *, snaplen: int = 0,
            ids: np.ndarray[Any, Any] | None = None) -> memoryview:
    """The records of packets idx (uint32) of a batch, built in C in one
    call (engine/capwrite.c, capw_records): `fmt` lib.CAPW_PCAP (nanosecond
    pcap), CAPW_PCAP_US (microsecond pcap) or CAPW_PCAPNG (of interfaces
    `ids`); with `snaplen`, at most that many bytes of each packet, the wire
    length kept. `size` is their size, exactly; they go in `out` (at least
    that long), whose first `size` bytes are returned. Times are the
    caller's to check first (a format refuses those it cannot hold)."""
    # Released on the way out, exception or not: the batch releases its
    # views, the slab's included, and an export left alive would stop it.
    with ffi.from_buffer("uint8_t[]", slab) as src, \
            ffi.from_buffer("uint8_t[]", out, require_writable=True) as buf:
        got = lib.capw_records(fmt, snaplen, buf, size, src, len(src),
                               ffi.from_buffer("struct pktipc_pkt[]", desc),
                               ffi.from_buffer("uint32_t[]", idx), len(idx),
                               ffi.NULL if ids is None else ffi.from_buffer("uint32_t[]", ids))
    if got != size:
        raise PktipcError("a packet's descriptor points outside its batch")
    return memoryview(out)[:size]


def _when(ts_ns: int) -> str:
    return (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=ts_ns // 1000)
            ).strftime("%Y-%m-%d %H:%M:%S UTC")


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _text(s: str) -> bytes:
    """UTF-8, cut at MAX_COMMENT bytes without splitting a character."""
    return s.encode()[:MAX_COMMENT].decode(errors="ignore").encode()


def _block(btype: int, body: bytes, options: list[bytes]) -> bytes:
    opts = b"".join(options) + (_option(_OPT_END, b"") if options else b"")
    size = 12 + len(body) + len(opts)
    return struct.pack("<II", btype, size) + body + opts + struct.pack("<I", size)


def _ts(ns: int) -> bytes:
    return struct.pack("<II", ns >> 32, ns & 0xFFFFFFFF)


def _version() -> str:
    try:
        return metadata.version("pktipc")
    except metadata.PackageNotFoundError:
        return "?"


@dataclass
class IfaceStats:
    """What an interface statistics block says of one source over a file.
    None: not known (the option is left out)."""

    received: int | None = None      # isb_ifrecv: packets the source saw
    dropped: int | None = None       # isb_ifdrop: lost on the way, every stage
    os_dropped: int | None = None    # isb_osdrop: lost by the kernel
    accepted: int | None = None      # isb_filteraccept: passed the filter
    delivered: int | None = None     # isb_usrdeliv: written to the file
    comment: str | None = None


@dataclass
class _Write:
    """The last batch written, and the counts before it."""

    size: int
    ends: np.ndarray[Any, Any]          # where each record ends, from `size`
    sel: np.ndarray[Any, Any]           # its descriptors
    packets: int
    data_bytes: int
    delivered: np.ndarray[Any, Any]
    first_ns: int | None
    last_ns: int | None


class CaptureWriter:
    """Writes batches to `out`. What a format cannot hold is refused with
    PktipcError, never written otherwise: pcap holds one link type per file
    and times from 1970 to 2106 (its seconds are an unsigned 32-bit count);
    pcapng times from 1970 on. pcapng names every source of `ifaces` in an
    interface description block up front (link type, snaplen, name,
    nanosecond resolution), so an empty stream is a valid file too; its
    packets carry their direction when it is known; `statistics()` ends a
    file with an interface statistics block per source.

    `size` counts the bytes written, all of them whole records: a write
    that fails (OSError) leaves `size` at the end of the last whole one."""

    def __init__(self, out: BinaryIO, ifaces: list[Iface], fmt: str = "pcap", *,
                 comment: str | None = None) -> None:
        if fmt not in ("pcap", "pcapng"):
            raise ValueError("format must be pcap or pcapng")
        self.out = out
        self.ifaces = ifaces
        self.fmt = fmt
        self.comment = comment
        self.packets = 0
        self.size = 0
        self.first_ns: int | None = None     # times of the first and last packet written
        self.last_ns: int | None = None
        self.delivered = np.zeros(len(ifaces), dtype=np.int64)   # packets written, by source
        self.data_bytes = 0                 # their captured bytes
        self.last_kept = 0                  # records of the last batch in the file
        self._last: _Write | None = None
        self._emitted = 0
        self._linktype: int | None = None
        self._idb: dict[int, int] = {}       # source << 16 | link type -> interface id
        self._keys = np.zeros(0, dtype=np.uint32)   # the same, as sorted arrays
        self._ids = np.zeros(0, dtype=np.uint32)
        self._started = False
        self._buf = bytearray()

    # -- sizes, for whoever splits batches between files --
    def header_size(self) -> int:
        """Bytes the file takes before its first packet."""
        return len(self._header(None)) if not self._started else 0

    def record_sizes(self, desc: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Bytes each packet of `desc` takes in the file (int64)."""
        caplen = desc["caplen"].astype(np.int64)
        if self.fmt == "pcap":
            return caplen + 16
        # epb_flags (12 bytes with the end of options) where the direction is known
        d = (desc["flags"] & _DIR_MASK) >> _DIR_SHIFT
        known = (d >= lib.PKTIPC_DIR_HOST) & (d <= lib.PKTIPC_DIR_OUTGOING)
        return 32 + caplen + (-caplen % 4) + np.where(known, 12, 0)

    def statistics_size(self) -> int:
        """The most statistics() may write."""
        return ISB_MAX * max(1, len(self.ifaces)) if self.fmt == "pcapng" else 0

    # -- writing --
    def _header(self, linktype: int | None) -> bytes:
        if self.fmt == "pcapng":
            opts = [_option(_SHB_USERAPPL, f"pktipc {_version()}".encode())]
            if self.comment:
                opts.insert(0, _option(_OPT_COMMENT, _text(self.comment)))
            parts = [_block(_SHB, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1), opts)]
            idb: dict[int, int] = {}
            for i, src in enumerate(self.ifaces):
                parts.append(self._idb_block(i, src.linktype, idb))
            return b"".join(parts)
        if linktype is None:
            linktype = self.ifaces[0].linktype if self.ifaces else 1
        snaplen = max((i.snaplen for i in self.ifaces if i.linktype == linktype), default=262144)
        return pcap_header(linktype, snaplen)

    def _idb_block(self, iface: int, linktype: int, idb: dict[int, int]) -> bytes:
        src = self.ifaces[iface] if iface < len(self.ifaces) else None
        name = (src.name if src else f"if{iface}").encode()[:255]
        body = struct.pack("<HHI", linktype, 0, src.snaplen if src else 0)
        idb[iface << 16 | linktype] = len(idb)
        return _block(_IDB, body, [_option(_IF_NAME, name), _option(_IF_TSRESOL, b"\x09")])

    def _start(self, linktype: int | None) -> None:
        head = self._header(linktype)
        self._emit(head)
        self._started = True
        if self.fmt == "pcapng":
            self._idb = {i << 16 | src.linktype: i for i, src in enumerate(self.ifaces)}
            self._index()
        else:
            self._linktype = linktype if linktype is not None else (
                self.ifaces[0].linktype if self.ifaces else 1)

    def _index(self) -> None:
        keys = np.array(sorted(self._idb), dtype=np.uint32)
        self._keys, self._ids = keys, np.array([self._idb[k] for k in keys.tolist()],
                                               dtype=np.uint32)

    def _emit(self, data: bytes | bytearray | memoryview) -> None:
        """Writes all of `data` (raw files may take less at a time); on
        OSError, `_emitted` says how much went in."""
        view = memoryview(data)
        self._emitted = 0
        while self._emitted < view.nbytes:
            n = self.out.write(view[self._emitted:])
            if n is None:
                raise BlockingIOError(errno.EAGAIN, "the output would block")
            self._emitted += n
        self.size += view.nbytes

    def _interface_ids(self, desc: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """Each packet's interface id; a block first for a (source, link
        type) not named yet."""
        keys = desc["iface"].astype(np.uint32) << 16 | desc["linktype"].astype(np.uint32)
        one = int(keys[0])
        if one in self._idb and (keys == one).all():       # the common case: one source
            return np.full(len(keys), self._idb[one], dtype=np.uint32)
        pos = np.searchsorted(self._keys, keys)
        known = (pos < len(self._keys)) & (self._keys[np.minimum(pos, len(self._keys) - 1)]
                                           == keys) if len(self._keys) else np.zeros(
                                               len(keys), dtype=bool)
        if not known.all():
            for k in np.unique(keys[~known]).tolist():
                self._emit(self._idb_block(k >> 16, k & 0xFFFF, self._idb))
            self._index()
            pos = np.searchsorted(self._keys, keys)
        return np.ascontiguousarray(self._ids[pos])

    def write(self, desc: np.ndarray[Any, Any], slab: Any,
              idx: np.ndarray[Any, Any] | None = None) -> None:
        """Writes packets idx (all of them if None) of a batch: `desc` its
        descriptors, `slab` the bytes they index (Batch.buffer()). A packet
        the format cannot hold is refused (PktipcError) once those before it
        are written."""
        idx, sel = self._select(desc, idx)
        if not len(idx):
            return
        if not self._started:
            self._start(int(sel["linktype"][0]))
        ts = sel["ts_ns"]
        bad = (ts < 0) | (ts >= PCAP_TS_END) if self.fmt == "pcap" else ts < 0
        n = int(np.argmax(bad)) if bad.any() else len(sel)
        if self.fmt == "pcap":
            other = sel["linktype"][:n] != self._linktype
            if other.any():
                n = int(np.argmax(other))
                self._records(desc, slab, idx[:n], sel[:n])
                lt = int(sel["linktype"][n])
                raise PktipcError(f"a packet of link type {lt} cannot go into a pcap file of "
                                  f"link type {self._linktype}; use --format pcapng")
        self._records(desc, slab, idx[:n], sel[:n])
        if n < len(sel):
            t = int(ts[n])
            when = "before 1970" if t < 0 else "past 2106-02-07 06:28:15 UTC"
            hint = " (use --format pcapng)" if t >= 0 else ""
            raise PktipcError(f"packet {self.packets + 1}: its time, {_when(t)}, is {when}: "
                              f"a {self.fmt} file cannot hold it{hint}")

    @staticmethod
    def _select(desc: np.ndarray[Any, Any], idx: np.ndarray[Any, Any] | None
                ) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """idx as C reads it, and the descriptors it names (`desc` itself,
        not a copy, when it names them all, in order)."""
        if idx is None:
            return np.arange(len(desc), dtype=np.uint32), desc
        idx = np.ascontiguousarray(idx, dtype=np.uint32)
        n = len(idx)
        if n == len(desc) and n and idx[0] == 0 and idx[-1] == n - 1 and (
                n < 3 or bool((np.diff(idx) == 1).all())):
            return idx, desc
        return idx, desc[idx]

    def _records(self, desc: np.ndarray[Any, Any], slab: Any, idx: np.ndarray[Any, Any],
                 sel: np.ndarray[Any, Any]) -> None:
        n = len(idx)
        if not n:
            return
        ids = self._interface_ids(sel) if self.fmt == "pcapng" else None
        fmt = lib.CAPW_PCAPNG if self.fmt == "pcapng" else lib.CAPW_PCAP
        ends = np.cumsum(self.record_sizes(sel))
        total = int(ends[-1])
        if len(self._buf) < total:
            self._buf = bytearray(total)
        data = records(fmt, desc, slab, idx, self._buf, total, ids=ids)
        self._last = _Write(self.size, ends, sel, self.packets, self.data_bytes,
                            self.delivered.copy(), self.first_ns, self.last_ns)
        try:
            self._emit(data)
        except OSError:
            # What went in whole stays counted; the caller truncates the rest.
            self.keep_records(int(np.searchsorted(ends, self._emitted, side="right")))
            raise
        self.keep_records(n)

    def keep_records(self, k: int) -> None:
        """Counts only the first k records of the last batch written as in
        the file (`size` and the counts go back to their end): for a caller
        that truncates the file there after a failed write."""
        w = self._last
        if w is None:
            return
        k = min(k, len(w.sel))
        sel = w.sel[:k]
        self.size = w.size + (int(w.ends[k - 1]) if k else 0)
        self.packets = w.packets + k
        self.data_bytes = w.data_bytes + int(sel["caplen"].sum())
        per = np.bincount(sel["iface"], minlength=len(w.delivered))
        self.delivered = np.zeros(len(per), dtype=np.int64)
        self.delivered[: len(w.delivered)] = w.delivered
        self.delivered += per
        self.first_ns, self.last_ns = w.first_ns, w.last_ns
        if k:
            ts = sel["ts_ns"]
            first, last = int(ts.min()), int(ts.max())
            self.first_ns = first if w.first_ns is None else min(w.first_ns, first)
            self.last_ns = last if w.last_ns is None else max(w.last_ns, last)
        self.last_kept = k

    def statistics(self, stats: dict[int, IfaceStats], start_ns: int, end_ns: int) -> None:
        """pcapng: an interface statistics block for each source of `stats`
        (by source index) that the file names, over [start_ns, end_ns]
        (wall-clock times). Nothing for pcap, which has no place for them."""
        if self.fmt != "pcapng":
            return
        if not self._started:
            self._start(None)
        named: dict[int, int] = {}
        for key, ifid in sorted(self._idb.items(), key=lambda kv: kv[1]):
            named.setdefault(key >> 16, ifid)
        parts = []
        for src, st in sorted(stats.items()):
            if src not in named:
                continue
            opts = [_option(_OPT_COMMENT, _text(st.comment))] if st.comment else []
            opts += [_option(_ISB_STARTTIME, _ts(start_ns)), _option(_ISB_ENDTIME, _ts(end_ns))]
            for code, v in ((_ISB_IFRECV, st.received), (_ISB_IFDROP, st.dropped),
                            (_ISB_FILTERACCEPT, st.accepted), (_ISB_OSDROP, st.os_dropped),
                            (_ISB_USRDELIV, st.delivered)):
                if v is not None:
                    opts.append(_option(code, struct.pack("<Q", v)))
            parts.append(_block(_ISB, struct.pack("<I", named[src]) + _ts(end_ns), opts))
        self._emit(b"".join(parts))

    def finish(self) -> None:
        """Makes sure the file has its header even when no packet came."""
        if not self._started:
            self._start(None)
        self.out.flush()


class CaptureFilter:
    """A filter in tcpdump syntax, compiled by libpcap for each link type it
    meets, run in C over a batch's packets as they are (VLAN tags in the
    bytes, as in a file)."""

    def __init__(self, expr: str, snaplen: int = 262144) -> None:
        self.expr = expr
        self.snaplen = snaplen
        self._progs: dict[int, Any] = {}

    def _prog(self, linktype: int) -> Any:
        prog = self._progs.get(linktype)
        if prog is None:
            err = ffi.new("char[]", lib.CAPW_ERRBUF_SIZE)
            raw = lib.capw_filter_new(linktype, self.snaplen, self.expr.encode(), err)
            if raw == ffi.NULL:
                raise ValueError(ffi.string(err).decode(errors="replace"))
            prog = self._progs[linktype] = ffi.gc(raw, lib.capw_filter_free)
        return prog

    def check(self, linktypes: list[int]) -> None:
        """Compiles the filter for these link types now: ValueError with
        libpcap's message if it does not compile."""
        for lt in linktypes:
            self._prog(lt)

    def select(self, desc: np.ndarray[Any, Any], slab: Any,
               idx: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """The indexes among `idx` of the packets the filter accepts."""
        idx = np.ascontiguousarray(idx, dtype=np.uint32)
        lts = desc["linktype"][idx]
        out = np.empty(len(idx), dtype=np.uint32)
        pkts = ffi.from_buffer("struct pktipc_pkt[]", desc)
        parts: list[np.ndarray[Any, Any]] = []
        for lt in np.unique(lts).tolist():
            part = idx if len(parts) == 0 and (lts == lt).all() else \
                np.ascontiguousarray(idx[lts == lt])
            with ffi.from_buffer("uint8_t[]", slab) as src:      # see _records
                k = lib.capw_filter_run(self._prog(lt), src, len(src), pkts,
                                        ffi.from_buffer("uint32_t[]", part), len(part),
                                        ffi.from_buffer("uint32_t[]", out,
                                                        require_writable=True))
            if k < 0:
                raise PktipcError("a packet's descriptor points outside its batch")
            parts.append(out[:k].copy())
        return np.sort(np.concatenate(parts)) if len(parts) > 1 else (
            parts[0] if parts else idx[:0])


class WriteFailed(PktipcError):
    """A file could not be written (disk full, directory gone, ...); what was
    written before stays a complete file."""


@dataclass
class FileInfo:
    """One file of a RollingWriter; times are wall-clock nanoseconds."""

    name: str
    number: int                     # 1, 2, ... in the order opened
    opened_ns: int
    closed_ns: int | None = None
    packets: int = 0
    size: int = 0
    first_ns: int | None = None     # times of its first and last packet
    last_ns: int | None = None


class RollingWriter:
    """Packets into a sequence of files, each a complete capture file on its
    own. A file is closed, and the next one opened, when the next packet
    would take it past `max_size` bytes (its closing statistics included: a
    file never passes it, unless one packet alone does), or once it has
    been open `max_age` seconds. What the files are called and what becomes
    of them is the caller's: `open_file(number, now_ns)` opens the next one
    (a binary file, raw or buffered, and its name); `statistics(info,
    writer)` gives what a pcapng file's interface statistics blocks say as
    it closes; `opened(info)` and `closed(info)` hear of each file.

    A write that fails (disk full, directory removed) ends the current file
    where its last whole record ends, with its statistics if they still
    fit, and raises WriteFailed; nothing more is written after it."""

    def __init__(self, open_file: Callable[[int, int], tuple[BinaryIO, str]],
                 ifaces: list[Iface], fmt: str = "pcapng", *,
                 max_size: int | None = None, max_age: float | None = None,
                 comment: str | None = None,
                 statistics: Callable[[FileInfo, CaptureWriter], dict[int, IfaceStats]]
                 | None = None,
                 opened: Callable[[FileInfo], None] | None = None,
                 closed: Callable[[FileInfo], None] | None = None,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.open_file = open_file
        self.ifaces = ifaces
        self.fmt = fmt
        self.max_size = max_size
        self.max_age_ns = None if max_age is None else int(max_age * 1e9)
        self.comment = comment
        self.statistics = statistics
        self.opened, self.closed = opened, closed
        self.clock = clock
        self.number = 0
        self.packets = 0                # written, every file
        self.data_bytes = 0             # their captured bytes
        self.current: FileInfo | None = None
        self.writer: CaptureWriter | None = None
        self._out: BinaryIO | None = None
        self.failed: WriteFailed | None = None

    def start(self) -> None:
        """Opens the first file (so that a stream with no packet still makes one)."""
        self._open()

    def _open(self) -> None:
        if self.failed is not None:
            raise self.failed
        now = self.clock()
        self.number += 1
        try:
            self._out, name = self.open_file(self.number, now)
        except OSError as e:
            self.failed = WriteFailed(f"{e.filename or 'next file'}: {e.strerror}")
            raise self.failed from None
        self.current = FileInfo(name=name, number=self.number, opened_ns=now)
        self.writer = CaptureWriter(self._out, self.ifaces, self.fmt, comment=self.comment)
        if self.opened is not None:
            self.opened(self.current)
        self._guard(self.writer.finish)     # the header, at once

    def _guard(self, step: Callable[[], None]) -> None:
        """Runs a step that writes; a failure ends the file cleanly."""
        try:
            step()
        except OSError as e:
            self._salvage(e)

    def _salvage(self, e: OSError) -> None:
        """Ends the file at its last whole record, with its statistics if
        there is room for them: a few of the last batch's records give
        theirs up if needed."""
        info, w, out = self.current, self.writer, self._out
        assert info is not None and w is not None and out is not None
        self.failed = WriteFailed(f"{info.name}: {e.strerror}")
        keep, step = w.last_kept, 1
        while True:
            try:
                os.ftruncate(out.fileno(), w.size)
                out.seek(w.size)
                if w.size:
                    self._end_file(now=self.clock())
                break
            except OSError:
                if keep == 0:
                    try:        # no room even for them: it ends at its last record
                        os.ftruncate(out.fileno(), w.size)
                    except OSError:
                        pass
                    self._sync(info, w)
                    break
                keep, step = max(0, keep - step), step * 4
                w.keep_records(keep)
        self._close_out()
        raise self.failed from None

    def _end_file(self, now: int) -> None:
        info, w = self.current, self.writer
        assert info is not None and w is not None
        if self.statistics is not None:
            w.statistics(self.statistics(info, w), info.opened_ns, now)
        w.out.flush()
        self._sync(info, w)
        info.closed_ns = now

    def sync(self) -> None:
        """Brings `current` up to date with what is written."""
        if self.current is not None and self.writer is not None:
            self._sync(self.current, self.writer)

    @staticmethod
    def _sync(info: FileInfo, w: CaptureWriter) -> None:
        info.packets, info.size = w.packets, w.size
        info.first_ns, info.last_ns = w.first_ns, w.last_ns

    def _close_out(self) -> None:
        out, info = self._out, self.current
        self._out = self.writer = self.current = None
        if out is not None:
            try:
                out.close()
            except OSError:
                pass
        if info is not None and self.closed is not None:
            self.closed(info)

    def _close(self) -> None:
        if self.current is None:
            return
        self._guard(lambda: self._end_file(now=self.clock()))
        self._close_out()

    def rotate(self) -> None:
        """Closes the current file and opens the next."""
        self._close()
        self._open()

    def tick(self) -> None:
        """Rotates by age, packets or not."""
        if (self.current is not None and self.max_age_ns is not None
                and self.clock() - self.current.opened_ns >= self.max_age_ns):
            self.rotate()

    def write(self, desc: np.ndarray[Any, Any], slab: Any,
              idx: np.ndarray[Any, Any] | None = None) -> None:
        """Writes packets idx of a batch (see CaptureWriter.write), across
        as many files as the bounds make it."""
        if self.current is None:
            self._open()
        self.tick()
        if idx is None:
            idx = np.arange(len(desc), dtype=np.uint32)
        if self.max_size is None:
            self._write(desc, slab, idx)
            return
        w = self.writer
        assert w is not None
        idx, sel = w._select(desc, idx)
        sizes = w.record_sizes(sel)
        if w.size + int(sizes.sum()) <= self.max_size - w.statistics_size():
            self._write(desc, slab, idx)        # the common case: it all fits
            return
        sizes = np.cumsum(sizes)
        start, done = 0, 0
        while start < len(idx):
            w = self.writer
            assert w is not None
            room = self.max_size - w.size - w.header_size() - w.statistics_size()
            k = int(np.searchsorted(sizes[start:] - done, room, side="right"))
            if k == 0 and w.packets == 0:
                k = 1               # larger than a file: alone in one
            if k:
                self._write(desc, slab, idx[start : start + k])
                done = int(sizes[start + k - 1])
                start += k
            if start < len(idx):
                self.rotate()

    def _write(self, desc: np.ndarray[Any, Any], slab: Any, idx: np.ndarray[Any, Any]) -> None:
        w, info = self.writer, self.current
        assert w is not None and info is not None
        before, data_before = w.packets, w.data_bytes
        try:
            self._guard(lambda: w.write(desc, slab, idx))
        finally:
            self.packets += w.packets - before
            self.data_bytes += w.data_bytes - data_before
            self._sync(info, w)

    def close(self) -> None:
        """Ends the current file (its statistics, then closed); idempotent."""
        self._close()


class ClientTally:
    """What the interface statistics blocks of a client's files say, each
    over its own file: per source, the packets it saw (the kernel's count on
    an interface) and the packets lost on the way, by stage: the kernel's
    (that source's), the broker's and the client's own (skipped while it
    lagged, `drop` policy). With one source all three are that source's
    drops (isb_ifdrop); with several, the broker's and the client's belong
    to no single source and are said in the comment only. A file that spans
    a broker restart counts the old broker's packets up to the last batch
    seen and says so.

    Call opened() and statistics() as RollingWriter does, and seen() after
    each batch. `who` names the client in comments ("recording")."""

    def __init__(self, client: Any, who: str = "client") -> None:
        self.client = client
        self.who = who
        self.own_drops = 0              # packets the broker skipped for this client, ever
        self._base: dict[str, Any] = {}
        self._last: dict[str, Any] = {}
        self._own_base = 0

    def seen(self) -> None:
        gaps = self.client.gaps
        if gaps:
            self.own_drops += sum(end - start for start, end in gaps)
            gaps.clear()
        self._last = self.client.segment_counters()

    def opened(self, info: FileInfo) -> None:
        self.seen()
        self._base = self._last
        self._own_base = self.own_drops

    def statistics(self, info: FileInfo, writer: CaptureWriter) -> dict[int, IfaceStats]:
        last = self._last
        self.seen()
        restarted = self._last["epoch"] != self._base["epoch"]
        end = last if restarted else self._last
        base = self._base
        broker = end["broker"]["broker_drops"] - base["broker"]["broker_drops"]
        own = self.own_drops - self._own_base
        single = len(end["sources"]) == 1
        out = {}
        for i, (b, e) in enumerate(zip(base["sources"], end["sources"], strict=False)):
            kernel = e["kernel_drops"] - b["kernel_drops"] if e["live"] else 0
            received = (e["kernel_packets"] - b["kernel_packets"] if e["live"]
                        else e["packets"] - b["packets"])
            note = (f"pktipc: drops: kernel {kernel}, broker {broker}, {self.who} {own}"
                    + ("" if single else f" (the broker's and the {self.who}'s are of all "
                       "sources)"))
            if restarted:
                note += ("; the broker restarted: what it captured after the last batch "
                         f"the {self.who} saw is not counted, nor here")
            out[i] = IfaceStats(
                received=received, dropped=kernel + (broker + own if single else 0),
                os_dropped=kernel if e["live"] else None,
                delivered=int(writer.delivered[i]) if i < len(writer.delivered) else 0,
                comment=note)
        return out


class RotationLimit(PktipcError):
    """The last file a set of files may have is complete (tcpdump's -G with -W)."""


class TcpdumpFiles:
    """The files of `tcpdump -w FILE` with -C (by size), -G (every so many
    seconds) and -W: FILE, its strftime() conversions expanded with -G;
    with -C a number follows it, FILE, FILE1, FILE2, ... or, with -W N,
    FILE0 to FILE<N-1> (zero-padded to N-1's width) over again, the oldest
    overwritten; -G with -W N and no -C: N files, then RotationLimit. A new
    -G period starts the numbers again. Use open() as RollingWriter's
    open_file."""

    def __init__(self, pattern: str, *, by_size: bool, every: float | None = None,
                 ring: int | None = None) -> None:
        self.pattern, self.by_size, self.every, self.ring = pattern, by_size, every, ring
        self.digits = len(str(ring - 1)) if ring and ring > 1 else 0
        self.period_start = 0
        self.periods = 0
        self.count = 0

    def name(self, number: int, now_ns: int) -> str:
        if number == 1 or (self.every is not None
                           and now_ns - self.period_start >= self.every * 1e9):
            self.period_start, self.count = now_ns, 0
            self.periods += 1
            if number > 1 and self.ring and not self.by_size and self.periods > self.ring:
                raise RotationLimit(f"maximum file limit reached: {self.ring}")
        else:
            self.count = (self.count + 1) % self.ring if self.ring else self.count + 1
        stem = (time.strftime(self.pattern, time.localtime(self.period_start / 1e9))
                if self.every is not None else self.pattern)
        if not self.by_size or (self.count == 0 and self.digits == 0):
            return stem
        return f"{stem}{self.count:0{self.digits}d}"

    def open(self, number: int, now_ns: int) -> tuple[BinaryIO, str]:
        name = self.name(number, now_ns)
        return open(name, "wb", buffering=0), name
