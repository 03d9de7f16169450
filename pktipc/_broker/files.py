"""Packet sources: capture files read through libpcap, in C, a slab at a time."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .._errors import SourceError
from .._layout import Iface
from .._shm import ffi, lib

NO_LIMIT = (1 << 63) - 1   # INT64_MAX: no packet is later


def _open(path: str) -> Any:
    errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
    src = lib.pkb_src_open_file(os.fsencode(path), errbuf)
    if src == ffi.NULL:
        msg = ffi.string(errbuf).decode(errors="replace")
        raise SourceError(f"{path}: {msg}")
    return ffi.gc(src, lib.pkb_src_close)


@dataclass
class FillResult:
    status: int          # PKB_FILL_*
    packets: int = 0     # packets added by this call
    bytes: int = 0       # captured bytes added by this call
    error: str | None = None


class FileSource:
    """Capture files served one after another, each `loops` times (0: for ever).

    Every file is opened once when the source is made, so a missing or
    unreadable file is refused before the broker starts; then only the file
    being read is open. Each file is one entry of the interface table; its
    packets carry that entry's index.
    """

    def __init__(self, paths: list[str], loops: int = 1) -> None:
        if not paths:
            raise SourceError("no capture file given")
        self.paths = paths
        self.loops = loops
        self.ifaces: list[Iface] = []
        for path in paths:
            if os.path.isdir(path):
                raise SourceError(f"{path}: is a directory")
            handle = _open(path)
            self.ifaces.append(Iface(
                name=os.path.basename(path),
                linktype=lib.pkb_src_linktype(handle),
                snaplen=lib.pkb_src_snaplen(handle),
                kind=lib.PKTIPC_IFACE_FILE,
                ts_resolution=lib.pkb_src_ts_resolution(handle),
            ))
            if path is paths[0]:
                self.current: Any = handle    # the others close as they go out of scope
        self.index = 0          # file being read
        self.loop = 0           # passes completed over the whole list
        self._pass_packets = 0

    def next_ts(self) -> int:
        """Capture time of the next packet of the current file (NO_LIMIT at its end)."""
        return int(lib.pkb_src_peek_ts(self.current))

    def pending_caplen(self) -> int:
        return int(lib.pkb_src_pending_caplen(self.current))

    def fill(self, fill: Any, ts_limit: int = NO_LIMIT) -> FillResult:
        """Adds packets of the current file to `fill`'s slab (one C call)."""
        count, nbytes = fill.count, fill.bytes
        fill.iface = self.index
        status = lib.pkb_src_fill(self.current, fill, ts_limit, 0xFFFFFFFF)
        res = FillResult(status, fill.count - count, fill.bytes - nbytes)
        self._pass_packets += res.packets
        if status == lib.PKB_FILL_ERROR:
            msg = ffi.string(lib.pkb_src_error(self.current)).decode(errors="replace")
            res.error = f"{self.paths[self.index]}: {msg}"
        elif status == lib.PKB_FILL_TOOBIG:
            res.error = (f"{self.paths[self.index]}: a packet of {self.pending_caplen()} bytes "
                         f"does not fit a slab of {fill.slab_size} bytes (raise --slab-size)")
        return res

    def next_file(self) -> bool:
        """Moves to the next file (or pass); False when every pass is done.
        Raises SourceError if the file cannot be opened any more, or if a
        whole pass found no packet to loop over."""
        self.index += 1
        if self.index == len(self.paths):
            self.loop += 1
            if self.loops and self.loop >= self.loops:
                return False
            if not self._pass_packets:
                raise SourceError("the capture files hold no packet: nothing to loop over")
            self._pass_packets = 0
            self.index = 0
        self.current = _open(self.paths[self.index])
        return True
