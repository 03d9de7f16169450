"""Frames sent on an interface through an AF_PACKET socket, exactly as given:
synthetic traffic for `pktipc demo`, or the frames of a file for the tests.

    python -m pktipc._tools.traffic -i IFACE [-c COUNT] [--rate PPS] [--seed N]
    python -m pktipc._tools.traffic -i IFACE --frames FILE

FILE holds records of a little-endian u32 length and the frame. Prints the
number of frames sent. Only ever run on an interface of a namespace of
one's own (see netns.py)."""

from __future__ import annotations

import argparse
import errno
import random
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from itertools import islice

from .synth import frames as synthetic


def send(iface: str, frames: Iterable[bytes], rate: float = 0.0) -> int:
    """Sends `frames` on `iface`, `rate` a second (0: as fast as the queue
    takes them; a full queue is waited for, never a frame dropped)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        sock.bind((iface, 0))
        start = time.monotonic()
        sent = 0
        for data in frames:
            if rate and (ahead := start + sent / rate - time.monotonic()) > 0:
                time.sleep(ahead)
            while True:
                try:
                    sock.send(data)
                    break
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno != errno.ENOBUFS:     # the queue is full: again
                        raise
            sent += 1
        return sent
    finally:
        sock.close()


def records(data: bytes) -> Iterator[bytes]:
    """The frames of a file of (u32 length, frame) records."""
    off = 0
    while off < len(data):
        (n,) = struct.unpack_from("<I", data, off)
        yield data[off + 4 : off + 4 + n]
        off += 4 + n


def pack(frames: Iterable[bytes]) -> bytes:
    """The file records() reads."""
    return b"".join(struct.pack("<I", len(f)) + f for f in frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-i", dest="iface", required=True)
    ap.add_argument("-c", dest="count", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=0.0, help="frames per second (0: at once)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--frames", help="send this file's frames instead of synthetic ones")
    a = ap.parse_args()
    if a.frames:
        with open(a.frames, "rb") as f:
            todo: Iterable[bytes] = records(f.read())
    else:
        todo = islice(synthetic(random.Random(a.seed)), a.count)
    print(send(a.iface, todo, a.rate), flush=True)


if __name__ == "__main__":
    main()
