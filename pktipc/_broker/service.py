"""Running under systemd: readiness over $NOTIFY_SOCKET (sd_notify's
protocol, a datagram of NEWLINE-separated assignments) and log levels that
journald reads off stderr (sd-daemon's "<N>" line prefixes).

Outside systemd both do nothing.
"""

from __future__ import annotations

import io
import os
import socket
from typing import TextIO

# sd-daemon.h: <3> error, <4> warning, <5> notice, <6> info.
LEVELS = (("pktipc: error:", 3), ("pktipc: cleanup:", 3), ("Traceback", 3),
          ("pktipc: client ", 4), ("pktipc: stopped", 5), ("pktipc: serving ", 6),
          ("pktipc: capturing ", 6), ("pktipc: exporter ", 6))
DEFAULT_LEVEL = 4   # other lines of the broker: an interface that went down, ...


def notify(*assignments: str) -> bool:
    """Sends e.g. "READY=1" to the service manager; False if there is none
    (no $NOTIFY_SOCKET, or one that is not a Unix socket)."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]           # abstract namespace
    elif not addr.startswith("/"):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall("\n".join(assignments).encode())
    return True


def level(line: str) -> int:
    return next((n for prefix, n in LEVELS if line.startswith(prefix)), DEFAULT_LEVEL)


class _Levelled(io.TextIOBase):
    """Each line written gets its level's prefix; a line is written whole."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.part = ""

    def write(self, s: str) -> int:
        *lines, self.part = (self.part + s).split("\n")
        for line in lines:
            self.out.write(f"<{level(line)}>{line}\n")
        if lines:
            self.out.flush()
        return len(s)

    def flush(self) -> None:
        self.out.flush()

    def fileno(self) -> int:
        return self.out.fileno()

    def isatty(self) -> bool:
        return False


def journal_stderr(err: TextIO) -> TextIO:
    """`err` with sd-daemon level prefixes if it is connected to the journal
    ($JOURNAL_STREAM names its device and inode), else `err` itself."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(err.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return err
    if want != f"{st.st_dev}:{st.st_ino}":
        return err
    return _Levelled(err)  # type: ignore[return-value]


def ready(log: TextIO, status: str) -> None:
    """READY=1 (and a STATUS= line) to the service manager, if there is one.
    A manager that cannot be told is logged, not fatal: it will time out."""
    try:
        notify("READY=1", f"STATUS={status}")
    except OSError as e:
        print(f"pktipc: cannot tell the service manager that the broker is ready "
              f"({os.environ.get('NOTIFY_SOCKET')}: {e.strerror})", file=log, flush=True)
