"""What the sending tests share: a capture on the veth peer (tcpdump, read
back with libpcap), a C sender linking libpktipc, frames."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, Netns
from pcapref import read_pcap

CDIR = ROOT / "clients" / "c"
LIB = CDIR / "build" / "lib"

SENDER = r"""
/* sender SERVER NAME FRAMES IFACE [BATCH [TIMEOUT_MS]]: the frames of FRAMES
 * (records of a u32 length and the bytes) out of interface IFACE, through
 * libpktipc. With TIMEOUT_MS, says "open" once the first frame is allocated
 * and waits for a line on stdin; then allocates waiting at most TIMEOUT_MS,
 * and when told -PKTIPC_EAGAIN says "busy after N" (N frames sent), waits
 * for another line and goes on waiting as long as it takes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pktipc.h>

int main(int argc, char **argv)
{
    char errbuf[PKTIPC_ERRBUF_SIZE];
    struct pktipc_opts o = {.sz = sizeof(o), .server = argv[1], .name = argv[2],
                            .timeout_ms = -1, .reconnect_ms = 0, .errbuf = errbuf};
    pktipc_client *c;
    if (pktipc_open(&o, &c) < 0) {
        printf("open: %s\n", errbuf);
        return 2;
    }
    FILE *f = fopen(argv[3], "rb");
    unsigned iface = (unsigned)atoi(argv[4]), batch = argc > 5 ? (unsigned)atoi(argv[5]) : 0;
    int timeout = argc > 6 ? atoi(argv[6]) : -1;
    unsigned char buf[70000];
    char line[16];
    uint32_t len;
    int r = 0, n = 0, sent = 0;
    while (fread(&len, 4, 1, f) == 1 && fread(buf, 1, len, f) == len) {
        uint8_t *frame;
        r = pktipc_tx_alloc(c, len, iface, timeout, &frame);
        if (r == -PKTIPC_EAGAIN && sent) {
            printf("busy after %d\n", sent);
            fflush(stdout);
            if (!fgets(line, sizeof(line), stdin))
                return 5;
            timeout = -1;
            r = pktipc_tx_alloc(c, len, iface, timeout, &frame);
        }
        if (r < 0) {
            printf("alloc %d: %s\n", r, pktipc_geterr(c));
            pktipc_close(c);
            return 3;
        }
        memcpy(frame, buf, len);
        if (pktipc_tx_send(c, frame, len) < 0)
            return 4;
        if (argc > 6 && sent == 0) {
            printf("open\n");
            fflush(stdout);
            if (!fgets(line, sizeof(line), stdin))
                return 5;
        }
        sent++;
        if (batch && ++n % batch == 0 && (r = pktipc_tx_flush(c, 0)) < 0)
            printf("flush %d: %s\n", r, pktipc_geterr(c));
    }
    r = pktipc_tx_flush(c, -1);
    struct pktipc_stats st;
    pktipc_stats(c, &st, sizeof(st));
    printf("flush %d submitted %llu sent %llu refused %llu%s%s\n", r,
           (unsigned long long)st.tx_submitted, (unsigned long long)st.tx_sent,
           (unsigned long long)st.tx_refused, r < 0 ? ": " : "", r < 0 ? pktipc_geterr(c) : "");
    pktipc_close(c);
    return 0;
}
"""


def build_sender(tmp: Path) -> Path:
    """The C sender, linked statically against libpktipc (so that any user
    may run it)."""
    subprocess.run(["make", "-s", "-C", str(CDIR), "lib"], check=True, capture_output=True)
    src, exe = tmp / "sender.c", tmp / "sender"
    src.write_text(SENDER)
    libs = subprocess.run(["pkg-config", "--libs", "libzmq", "msgpack", "libpcap"],
                          capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-O1", "-o", str(exe), str(src), f"-I{CDIR / 'include'}",
                    f"-I{ROOT / 'shm'}", str(LIB / "libpktipc.a"), *libs, "-pthread"],
                   check=True)
    return exe


def records(frames: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(f)) + f for f in frames)


def eth(dst: bytes, src: bytes, payload: bytes, *tags: tuple[int, int],
        ethertype: int = 0x88B5) -> bytes:
    t = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in tags)
    return dst + src + t + struct.pack("!H", ethertype) + payload


class Peer:
    """tcpdump on the veth peer, frames coming in only, into a file read
    back with libpcap. Started listening; stop() (by its pid) returns the
    frames, and fails if the kernel dropped any on the way to it."""

    def __init__(self, ns: Netns, iface: str, path: Path, snaplen: int = 10000) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ns.cmd("tcpdump", "-i", iface, "-Q", "in", "-n", "-s", str(snaplen), "-B", "32768",
                   "--immediate-mode", "-U", "-w", str(path)),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert "listening on" in line, line

    def frames(self, n: int, timeout: float = 30) -> list[bytes]:
        """What came, once at least `n` frames did (or `timeout` passed)."""
        return self.frames_until(lambda fs: len(fs) >= n, timeout)

    def frames_until(self, done: Callable[[list[bytes]], bool],
                     timeout: float = 30) -> list[bytes]:
        """What came, once `done` holds of it (or `timeout` passed)."""
        deadline = time.monotonic() + timeout
        while not done(self.read()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stop()

    def read(self) -> list[bytes]:
        try:
            return [p.data for p in read_pcap(str(self.path)).packets]
        except Exception:       # not written yet, or a record half written
            return []

    def stop(self) -> list[bytes]:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        assert "\n0 packets dropped by kernel" in "\n" + err, err
        return [p.data for p in read_pcap(str(self.path)).packets]
