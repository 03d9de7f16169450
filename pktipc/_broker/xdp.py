"""Live capture through AF_XDP: one socket per receive queue, their UMEM the
segment's frame area, so that the kernel writes each frame where clients
read it and the broker, in C, writes a descriptor for it. A frame goes back
to the kernel when the slab that describes it is free again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._errors import PermissionDenied, SourceError
from .._layout import DESC_SIZE, Iface, Segment
from .._shm import ffi, lib
from .live import DEFAULT_BLOCK_TIMEOUT_MS, DEFAULT_SNAPLEN
from .sources import Produced, Status

MODES = {"native": lib.PKB_XDP_NATIVE, "skb": lib.PKB_XDP_SKB}
DEFAULT_FRAMES = 32768          # 64 MiB of 2 KiB frames
DEFAULT_SLAB_SIZE = 64 << 10    # slabs of descriptors alone: 2048 frames a batch
RING_SIZE = 16384               # entries of each fill and RX ring: 0.4 s at 40k/s
NAP = 0.001                     # frames are coming: read them again no sooner than this,
MAX_NAP = 0.01                  # and no later (an RX ring holds 10 ms of 1.6 M frames/s)


@dataclass(frozen=True)
class XdpOptions:
    interface: str
    queues: list[int] | None = None     # None: every receive queue
    mode: str = "native"
    zero_copy: bool = False             # refuse unless the driver does zero-copy
    filter: str = ""
    snaplen: int = DEFAULT_SNAPLEN
    promisc: bool = True
    frames: int = DEFAULT_FRAMES
    batch_timeout_ms: int = DEFAULT_BLOCK_TIMEOUT_MS

    def check(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--xdp-mode must be one of {', '.join(MODES)}")
        if not 1 <= self.snaplen <= DEFAULT_SNAPLEN:
            raise ValueError(f"-s SNAPLEN must be between 1 and {DEFAULT_SNAPLEN}")
        if not 256 <= self.frames <= 1 << 20:
            raise ValueError("--frames must be between 256 and 1048576")
        if not 1 <= self.batch_timeout_ms <= 60000:
            raise ValueError("--block-timeout must be between 1 and 60000 ms")
        if self.queues is not None and not all(0 <= q < 1 << 16 for q in self.queues):
            raise ValueError("--queues: queue numbers are from 0 to 65535")


class XdpSource:
    """The sockets of an interface's receive queues. The interface, the
    options, the filter and the privileges are checked, and the XDP program
    attached, when it is made; the sockets are opened by bind(), once the
    segment that holds their frames exists."""

    default_policy = "drop"             # a stalled client costs only itself
    default_wait_clients = 0
    pauses_without_clients = False      # frames not read are kernel drops

    def __init__(self, opts: XdpOptions) -> None:
        opts.check()
        self.opts = opts
        errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
        err = ffi.new("int *")
        queues = ffi.new("uint32_t[]", opts.queues or [0])
        c_name, c_filter = ffi.new("char[]", opts.interface.encode()), ffi.new(
            "char[]", opts.filter.encode())
        o = ffi.new("struct pkb_xdp_opts *", {
            "ifname": c_name, "filter": c_filter,
            "queues": ffi.NULL if opts.queues is None else queues,
            "queue_count": len(opts.queues or ()), "snaplen": opts.snaplen,
            "frame_size": 0, "frame_count": opts.frames, "ring_size": RING_SIZE,
            "mode": MODES[opts.mode], "zero_copy": opts.zero_copy, "promisc": opts.promisc})
        x = lib.pkb_xdp_open(o, err, errbuf)
        if x == ffi.NULL:
            msg = ffi.string(errbuf).decode(errors="replace")
            raise (PermissionDenied if err[0] == lib.PKB_XDP_EPERM else SourceError)(msg)
        self.xdp = ffi.gc(x, lib.pkb_xdp_close)
        self.frame_size = int(lib.pkb_xdp_frame_size(x))
        self.frame_count = opts.frames
        self.queues = [int(lib.pkb_xdp_queue(x, i)) for i in range(lib.pkb_xdp_queue_count(x))]
        self.ifaces = [Iface(name=opts.interface, linktype=1, snaplen=opts.snaplen,
                             kind=lib.PKTIPC_IFACE_LIVE, ifindex=int(lib.pkb_xdp_ifindex(x)))]
        self.fds: list[int] = []
        self._first_at = 0.0            # when the open slab got its first frame
        self._read_at = 0.0             # when the rings were last read

    def bind(self, seg: Segment) -> None:
        """Opens a socket per queue over the segment's frame area, and gives
        the kernel every frame."""
        g, frames, slabs = seg.geometry, seg.frames_ptr(), seg.slab_ptr(0)
        del seg         # a traceback must not keep the mapping from being closed
        errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
        err = ffi.new("int *")
        if lib.pkb_xdp_bind(self.xdp, frames, slabs, g.slab_size, g.slab_count, err,
                            errbuf) < 0:
            msg = ffi.string(errbuf).decode(errors="replace")
            raise (PermissionDenied if err[0] == lib.PKB_XDP_EPERM else SourceError)(msg)
        self.fds = [int(lib.pkb_xdp_fd(self.xdp, i)) for i in range(len(self.queues))]

    def produce(self, fill: Any, now: float) -> Produced:
        """Describes what the kernel placed. A slab is published once full,
        or once the --block-timeout since its first frame is over; until
        then it is filled again after a nap: about as long as, at the rate
        frames came since the rings were last read, it takes to fill the
        room left (each turn of the loop costs more than the frames it
        reads; the RX rings hold what comes meanwhile)."""
        before, nbytes = fill.count, fill.bytes
        fill.iface = 0
        status = lib.pkb_xdp_fill(self.xdp, fill, 0xFFFFFFFF)
        got = fill.count - before
        added = [(0, got, fill.bytes - nbytes)]
        since, self._read_at = now - self._read_at, now
        if status == lib.PKB_FILL_FULL:
            return Produced(Status.FULL, added)
        if before == 0 and fill.count:
            self._first_at = now
        due = self._first_at + self.opts.batch_timeout_ms / 1000
        if fill.count == 0 or now >= due:
            return Produced(Status.IDLE, added)
        room = fill.data_low // DESC_SIZE - fill.count
        nap = 0.9 * room * since / got if got else NAP
        return Produced(Status.HOLD, added, wake=min(now + min(max(nap, NAP), MAX_NAP), due))

    def recycle(self, slab: int) -> None:
        lib.pkb_xdp_recycle(self.xdp, slab)

    @property
    def short(self) -> bool:
        """The kernel is running out of frames: slabs hold them all."""
        return bool(lib.pkb_xdp_short(self.xdp))

    def read_counters(self, entries: list[Any]) -> None:
        """Adds what the kernel counted (XDP_STATISTICS) since the last read."""
        lib.pkb_xdp_stats(self.xdp, entries[0])

    def stats(self, i: int, entry: Any) -> dict[str, Any]:
        c = ffi.new("struct pkb_xdp_counts *")
        lib.pkb_xdp_counts(self.xdp, c)
        return {"kind": "interface", "ifindex": self.ifaces[0].ifindex,
                "kernel_packets": int(entry.kernel_packets),
                "kernel_drops": int(entry.kernel_drops),
                "kernel_freezes": int(entry.kernel_freezes),
                "xdp": {"mode": self.opts.mode, "zero_copy": bool(lib.pkb_xdp_zero_copy(
                            self.xdp)), "queues": self.queues,
                        "frame_size": self.frame_size, "frames": self.frame_count,
                        "frames_free": int(c.free_frames), "frames_held": int(c.held_frames),
                        "filtered": int(c.filtered), "rx_dropped": int(c.rx_dropped),
                        "rx_ring_full": int(c.rx_ring_full),
                        "rx_fill_ring_empty_descs": int(c.rx_fill_ring_empty_descs)}}

    def describe(self) -> str:
        copy = "zero-copy" if lib.pkb_xdp_zero_copy(self.xdp) else "copy"
        what = (f"capturing on {self.opts.interface} through AF_XDP ({self.opts.mode} mode, "
                f"{copy}, queue{'s' if len(self.queues) > 1 else ''} "
                f"{','.join(map(str, self.queues))})")
        if self.opts.filter:
            what += f" (filter {self.opts.filter!r})"
        return what

    def error(self, i: int) -> str:
        return f"{self.opts.interface} queue {self.queues[i]}: capture failed"

    def close(self) -> None:
        if self.xdp is not None:
            ffi.gc(self.xdp, None)      # closed here, not again when collected
            lib.pkb_xdp_close(self.xdp)
            self.xdp = None
        self.fds = []
