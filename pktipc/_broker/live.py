"""Live capture: one AF_PACKET TPACKET_V3 ring per interface, drained in C
a slab at a time."""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any

from .._errors import PermissionDenied, SourceError
from .._layout import Iface, Segment
from .._shm import ffi, lib
from .sources import Produced, Status

FANOUT_MODES = {"hash": 0, "lb": 1, "cpu": 2, "rnd": 4, "qm": 5}   # PACKET_FANOUT_*
FANOUT_AUTO = lib.PKB_FANOUT_AUTO
FANOUT_NONE = lib.PKB_FANOUT_NONE
DEFAULT_BLOCK_SIZE = 1 << 20
DEFAULT_BLOCK_COUNT = 32
DEFAULT_BLOCK_TIMEOUT_MS = 10
DEFAULT_SNAPLEN = 262144      # tcpdump's


@dataclass(frozen=True)
class LiveOptions:
    interfaces: list[str]
    filter: str = ""
    snaplen: int = DEFAULT_SNAPLEN
    block_size: int = DEFAULT_BLOCK_SIZE
    block_count: int = DEFAULT_BLOCK_COUNT
    block_timeout_ms: int = DEFAULT_BLOCK_TIMEOUT_MS
    promisc: bool = True
    vlan_reinsert: bool = True
    hw_timestamps: bool = False
    fanout: int | None = None      # None: no fanout; FANOUT_AUTO: an id the kernel picks
    fanout_mode: str = "hash"

    def check(self) -> None:
        if not self.interfaces:
            raise SourceError("no interface given")
        if len(set(self.interfaces)) != len(self.interfaces):
            raise SourceError("an interface is given twice")
        if not 1 <= self.snaplen <= DEFAULT_SNAPLEN:
            raise ValueError(f"-s SNAPLEN must be between 1 and {DEFAULT_SNAPLEN}")
        page = os.sysconf("SC_PAGE_SIZE")
        bs = self.block_size
        if bs < page or bs & (bs - 1) or bs > 1 << 30:
            raise ValueError(f"--block-size must be a power of two from {page} bytes to 1 GiB")
        if not 2 <= self.block_count <= 65536:
            raise ValueError("--blocks must be between 2 and 65536")
        if not 1 <= self.block_timeout_ms <= 60000:
            raise ValueError("--block-timeout must be between 1 and 60000 ms")
        if self.fanout_mode not in FANOUT_MODES:
            raise ValueError(f"--fanout-mode must be one of {', '.join(FANOUT_MODES)}")
        if self.fanout == FANOUT_AUTO and len(self.interfaces) > 1:
            raise ValueError("--fanout without an ID takes one interface: with several, "
                             "give an ID (interface k joins group ID+k)")
        if self.fanout is not None and self.fanout != FANOUT_AUTO:
            if not 0 <= self.fanout <= self.fanout + len(self.interfaces) - 1 <= 0xFFFF:
                raise ValueError("--fanout ID must be between 0 and 65535")


