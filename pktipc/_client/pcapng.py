"""Reading back the pcapng files pktipc writes, as one stream: what `pktipc
record attach` sends. Each file is a section of its own (a header, its
interface blocks, packets, statistics); the stream has one section header,
each distinct interface block once, and every other block copied as it is,
its interface id renumbered. Files are read as they grow: a block is taken
only once it is whole."""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

from .._errors import PktipcError

SHB, IDB, EPB, ISB = 0x0A0D0D0A, 1, 6, 5
_LE_MAGIC = 0x1A2B3C4D
_CHUNK = 1 << 20


def section_header(comment: str | None = None) -> bytes:
    """A section header block of unknown length, with a comment."""
    opts = b""
    if comment:
        text = comment.encode()[:256]
        opts = (struct.pack("<HH", 1, len(text)) + text + b"\0" * (-len(text) % 4)
                + struct.pack("<HH", 0, 0))
    size = 28 + len(opts)
    return (struct.pack("<IIIHHq", SHB, size, _LE_MAGIC, 1, 0, -1) + opts
            + struct.pack("<I", size))


class Merger:
    """Blocks of several pcapng files into one stream (see the module)."""

    def __init__(self) -> None:
        self.ids: dict[bytes, int] = {}     # an interface block's body -> its id here
        self.packets = 0

    def file(self) -> FileReader:
        return FileReader(self)


class FileReader:
    """One file's blocks, taken as they become whole, renumbered for the
    stream of `merger`."""

    def __init__(self, merger: Merger) -> None:
        self.merger = merger
        self.local: list[int] = []          # this file's interface id -> the stream's
        self.pending = b""
        self.offset = 0                     # bytes of the file consumed

    def feed(self, data: bytes) -> bytes:
        """What the stream gets of the whole blocks in pending + data."""
        buf = self.pending + data
        out: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 12:
            btype, size = struct.unpack_from("<II", buf, pos)
            if btype == SHB and pos == 0 and self.offset == 0:
                if struct.unpack_from("<I", buf, 8)[0] != _LE_MAGIC:
                    raise PktipcError("not a little-endian pcapng file, as pktipc writes them")
            if size < 12 or size % 4:
                raise PktipcError(f"a pcapng block of {size} bytes: the file is damaged")
            if end - pos < size:
                break
            block = buf[pos : pos + size]
            pos += size
            if btype == SHB:
                self.local = []
            elif btype == IDB:
                body = block[8:-4]
                ids = self.merger.ids
                if body not in ids:
                    ids[body] = len(ids)
                    out.append(block)
                self.local.append(ids[body])
            elif btype in (EPB, ISB):
                (ifid,) = struct.unpack_from("<I", block, 8)
                if ifid >= len(self.local):
                    raise PktipcError(f"a block names interface {ifid}, which the file "
                                      "does not describe")
                if self.local[ifid] != ifid:
                    block = block[:8] + struct.pack("<I", self.local[ifid]) + block[12:]
                out.append(block)
                self.merger.packets += btype == EPB
        self.offset += pos
        self.pending = buf[pos:]
        return b"".join(out)

    def read(self, fd: int) -> bytes:
        """Feeds what the file holds now past what was read."""
        parts = []
        while True:
            chunk = os.pread(fd, _CHUNK, self.offset + len(self.pending))
            if not chunk:
                break
            parts.append(self.feed(chunk))
        return b"".join(parts)


def write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = out.write(view)
        view = view[n or 0 :]
    out.flush()
