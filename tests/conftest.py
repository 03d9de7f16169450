"""Fixtures: a private runtime directory per test, real broker processes, and
a check that nothing (segment, socket, process) outlives a test."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pktipc import BrokerStats
from pktipc._errors import PktipcError
from pktipc._tools import traffic
from pktipc._tools.netns import Namespace

# Tests send SIGINT to the commands they start, as a user's Ctrl-C does. A
# suite started in the background (a non-interactive shell's `&`, nohup)
# has SIGINT ignored, every process it starts would inherit that, and
# Python installs no KeyboardInterrupt handler where SIGINT is ignored: the
# commands would never hear it. Caught here, it is the default again in
# every child.
signal.signal(signal.SIGINT, signal.default_int_handler)

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


def settled_stats(name: str, done: Callable[[BrokerStats], bool],
                  timeout: float = 10) -> BrokerStats:
    """The broker's statistics once `done` holds of them. A client's
    RELEASE and BYE travel on its own connection, the STATS request on
    another: the broker may answer it before it has read what the client
    sent last."""
    import pktipc
    deadline = time.monotonic() + timeout
    while True:
        stats = pktipc.broker_stats(name)
        if done(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.02)


def segments(name: str) -> list[str]:
    return sorted(p.name for p in Path("/dev/shm").glob(f"pktipc.{name}.*"))


@pytest.fixture(autouse=True)
def runtime_dir(tmp_path_factory: pytest.TempPathFactory,
                monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path_factory.mktemp("run")
    monkeypatch.setenv("PKTIPC_RUNTIME_DIR", str(d))
    return d


class Netns(Namespace):
    """The tests' namespace: a failing command fails the test."""

    def exec(self, *args: str, timeout: float = 60) -> str:
        try:
            return super().exec(*args, timeout=timeout)
        except PktipcError as e:
            pytest.fail(str(e))

    def ip(self, *args: str) -> None:
        try:
            super().ip(*args)
        except PktipcError as e:
            pytest.fail(str(e))

    def send(self, iface: str, frames: list[bytes], tmp: Path) -> int:
        """Sends `frames` on `iface`, exactly as given: how many were sent."""
        path = tmp / f"frames-{next(_names)}"
        path.write_bytes(traffic.pack(frames))
        out = self.exec(sys.executable, "-m", "pktipc._tools.traffic", "-i", iface,
                        "--frames", str(path))
        path.unlink()
        return int(out)

    def sender(self, iface: str, frames: list[bytes], tmp: Path,
               rate: float) -> subprocess.Popen[str]:
        """Sends `frames` at `rate` frames a second, in the background: its
        output is how many were sent."""
        path = tmp / f"frames-{next(_names)}"
        path.write_bytes(traffic.pack(frames))
        return subprocess.Popen(self.cmd(sys.executable, "-m", "pktipc._tools.traffic",
                                         "-i", iface, "--frames", str(path),
                                         "--rate", str(rate)),
                                stdout=subprocess.PIPE, text=True)


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
