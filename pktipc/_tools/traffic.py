"""Synthetic traffic sent on an interface, for `pktipc demo`:
`python -m pktipc._tools.traffic -i IFACE -c COUNT --rate PPS`. Prints the number
of frames sent. Only ever run on an interface of a namespace of one's own."""

from __future__ import annotations

import argparse
import random
import socket
import time
from itertools import islice

from .synth import frames


def send(iface: str, count: int, rate: float, seed: int = 1) -> int:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    start = time.monotonic()
    sent = 0
    for data in islice(frames(random.Random(seed)), count):
        ahead = start + sent / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
        sock.send(data)
        sent += 1
    sock.close()
    return sent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("-i", dest="iface", required=True)
    ap.add_argument("-c", dest="count", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=2000.0, help="frames per second")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    print(send(a.iface, a.count, a.rate, a.seed), flush=True)


if __name__ == "__main__":
    main()
