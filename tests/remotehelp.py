"""Helpers of the tests beyond one host: key pairs, gateway and other
long-running processes whose stderr is read as it comes, two namespaces
joined by a veth pair, and a remote client run as a script."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import Netns, _names, pktipc_cmd

from pktipc._net.gateway import keygen
from pktipc._tools.demo import _stop  # SIGTERM, SIGKILL after 10 s, pipes closed


@dataclass
class Keys:
    server_secret: str      # the gateway's key pair
    server_public: str
    client_secret: str      # an admitted client's
    admitted: str           # the directory of admitted client keys
    other_secret: str       # a key pair that is not admitted


def make_keys(d: Path) -> Keys:
    spub, ssec = keygen(str(d / "server"), "server")
    cpub, csec = keygen(str(d / "client"), "client")
    _, osec = keygen(str(d / "other"), "other")
    admitted = d / "admitted"
    admitted.mkdir()
    (admitted / "client.key").write_text(Path(cpub).read_text())
    return Keys(ssec, spub, csec, str(admitted), osec)


def curve(keys: Keys) -> dict[str, Any]:
    """connect()'s keys of the admitted client."""
    return {"key": keys.client_secret, "server_key": keys.server_public}


def curve_args(keys: Keys, secret: str | None = None) -> list[str]:
    return ["--key", secret or keys.client_secret, "--server-key", keys.server_public]


class Proc:
    """A process whose stderr is read as it comes (by a thread: no pipe
    ever fills), ended by its pid after the test."""

    def __init__(self, cmd: list[str], **kw: Any) -> None:
        kw.setdefault("stdout", subprocess.DEVNULL)
        self.p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, **kw)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.p.stderr is not None
        for line in self.p.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        """The first line of stderr matching `pattern`, waited for."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in list(self.lines):
                if m := rx.search(line):
                    return m
            if self.p.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"exited {self.p.returncode}: {self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line {pattern!r} in: {self.text()}")
            time.sleep(0.02)

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float = 60) -> int:
        rc = self.p.wait(timeout=timeout)
        self._reader.join(timeout=5)
        return rc

    def stop(self) -> None:
        _stop(self.p)
        self._reader.join(timeout=5)


@contextmanager
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in reversed(started):
            p.stop()


def start(started: list[Proc], *args: str, netns: Netns | None = None, **kw: Any) -> Proc:
    cmd = pktipc_cmd(*args)
    p = Proc(netns.cmd(*cmd) if netns else cmd, **kw)
    started.append(p)
    return p


def gateway(started: list[Proc], server: str, keys: Keys | None, *extra: str,
            listen: str = "127.0.0.1:0", netns: Netns | None = None) -> tuple[Proc, str]:
    """A gateway of broker `server` (CURVE with `keys`, else --insecure), and
    the host:port it listens on."""
    sec = (["--key", keys.server_secret, "--keys", keys.admitted] if keys is not None
           else ["--insecure"])
    g = start(started, "gateway", "--server", server, "--listen", listen, *sec, *extra,
              netns=netns)
    m = g.wait_line(r" on tcp://(\S+),")
    return g, m[1]


@contextmanager
def two_hosts(prefix: str = "10.77") -> Iterator[tuple[Netns, Netns, str, str]]:
    """Namespaces a and b, joined by veth pair ea <-> eb, a at PREFIX.0.1 and
    b at PREFIX.0.2 (/24): two hosts. Deleted afterwards."""
    n = next(_names)
    a = Netns(f"pktipc-a{n}-{time.monotonic_ns() % 100000}")
    try:
        b = Netns(f"pktipc-b{n}-{time.monotonic_ns() % 100000}")
    except BaseException:
        a.delete()
        raise
    try:
        a.ip("link", "add", "ea", "type", "veth", "peer", "name", "eb", "netns", b.name)
        a.ip("addr", "add", f"{prefix}.0.1/24", "dev", "ea")
        b.ip("addr", "add", f"{prefix}.0.2/24", "dev", "eb")
        for ns, dev in ((a, "ea"), (b, "eb"), (a, "lo"), (b, "lo")):
            ns.ip("link", "set", dev, "up")
        yield a, b, f"{prefix}.0.1", f"{prefix}.0.2"
    finally:
        a.delete()
        b.delete()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert a.name not in listed and b.name not in listed, "namespace left behind"


# A remote client as a script: every packet's seq and digest, its gaps, the
# broker epochs it saw (from which packet on), and how it ended, as JSON in a
# file.
CLIENT = """
import hashlib, json, sys, pktipc
url, name, policy, key, server_key, out = sys.argv[1:7]
keys = {"insecure": True} if key == "-" else {"key": key, "server_key": server_key}
got, epochs = [], []
with pktipc.connect(url, name, policy=policy, reconnect=120, timeout=30, **keys) as c:
    print("attached", flush=True, file=sys.stderr)
    for batch in c:
        with batch:
            if not epochs or epochs[-1][1] != c.epoch:
                epochs.append([len(got), c.epoch])
            for p in batch:
                d = hashlib.blake2b(bytes(p.data), digest_size=8)
                d.update(b"%d %d %d" % (p.ts_ns, p.caplen, p.wirelen))
                got.append([p.seq, d.hexdigest()])
    with open(out, "w") as f:
        json.dump({"got": got, "gaps": c.gaps, "reconnects": c.reconnects,
                   "end_error": c.end_error, "epochs": epochs}, f)
"""


def digest(data: bytes, ts_ns: int, caplen: int, wirelen: int) -> str:
    d = hashlib.blake2b(data, digest_size=8)
    d.update(b"%d %d %d" % (ts_ns, caplen, wirelen))
    return d.hexdigest()


def client_script(started: list[Proc], url: str, name: str, policy: str, keys: Keys | None,
                  out: Path, netns: Netns | None = None) -> Proc:
    k = [keys.client_secret, keys.server_public] if keys else ["-", "-"]
    cmd = [sys.executable, "-c", CLIENT, url, name, policy, *k, str(out)]
    p = Proc(netns.cmd(*cmd) if netns else cmd)
    started.append(p)
    return p


def script_result(p: Proc, out: Path, timeout: float = 120) -> dict[str, Any]:
    assert p.wait(timeout) == 0, p.text()
    result: dict[str, Any] = json.loads(out.read_text())
    return result
