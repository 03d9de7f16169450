"""Sends frames on an interface through an AF_PACKET socket, exactly as
given: `python sendframes.py IFACE FILE`, FILE holding records of a
little-endian u32 length and the frame. Run inside the namespace that holds
IFACE; prints the number of frames sent."""

import socket
import struct
import sys


def main() -> None:
    iface, path = sys.argv[1], sys.argv[2]
    data = open(path, "rb").read()
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    s.bind((iface, 0))
    off = sent = 0
    while off < len(data):
        (n,) = struct.unpack_from("<I", data, off)
        frame = data[off + 4 : off + 4 + n]
        off += 4 + n
        while True:
            try:
                s.send(frame)
                break
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno != 105:      # ENOBUFS: the queue is full, try again
                    raise
        sent += 1
    print(sent)


if __name__ == "__main__":
    main()
