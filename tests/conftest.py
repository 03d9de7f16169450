"""Fixtures: a private runtime directory per test, real broker processes, and
a check that nothing (segment, socket, process) outlives a test."""

from __future__ import annotations

import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PCAPS = ROOT.parent / "shared" / "pcaps" / "tcpdump-tests"
_names = itertools.count()


def pktipc_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pktipc", *args]


def run_pktipc(*args: str, timeout: float = 60, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(pktipc_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


def all_captures() -> list[Path]:
    files = sorted(p for p in PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng"))
    assert len(files) > 50, f"expected the tcpdump test captures in {PCAPS}"
    return files


def segments(name: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"pktipc.{name}.*"))


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(d))
    return d


class Netns:
    """A network namespace of the test's own, holding veth pairs; frames are
    sent from inside it with tests/sendframes.py."""

    def __init__(self, name: str) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        # No IPv6, no addresses: the kernel sends nothing of its own.
        self.exec("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                  "net.ipv6.conf.default.disable_ipv6=1")

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *args]

    def exec(self, *args: str) -> str:
        r = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        return r.stdout

    def ip(self, *args: str) -> None:
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        assert r.returncode == 0, f"ip {args}: {r.stderr}"

    def veth(self, a: str, b: str, up: bool = True) -> None:
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        for i in (a, b) if up else ():
            self.ip("link", "set", i, "up")

    def mac(self, iface: str) -> bytes:
        return bytes.fromhex(self.exec("cat", f"/sys/class/net/{iface}/address")
                             .strip().replace(":", ""))

    def send(self, iface: str, frames: list[bytes], tmp: Path) -> int:
        path = tmp / f"frames-{next(_names)}"
        path.write_bytes(b"".join(struct.pack("<I", len(f)) + f for f in frames))
        out = self.exec(sys.executable, str(ROOT / "tests" / "sendframes.py"), iface, str(path))
        path.unlink()
        return int(out)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=True)


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A fresh network namespace, deleted (with its interfaces) afterwards."""
    ns = Netns(f"pktipc-t{os.getpid()}-{next(_names)}")
    try:
        yield ns
    finally:
        ns.delete()
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert ns.name not in listed, f"namespace {ns.name} left behind"


class BrokerProc:
    def __init__(self, name: str, args: list[str], runtime: Path,
                 netns: Netns | None = None) -> None:
        self.name = name
        self.runtime = runtime
        cmd = pktipc_cmd("serve", "--name", name, *args)
        self.proc = subprocess.Popen(netns.cmd(*cmd) if netns else cmd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.socket = runtime / f"{name}.ctl"
        self._err: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"broker exited {self.proc.returncode}: {self.stderr()}")
            if time.monotonic() > deadline:
                raise AssertionError("broker did not start")
            time.sleep(0.02)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def stderr(self) -> str:
        """What the broker wrote on stderr, once it has exited."""
        if self.proc.poll() is None:
            return ""
        if self._err is None:
            self._err = self.proc.stderr.read() if self.proc.stderr else ""
        return self._err

    def remove_leftovers(self) -> None:
        self.socket.unlink(missing_ok=True)
        (self.runtime / f"{self.name}.lock").unlink(missing_ok=True)
        for p in Path("/dev/shm").glob(f"pktipc.{self.name}.*"):
            p.unlink()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr()
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


@pytest.fixture
def broker(runtime_dir: Path) -> Iterator[object]:
    """broker(*serve_args, ready=True) starts `pktipc serve` under a fresh name;
    every broker is stopped after the test, and the test fails if one left
    its segment, control socket or lock file behind."""
    started: list[BrokerProc] = []

    def start(*args: str, ready: bool = True, netns: Netns | None = None) -> BrokerProc:
        name = f"t{os.getpid()}-{next(_names)}"
        b = BrokerProc(name, list(args), runtime_dir, netns)
        started.append(b)
        if ready:
            b.wait_ready()
        return b

    yield start
    for b in started:
        b.stop()
    for b in started:
        if b.proc.returncode == -signal.SIGKILL:
            b.remove_leftovers()        # a killed broker cannot clean up after itself
        assert segments(b.name) == [], f"broker {b.name} left its segment"
        assert not b.socket.exists(), f"broker {b.name} left its control socket"
        assert not (runtime_dir / f"{b.name}.lock").exists(), "lock file left"


@pytest.fixture
def procs() -> Iterator[object]:
    """procs.start(cmd) / procs.pktipc(*args): processes ended after the test
    (see opshelp.Procs)."""
    from opshelp import Procs

    ps = Procs()
    try:
        yield ps
    finally:
        ps.end_all()
