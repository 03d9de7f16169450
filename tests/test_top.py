"""`pktipc top` in a real terminal (tmux, 80x24) and through a pipe, against a
live broker with three clients, one of them stalled."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_pktipc
from opshelp import Procs, synth_file, wait_for

from pktipc._tools import top as _top


@pytest.fixture
def stream(broker, procs: Procs, tmp_path: Path) -> str:
    """A broker replaying 2000 packets a second for ever, to an `ids` group
    member, a recorder, and a `drop` client that reads nothing (and keeps its
    place however long a loaded machine makes the test: no lease)."""
    pcap = synth_file(tmp_path / "s.pcap", 2000, rate_pps=2000)
    b = broker("-r", str(pcap), "--speed", "1", "--loop", "0", "--wait-clients", "3",
               "--slabs", "8", "--slab-size", "64k", "--lease", "0")
    procs.pktipc("dump", "--server", b.name, "--client", "ids-1", "--group", "ids",
                 "-w", "/dev/null")
    procs.pktipc("dump", "--server", b.name, "--client", "recorder", "-w", "/dev/null")
    procs.stalled(b.name, "stalled")
    return str(b.name)


class Tmux:
    """A tmux server of the test's own (its own socket), killed afterwards."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock

    def __call__(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(["tmux", "-S", str(self.sock), *args], capture_output=True,
                           text=True, timeout=10)
        assert r.returncode == 0 or not check, f"tmux {args}: {r.stderr}"
        return r.stdout if r.returncode == 0 else ""

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top", check=False)


@pytest.fixture
def tmux(tmp_path: Path) -> Iterator[Tmux]:
    t = Tmux(tmp_path / "tmux.sock")
    try:
        yield t
    finally:
        t("kill-server", check=False)


def _row(screen: str, client: str) -> list[str]:
    return next(line.split() for line in screen.splitlines()
                if re.search(rf"(^|\s){client}\s", line))


def test_top_in_an_80x24_terminal(stream: str, tmux: Tmux) -> None:
    tmux("new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
         "-e", f"PKTIPC_RUNTIME_DIR={os.environ['PKTIPC_RUNTIME_DIR']}",
         f"{sys.executable} -m pktipc top -d 0.3")

    def rates_shown() -> str | None:
        s = tmux.screen()
        if not all(name in s for name in ("ids-1", "recorder", "stalled")):
            return None
        rates = _row(s, "recorder")[3], _row(s, "ids-1")[3]
        drops = _row(s, "stalled")[-3]
        return s if all(r.endswith("k") for r in rates) and drops.endswith("k") else None

    s = wait_for("top to show rates", rates_shown, timeout=20, every=0.3)
    ids, rec, stalled = _row(s, "ids-1"), _row(s, "recorder"), _row(s, "stalled")
    assert ids[:3] == ["ids-1", "ids", "block"] and rec[:3] == ["recorder", "recorder", "block"]
    assert float(ids[3].rstrip("k")) > 1 and ids[4] == "0"          # k packets/s, no drops
    # The stalled client: highlighted as the slowest, dropping at the stream's rate.
    assert stalled[:4] == [">", "stalled", "stalled", "drop"], s
    assert stalled[4] == "0" and stalled[5] != "0" and stalled[6].endswith("k"), s
    assert stream in s and "q: quit" in s
    assert len(s.rstrip("\n").splitlines()) <= 24
    tmux("send-keys", "-t", "top", "q")
    wait_for("q to end top", lambda: not tmux("has-session", "-t", "top", check=False)
             and not tmux.screen(), timeout=10)


def test_top_without_a_terminal_prints_plain_tables(stream: str) -> None:
    def two_rates() -> str | None:
        r = run_pktipc("top", "-n", "2", "-d", "0.3")
        assert r.returncode == 0, r.stderr
        return r.stdout if "k" in _row(r.stdout.split("-- ")[-1], "recorder")[3] else None

    out = wait_for("rates in plain tables", two_rates, timeout=20)
    assert "\x1b" not in out                  # no escape sequences
    frames = [f for f in out.split("-- ") if f]
    assert len(frames) == 2
    for f in frames:
        assert all(name in f for name in ("ids-1", "recorder", "stalled", stream))
    assert _row(frames[0], "recorder")[3] == "-"       # no rate before a second reply
    assert _row(frames[1], "stalled")[0] == ">"


def test_top_says_when_no_broker_runs() -> None:
    r = run_pktipc("top", "-n", "1")
    assert r.returncode == 0 and r.stdout.endswith("no broker is running\n")
    r = run_pktipc("top", "-n", "1", "nobody")
    assert r.returncode == 0 and "nobody: broker 'nobody' is not running" in r.stdout


def test_si_and_slowest() -> None:
    assert [_top.si(x) for x in (0, 7, 999, 1000, 1234567, 2.5e9, 0.5)] == \
        ["0", "7", "999", "1k", "1.23M", "2.5G", "0.5"]
    c = dict(attached=True, queued=0, drops=0, lag_packets=0)
    clients = [SimpleNamespace(**dict(c, name="a")),
               SimpleNamespace(**dict(c, name="b", lag_packets=9)),
               SimpleNamespace(**dict(c, name="gone", lag_packets=99, attached=False))]
    assert _top.slowest(SimpleNamespace(clients=clients)) == "b"     # type: ignore[arg-type]
    assert _top.slowest(SimpleNamespace(clients=clients[:1])) is None   # type: ignore[arg-type]
