"""The shared-memory layout seen from Python.

Every size, offset and constant comes from the cffi declarations built from
shm/pktipc_layout.h; the numpy dtypes are derived from them, never written
by hand. A Segment works over any buffer: an mmap of the real POSIX segment,
or a bytearray in tests.
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import LayoutError
from ._shm import ffi, lib

_SCALARS = {
    "uint8_t": "u1",
    "uint16_t": "<u2",
    "uint32_t": "<u4",
    "uint64_t": "<u8",
    "int32_t": "<i4",
    "int64_t": "<i8",
    "char": "S1",
}


def dtype_of(ctype: Any) -> np.dtype[Any]:
    """numpy dtype with the same size and field offsets as a cffi type."""
    if isinstance(ctype, str):
        ctype = ffi.typeof(ctype)
    if ctype.kind == "primitive":
        return np.dtype(_SCALARS[ctype.cname])
    if ctype.kind == "array":
        if ctype.item.cname == "char":
            return np.dtype(f"S{ctype.length}")
        return np.dtype((dtype_of(ctype.item), (ctype.length,)))
    if ctype.kind == "struct":
        names, formats, offsets = [], [], []
        for name, field in ctype.fields:
            names.append(name)
            formats.append(dtype_of(field.type))
            offsets.append(field.offset)
        return np.dtype(
            {"names": names, "formats": formats, "offsets": offsets,
             "itemsize": ffi.sizeof(ctype)}
        )
    raise TypeError(f"no numpy dtype for {ctype.cname}")


PKT_DTYPE = dtype_of("struct pktipc_pkt")
BATCH_REC_DTYPE = dtype_of("struct pktipc_batch_rec")

LAYOUT_VERSION: int = lib.PKTIPC_LAYOUT_VERSION
HEADER_SIZE: int = lib.PKTIPC_HEADER_SIZE
DESC_SIZE: int = lib.PKTIPC_DESC_SIZE
SLAB_ALIGN: int = lib.PKTIPC_SLAB_ALIGN
MAX_IFACES: int = lib.PKTIPC_MAX_IFACES
IFACE_SIZE: int = lib.PKTIPC_IFACE_SIZE
U32 = (1 << 32) - 1


@dataclass(frozen=True)
class Geometry:
    """Where a segment's regions start: computed in C (pktipc_geometry in
    shm/pktipc_shm.h), as every reader of a segment checks it."""

    slab_size: int
    slab_count: int
    iface_count: int = 1
    frame_size: int = 0         # the frame area (AF_XDP's UMEM): none by default
    frame_count: int = 0
    iface_table_off: int = field(init=False)
    batch_table_off: int = field(init=False)
    slabs_off: int = field(init=False)
    frames_off: int = field(init=False)
    total_size: int = field(init=False)

    def __post_init__(self) -> None:
        g = ffi.new("struct pktipc_geometry *")
        args = (self.slab_size, self.slab_count, self.iface_count, self.frame_size,
                self.frame_count)
        if not all(0 <= a <= U32 for a in args) or lib.pktipc_geometry(*args, g) != 0:
            raise ValueError(self._why())
        for name in ("iface_table_off", "batch_table_off", "slabs_off", "frames_off",
                     "total_size"):
            object.__setattr__(self, name, int(getattr(g, name)))

    def _why(self) -> str:
        if self.slab_size <= 0 or self.slab_size % SLAB_ALIGN:
            return f"slab size must be a multiple of {SLAB_ALIGN} bytes"
        if self.slab_size > lib.PKTIPC_MAX_SLAB_SIZE:
            return f"slab size must be at most {lib.PKTIPC_MAX_SLAB_SIZE >> 30} GiB"
        if not lib.PKTIPC_MIN_SLABS <= self.slab_count <= lib.PKTIPC_MAX_SLABS:
            return (f"slab count must be between {lib.PKTIPC_MIN_SLABS} and "
                    f"{lib.PKTIPC_MAX_SLABS}")
        if self.iface_count > MAX_IFACES:
            return f"at most {MAX_IFACES} sources per broker"
        if self.frame_count and self.frame_size not in (2048, 4096):
            return "frames must be of 2048 or 4096 bytes"
        if not self.frame_count and self.frame_size:
            return "a frame size without frames"
        return "the slabs and the frames must fit in 4 GiB"

    def slab_off(self, slab: int) -> int:
        return self.slabs_off + self.slab_size * slab


class Direction(enum.IntEnum):
    """Which way a live packet went (the flags' direction field, PKTIPC_DIR_*)."""

    UNKNOWN = lib.PKTIPC_DIR_UNKNOWN        # capture files
    HOST = lib.PKTIPC_DIR_HOST              # to this host
    BROADCAST = lib.PKTIPC_DIR_BROADCAST
    MULTICAST = lib.PKTIPC_DIR_MULTICAST
    OTHERHOST = lib.PKTIPC_DIR_OTHERHOST    # to another host (promiscuous)
    OUTGOING = lib.PKTIPC_DIR_OUTGOING      # sent by this host


class Flags(enum.IntFlag):
    """A packet's `flags` (the descriptor's PKTIPC_F_* bits): test with
    `packet.flags & Flags.TRUNCATED`; Flags(packet.flags).direction says
    which way it went."""

    VLAN_VALID = lib.PKTIPC_F_VLAN_VALID            # vlan_tci holds a tag the kernel stripped
    VLAN_REINSERTED = lib.PKTIPC_F_VLAN_REINSERTED  # ... and it is back in the bytes
    QINQ = lib.PKTIPC_F_QINQ                        # that tag was an 802.1ad (outer) one
    TRUNCATED = lib.PKTIPC_F_TRUNCATED              # caplen < wirelen
    TS_HW = lib.PKTIPC_F_TS_HW                      # ts_ns is from the NIC's clock
    NO_HASH = lib.PKTIPC_F_NO_HASH                  # hash is 0: not computed (no flow group)
    DIR_MASK = lib.PKTIPC_F_DIR_MASK                # the direction field's bits

    @property
    def direction(self) -> Direction:
        return Direction((self & Flags.DIR_MASK) >> lib.PKTIPC_F_DIR_SHIFT)


@dataclass(frozen=True)
class Iface:
    """A source of the broker: a capture file or an interface (`kind`,
    PKTIPC_IFACE_FILE or _LIVE), its LINKTYPE_* value, snapshot length,
    interface index (0 for files) and timestamp resolution (per second)."""

    name: str
    linktype: int
    snaplen: int
    kind: int = lib.PKTIPC_IFACE_FILE
    ifindex: int = 0
    ts_resolution: int = 1_000_000_000


class Segment:
    """A mapped segment: header, batch table and slabs over `buf`.

    Its geometry (every offset and size) is read once, from a checked copy
    of the header (check), or given (init, for the broker); it is never read
    again from the segment, which the broker may write at any time."""

    def __init__(self, buf: Any, *, writable: bool = False) -> None:
        self.buf = buf
        self._cbuf = ffi.from_buffer("uint8_t[]", buf, require_writable=writable)
        self.header = ffi.cast("struct pktipc_header *", self._cbuf)   # live: counters, state
        self.size = len(self._cbuf)
        self._geometry: Geometry | None = None
        self._checked = ffi.new("struct pktipc_header *")   # its geometry, for pkts_check

    def check(self) -> None:
        """Raises LayoutError unless the header describes a layout we read
        (pktipc_shm_attach in shm/pktipc_shm.h decides); then keeps its
        geometry."""
        h = ffi.new("struct pktipc_header *")
        if lib.pktipc_shm_attach(self._cbuf, self.size, h) != 0:
            if self.size < HEADER_SIZE:
                raise LayoutError("segment smaller than its header")
            if h.magic != lib.PKTIPC_MAGIC:
                raise LayoutError("segment has no pktipc header (bad magic)")
            if h.layout_version != lib.PKTIPC_LAYOUT_VERSION:
                raise LayoutError(f"segment layout version {h.layout_version}, this pktipc "
                                  f"reads {lib.PKTIPC_LAYOUT_VERSION}")
            raise LayoutError("segment header is inconsistent")
        self._geometry = Geometry(int(h.slab_size), int(h.slab_count), int(h.iface_count),
                                  int(h.frame_size), int(h.frame_count))
        self._checked = h

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            raise LayoutError("segment not checked")
        return self._geometry

    def init(self, geometry: Geometry, *, name: str, epoch: int, ifaces: list[Iface]) -> None:
        """Writes a fresh header (broker only), magic last."""
        if len(ifaces) != geometry.iface_count:
            raise ValueError("geometry made for another number of sources")
        if self.size < geometry.total_size:
            raise ValueError("buffer smaller than the geometry")
        ffi.memmove(self._cbuf, b"\0" * HEADER_SIZE, HEADER_SIZE)
        ffi.memmove(self._cbuf + HEADER_SIZE, b"\0" * (geometry.slabs_off - HEADER_SIZE),
                    geometry.slabs_off - HEADER_SIZE)
        self._geometry = geometry
        h = self.header
        h.layout_version = lib.PKTIPC_LAYOUT_VERSION
        h.header_size = HEADER_SIZE
        h.epoch = epoch
        h.start_time_ns = time.time_ns()
        h.broker_pid = os.getpid()
        h.state = lib.PKTIPC_STATE_STARTING
        h.slab_size = geometry.slab_size
        h.slab_count = geometry.slab_count
        h.desc_size = DESC_SIZE
        h.batch_rec_size = lib.PKTIPC_BATCH_REC_SIZE
        h.iface_size = IFACE_SIZE
        h.iface_table_off = geometry.iface_table_off
        h.batch_table_off = geometry.batch_table_off
        h.slabs_off = geometry.slabs_off
        h.frames_off = geometry.frames_off
        h.frame_size = geometry.frame_size
        h.frame_count = geometry.frame_count
        h.total_size = geometry.total_size
        h.name = name.encode()[: lib.PKTIPC_NAME_LEN - 1]
        h.iface_count = len(ifaces)
        ffi.memmove(self._checked, h, HEADER_SIZE)
        for i, src in enumerate(ifaces):
            e = self.iface(i)
            e.name = src.name.encode()[: lib.PKTIPC_IFNAME_LEN - 1]
            e.ifindex = src.ifindex
            e.linktype = src.linktype
            e.snaplen = src.snaplen
            e.ts_resolution = src.ts_resolution
            e.kind = src.kind
        h.magic = lib.PKTIPC_MAGIC

    def iface(self, i: int) -> Any:
        """Entry i of the interface table (a cffi pointer)."""
        g = self.geometry
        if not 0 <= i < g.iface_count:
            raise IndexError(f"source {i} of {g.iface_count}")
        return ffi.cast("struct pktipc_iface *", self._cbuf + g.iface_table_off) + i

    def ifaces(self) -> list[Iface]:
        return [
            Iface(
                name=ffi.string(e.name).decode(errors="replace"),
                linktype=int(e.linktype), snaplen=int(e.snaplen), kind=int(e.kind),
                ifindex=int(e.ifindex), ts_resolution=int(e.ts_resolution),
            )
            for e in map(self.iface, range(self.geometry.iface_count))
        ]

    def _slab(self, slab: int) -> Geometry:
        g = self.geometry
        if not 0 <= slab < g.slab_count:
            raise IndexError(f"slab {slab} of {g.slab_count}")
        return g

    def batch_rec(self, slab: int) -> Any:
        g = self._slab(slab)
        return ffi.cast("struct pktipc_batch_rec *", self._cbuf + g.batch_table_off) + slab

    def slab_ptr(self, slab: int) -> Any:
        return self._cbuf + self._slab(slab).slab_off(slab)

    def frames_ptr(self) -> Any:
        """The frame area (AF_XDP's UMEM), past the slabs."""
        return self._cbuf + self.geometry.frames_off

    def pkts_check(self, slab: int, desc: np.ndarray[Any, Any]) -> int:
        """How many of `desc` (a copy of slab `slab`'s first descriptors) are
        sound, from the first: every frame in the slab or in the frame area
        (pktipc_pkts_check in shm/pktipc_shm.h)."""
        self._slab(slab)
        return int(lib.pktipc_pkts_check(self._checked, slab,
                                         ffi.from_buffer("struct pktipc_pkt[]", desc),
                                         len(desc)))

    def descriptors(self, slab: int, count: int) -> np.ndarray[Any, Any]:
        """The first `count` descriptors of a slab, as a view over the buffer."""
        g = self._slab(slab)
        if not 0 <= count * DESC_SIZE <= g.slab_size:
            raise LayoutError(f"{count} descriptors do not fit a slab of {g.slab_size} bytes")
        return np.frombuffer(self.buf, dtype=PKT_DTYPE, count=count, offset=g.slab_off(slab))

    def counters(self) -> dict[str, int]:
        c = self.header.counters
        return {name: int(getattr(c, name)) for name, _ in ffi.typeof(c).fields}


def u32s(values: Sequence[int]) -> Any:
    return ffi.from_buffer("uint32_t[]", np.asarray(values, dtype=np.uint32))


def mask_ptr(mask: bytes | None) -> Any:
    return ffi.NULL if mask is None else ffi.from_buffer(mask)


def select(desc: np.ndarray[Any, Any], mask: bytes | None, members: Sequence[int],
           me: int) -> np.ndarray[Any, Any]:
    """Indexes (uint32, in order) of the packets of `desc` that are slot `me`'s
    share: set in `mask` (None: all) and, if `members` are named, owned by
    `me` among them. One C call (pktipc_select)."""
    out = np.empty(len(desc), dtype=np.uint32)
    k = lib.pktipc_select(ffi.from_buffer("struct pktipc_pkt[]", desc), len(desc),
                          mask_ptr(mask), u32s(members), len(members), me,
                          ffi.from_buffer("uint32_t[]", out))
    return out[:k]
