"""Capture files as a packet source: read through libpcap (or from a
mapping), in C, a slab at a time; paced by their timestamps on request."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .._errors import SourceError
from .._layout import Iface, Segment
from .._shm import ffi, lib
from .sources import Produced, Status

NO_LIMIT = (1 << 63) - 1   # INT64_MAX: no packet is later


def _open(path: str) -> Any:
    errbuf = ffi.new("char[]", lib.PKB_ERRBUF_SIZE)
    src = lib.pkb_src_open_file(os.fsencode(path), errbuf)
    if src == ffi.NULL:
        msg = ffi.string(errbuf).decode(errors="replace")
        raise SourceError(f"{path}: {msg}")
    return ffi.gc(src, lib.pkb_src_close)


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

    fds: list[int] = []
    default_policy = "block"
    default_wait_clients = 1
    pauses_without_clients = True       # nothing is replayed to nobody
    frame_size = frame_count = 0       # frames are copied into slabs
    short = False

    def __init__(self, paths: list[str], loops: int = 1, speed: float | None = None) -> None:
        if not paths:
            raise SourceError("no capture file given")
        self.paths = paths
        self.loops = loops
        self.pacer = Pacer(speed) if speed else None
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

    def produce(self, fill: Any, now: float) -> Produced:
        added = []
        while True:
            limit = NO_LIMIT
            if self.pacer is not None:
                nts = self.next_ts()
                limit = self.pacer.limit(now, nts) if nts != NO_LIMIT else NO_LIMIT
            index = self.index
            res = self.read_into(fill, limit)
            added.append((index, res.packets, res.bytes))
            if res.status == lib.PKB_FILL_FULL:
                return Produced(Status.FULL, added)
            if res.status == lib.PKB_FILL_LIMIT:
                assert self.pacer is not None
                return Produced(Status.IDLE, added, wake=self.pacer.due(self.next_ts()))
            if res.status != lib.PKB_FILL_EOF:
                return Produced(Status.END, added, error=res.error)
            if self.pacer is not None:
                self.pacer.reset()
            try:
                more = self.next_file()
            except SourceError as e:
                return Produced(Status.END, added, error=str(e))
            if not more:
                return Produced(Status.END, added)
            # Back to the loop at every file boundary, so that signals and
            # control messages are seen however short the files are.
            return Produced(Status.MORE, added)

    def bind(self, seg: Segment) -> None:
        pass

    def recycle(self, slab: int) -> None:
        pass

    def read_counters(self, entries: list[Any]) -> None:
        pass

    def error(self, i: int) -> str:
        return f"{self.paths[i]}: error"

    def stats(self, i: int, entry: Any) -> dict[str, Any]:
        return {"kind": "file"}

    def describe(self) -> str:
        n = len(self.paths)
        return "serving " + (self.paths[0] if n == 1 else f"{n} files")

    def close(self) -> None:
        pass

    def read_into(self, fill: Any, ts_limit: int = NO_LIMIT) -> FillResult:
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