class LiveSource:
    """The rings of every interface, opened (and filtered) when made, so that
    a bad interface, filter or privilege is refused before the broker starts.
    Interface i is entry i of the interface table; with --fanout ID, it joins
    group ID + i (the kernel keeps one group to one interface)."""

    default_policy = "drop"             # a stalled client costs only itself
    default_wait_clients = 0
    pauses_without_clients = False      # packets not read are kernel drops
    frame_size = frame_count = 0       # frames are copied into slabs
    short = False

    def __init__(self, opts: LiveOptions) -> None:
        opts.check()
        self.opts = opts
        self.rings: list[Any] = []
        self.ifaces: list[Iface] = []
        self.fanout_ids: list[int] = []
        errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
        err = ffi.new("int *")
        for i, name in enumerate(opts.interfaces):
            fanout = opts.fanout if opts.fanout in (None, FANOUT_AUTO) else opts.fanout + i
            # The strings must outlive the call: the struct only points at them.
            c_name, c_filter = ffi.new("char[]", name.encode()), ffi.new("char[]",
                                                                         opts.filter.encode())
            o = ffi.new("struct pkb_ring_opts *", {
                "ifname": c_name, "filter": c_filter,
                "snaplen": opts.snaplen, "block_size": opts.block_size,
                "block_count": opts.block_count, "block_timeout_ms": opts.block_timeout_ms,
                "fanout_id": FANOUT_NONE if fanout is None else fanout,
                "fanout_mode": FANOUT_MODES[opts.fanout_mode], "promisc": opts.promisc,
                "hw_timestamps": opts.hw_timestamps, "vlan_reinsert": opts.vlan_reinsert})
            ring = lib.pkb_ring_open(o, err, errbuf)
            if ring == ffi.NULL:
                self.close()
                msg = ffi.string(errbuf).decode(errors="replace")
                if err[0] == lib.PKB_RING_EPERM:
                    raise PermissionDenied(msg)
                raise SourceError(msg)
            self.rings.append(ffi.gc(ring, lib.pkb_ring_close))
            self.fanout_ids.append(int(lib.pkb_ring_fanout_id(ring)))
            self.ifaces.append(Iface(
                name=name, linktype=int(lib.pkb_ring_linktype(ring)), snaplen=opts.snaplen,
                kind=lib.PKTIPC_IFACE_LIVE, ifindex=int(lib.pkb_ring_ifindex(ring))))
        self.fds = [int(lib.pkb_ring_fd(r)) for r in self.rings]
        if opts.hw_timestamps and lib.pkb_ring_keep_timestamping(
                ffi.new("pkb_ring *[]", self.rings), len(self.rings), errbuf) < 0:
            self.close()
            raise SourceError(ffi.string(errbuf).decode(errors="replace"))
        self._first = 0             # the ring drained first, in turn, so none starves

    def produce(self, fill: Any, now: float) -> Produced:
        """Drains the rings into one slab, to be published once full or once
        the rings are empty."""
        status, added = self.fill(fill)
        if status == lib.PKB_FILL_TOOBIG:    # a block always fits a slab: a bug
            return Produced(Status.END, added, error="a frame does not fit an empty slab")
        return Produced(Status.FULL if status == lib.PKB_FILL_FULL else Status.IDLE, added)

    def bind(self, seg: Segment) -> None:
        pass

    def recycle(self, slab: int) -> None:
        pass

    def read_counters(self, entries: list[Any]) -> None:
        """Adds each ring's kernel counters since the last read to its entry
        (the kernel resets its own when read)."""
        for ring, entry in zip(self.rings, entries, strict=True):
            lib.pkb_ring_stats(ring, entry)

    def stats(self, i: int, entry: Any) -> dict[str, Any]:
        out = {"kind": "interface", "ifindex": self.ifaces[i].ifindex,
               "kernel_packets": int(entry.kernel_packets),
               "kernel_drops": int(entry.kernel_drops),
               "kernel_freezes": int(entry.kernel_freezes)}
        if self.opts.fanout is not None:
            out.update(fanout_id=self.fanout_ids[i], fanout_mode=self.opts.fanout_mode)
        return out

    def describe(self) -> str:
        what = "capturing on " + ", ".join(self.opts.interfaces)
        if self.opts.filter:
            what += f" (filter {self.opts.filter!r})"
        if self.opts.fanout is not None:
            what += f", fanout group {', '.join(map(str, self.fanout_ids))}"
        return what

    def fill(self, fill: Any,
             max_pkts: int = 0xFFFFFFFF) -> tuple[int, list[tuple[int, int, int]]]:
        """Drains the rings into `fill`'s slab, one C call per ring: the last
        status (PKB_FILL_FULL as soon as the slab is full, else EMPTY) and
        (interface, packets, bytes) added per ring."""
        added = []
        status = lib.PKB_FILL_EMPTY
        n = len(self.rings)
        self._first = (self._first + 1) % n
        for i in (*range(self._first, n), *range(self._first)):
            count, nbytes = fill.count, fill.bytes
            fill.iface = i
            status = lib.pkb_ring_fill(self.rings[i], fill, max_pkts)
            added.append((i, fill.count - count, fill.bytes - nbytes))
            if status != lib.PKB_FILL_EMPTY:
                break
        return status, added

    def error(self, i: int) -> str:
        """Why ring i's socket reports an error (the interface went down...)."""
        e = int(lib.pkb_ring_sock_error(self.rings[i]))
        name = self.opts.interfaces[i]
        if e == 0:
            return f"{name}: capture failed"
        if e == errno.ENETDOWN:
            return f"{name}: the interface went down"
        return f"{name}: {os.strerror(e)}"

    def close(self) -> None:
        for ring in self.rings:
            ffi.gc(ring, None)          # closed here, not again when collected
            lib.pkb_ring_close(ring)
        self.rings.clear()
