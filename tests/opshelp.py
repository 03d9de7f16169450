"""Helpers of the operations tests: free loopback ports, a stream of clients
(one of them stalled) around a live broker, and processes that are ended
after the test."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from conftest import pktipc_cmd

from pktipc._tools.demo import _stop  # SIGTERM, SIGKILL after 10 s, pipes closed

T = TypeVar("T")

# Attaches with the drop policy, then reads nothing: the broker skips ahead of it.
STALLED = ("import sys, time, pktipc\n"
           "c = pktipc.connect(sys.argv[1], sys.argv[2], policy='drop')\n"
           "print('attached', flush=True)\n"
           "time.sleep(120)\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 60,
              every: float = 0.1) -> T:
    """probe()'s first value that is not None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what} (last: {got!r})")
        time.sleep(every)


class Procs:
    """Processes started by a test; each is ended (SIGTERM, then SIGKILL)
    after it, whatever happened."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, cmd: list[str], **kw: object) -> subprocess.Popen[str]:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.PIPE)
        p: subprocess.Popen[str] = subprocess.Popen(cmd, text=True, **kw)  # type: ignore[call-overload]
        self.started.append(p)
        return p

    def pktipc(self, *args: str, **kw: object) -> subprocess.Popen[str]:
        return self.start(pktipc_cmd(*args), **kw)

    def stalled(self, server: str, name: str) -> subprocess.Popen[str]:
        p = self.start([sys.executable, "-c", STALLED, server, name], stdout=subprocess.PIPE)
        assert p.stdout is not None and p.stdout.readline() == "attached\n"
        return p

    def end_all(self) -> None:
        for p in reversed(self.started):
            _stop(p)


def synth_file(path: Path, packets: int, rate_pps: float) -> Path:
    from pktipc._tools.synth import write_pcap

    with open(path, "wb") as out:
        write_pcap(out, packets, rate_pps=rate_pps)
    return path
