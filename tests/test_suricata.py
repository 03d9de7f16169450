"""Suricata 7 through pktipc's capture plugin (clients/suricata/), the real
Suricata against real brokers: the same alerts and decoded packets as
`suricata -r` in workers (one and three members) and autofp; live traffic
with VLAN and QinQ on a veth pair while a recorder gets every frame; a
broker killed and started again; a stalled member's drops in Suricata's own
counters; no slab held once Suricata is gone; one clear line for bad
arguments and an absent broker."""

from __future__ import annotations

import itertools
import json
import os
import signal
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, ROOT, BrokerProc, Netns, all_captures, pktipc_cmd
from pcapref import read_pcap
from test_live import frame

import pktipc

SDIR = ROOT / "clients" / "suricata"
PLUGIN = SDIR / "build" / "pktipc.so"
_runs = itertools.count()

YAML = """%YAML 1.1
---
default-rule-path: {dir}
rule-files: [test.rules]
outputs:
  - eve-log:
      enabled: yes
      filename: eve.json
      types: [alert, stats: {{totals: yes, threads: no}}]
stats:
  enabled: yes
  interval: 1
logging:
  default-log-level: notice
  outputs:
    - console: {{enabled: yes}}
"""

# Rules that fire on most packets, on flow state, on payload, on the
# application layer and on decoder events.
RULES = """
alert ip any any -> any any (msg:"IP packet"; sid:1;)
alert tcp any any -> any any (msg:"TCP SYN"; flags:S,12; sid:2;)
alert udp any any -> any any (msg:"UDP"; sid:3;)
alert icmp any any -> any any (msg:"ICMP"; sid:4;)
alert tcp any any -> any any (msg:"TCP payload"; dsize:>0; sid:5;)
alert tcp any any -> any any (msg:"TCP established"; flow:established; sid:6;)
alert udp any any -> any any (msg:"zero byte in UDP payload"; content:"|00|"; sid:7;)
alert ip any any -> any any (msg:"TTL below 64"; ttl:<64; sid:8;)
alert ip any any -> any any (msg:"more fragments"; fragbits:M; sid:9;)
alert dns any any -> any any (msg:"DNS query"; dns.query; content:"."; sid:10;)
alert pkthdr any any -> any any (msg:"IPv4 truncated"; decode-event:ipv4.trunc_pkt; sid:11;)
alert pkthdr any any -> any any (msg:"IPv6 truncated"; decode-event:ipv6.trunc_pkt; sid:12;)
alert ip any any -> any any (msg:"to server"; flow:to_server; sid:13;)
"""

MARK = b"PKTIPC-MARK-"
AFTER = b"PKTIPC-AFTER-"
LIVE_RULES = f"""
alert udp any any -> any any (msg:"marker"; content:"{MARK.decode()}"; sid:100;)
alert udp any any -> any any (msg:"after restart"; content:"{AFTER.decode()}"; sid:101;)
"""


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The plugin, as `make -C clients/suricata` leaves it."""
    r = subprocess.run(["make", "-s", "-C", str(SDIR)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


class Suricata:
    """`suricata --capture-plugin=pktipc` in a directory of its own: its
    configuration, rules, console output and eve.json."""

    def __init__(self, root: Path, plugin_args: str, rules: str = RULES,
                 runmode: str = "workers", extra: tuple[str, ...] = ()) -> None:
        self.dir = root / f"suricata-{next(_runs)}"
        self.dir.mkdir()
        (self.dir / "suricata.yaml").write_text(YAML.format(dir=self.dir))
        (self.dir / "test.rules").write_text(rules)
        self.console = self.dir / "console.txt"
        self.cmd = ["suricata", "-c", str(self.dir / "suricata.yaml"), "-l", str(self.dir),
                    "-k", "none", "--set", f"plugins.0={PLUGIN}", "--capture-plugin=pktipc",
                    f"--capture-plugin-args={plugin_args}", "--runmode", runmode,
                    "--set", "threading.detect-thread-ratio=2", *extra]
        with open(self.console, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.console.read_text()

    def wait_running(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while "Engine started" not in self.output():
            assert self.proc.poll() is None, f"suricata exited: {self.output()}"
            assert time.monotonic() < deadline, f"suricata did not start: {self.output()}"
            time.sleep(0.05)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait()

    def events(self, kind: str) -> list[dict[str, Any]]:
        f = self.dir / "eve.json"
        if not f.exists():
            return []
        out = []
        for line in f.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:          # a line still being written
                continue
            if e["event_type"] == kind:
                out.append(e)
        return out

    def alerts(self) -> Counter[int]:
        return Counter(e["alert"]["signature_id"] for e in self.events("alert"))

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = self.events("stats")[-1]["stats"]
        return s

    def wait_alerts(self, sid: int, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.alerts()[sid] < count:
            assert self.proc.poll() is None, f"suricata exited: {self.output()}"
            assert time.monotonic() < deadline, (
                f"{self.alerts()[sid]} alerts of sid {sid}, not {count}")
            time.sleep(0.05)


@pytest.fixture
def suricata(tmp_path: Path) -> Iterator[Any]:
    """suricata(plugin_args, ...) starts Suricata through the plugin; every
    one still running is killed after the test."""
    started: list[Suricata] = []

    def start(plugin_args: str, **kw: Any) -> Suricata:
        s = Suricata(tmp_path, plugin_args, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait()


def members_attached(server: str, names: list[str], timeout: float = 20
                     ) -> list[pktipc.ClientStats]:
    deadline = time.monotonic() + timeout
    while True:
        clients = [c for c in pktipc.broker_stats(server).clients if c.attached]
        if set(names) <= {c.name for c in clients}:
            return clients
        assert time.monotonic() < deadline, f"attached: {clients}"
        time.sleep(0.05)


# --- the same as `suricata -r` -----------------------------------------------------------


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Ethernet captures merged in time order. Left out: the five with a
    time past 2038, which Debian 12's libpcap (and so `suricata -r`) reads
    as negative while pktipc reads them as the format defines them. (Merged
    as pcapng, which libpcap reads right, they took the stream's clock
    decades ahead at its end, and Suricata with three workers then raised
    one alert more or less from one run to the next.)"""
    files = []
    for f in all_captures():
        ref = read_pcap(str(f))
        if (f.suffix == ".pcap" and ref.linktype == 1 and ref.error is None
                and all(p.ts_ns < 2**31 * 10**9 for p in ref.packets)):
            files.append(str(f))
    assert len(files) > 40
    out = tmp_path_factory.mktemp("merged") / "ethernet.pcap"
    subprocess.run(["mergecap", "-F", "pcap", "-w", str(out), *files], check=True)
    return out


@pytest.fixture(scope="module")
def reference(merged: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What `suricata -r` makes of the merged file, with the same settings."""
    d = tmp_path_factory.mktemp("reference")
    (d / "suricata.yaml").write_text(YAML.format(dir=d))
    (d / "test.rules").write_text(RULES)
    r = subprocess.run(["suricata", "-c", str(d / "suricata.yaml"), "-l", str(d), "-k", "none",
                        "-r", str(merged)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    events = [json.loads(x) for x in (d / "eve.json").read_text().splitlines()]
    alerts = [e for e in events if e["event_type"] == "alert"]
    return {"alerts": Counter(e["alert"]["signature_id"] for e in alerts),
            "at": Counter((e["alert"]["signature_id"], e.get("pcap_cnt")) for e in alerts),
            "stats": [e for e in events if e["event_type"] == "stats"][-1]["stats"]}


@pytest.mark.parametrize("runmode,threads", [("workers", 1), ("workers", 3), ("autofp", 2)])
def test_same_alerts_as_suricata_r(broker: Any, suricata: Any, merged: Path,
                                   reference: dict[str, Any], runmode: str,
                                   threads: int) -> None:
    """A broker serving the merged captures to Suricata's members (lossless):
    every signature fires as often, on the same packets (pcap_cnt is the
    packet's number in the stream), and Suricata decodes as many packets as
    `suricata -r` does on the file. Two packets are larger than Suricata
    takes: counted, and not decoded, as -r does not decode them either."""
    b = broker("-r", str(merged), "--wait-clients", str(threads))
    s = suricata(f"server={b.name},threads={threads},policy=block", runmode=runmode)
    assert s.wait() == 0, s.output()                  # at the end of the stream, like -r
    assert b.wait() == 0                               # every slab came back
    assert s.alerts() == reference["alerts"]
    assert sum(reference["alerts"].values()) > 500 and len(reference["alerts"]) >= 12
    assert Counter((e["alert"]["signature_id"], e.get("pcap_cnt"))
                   for e in s.events("alert")) == reference["at"]
    stats, ref = s.stats(), reference["stats"]
    assert stats["decoder"]["pkts"] == ref["decoder"]["pkts"] > 400
    assert stats["decoder"]["bytes"] == ref["decoder"]["bytes"]
    packets = len(read_pcap(str(merged)).packets)
    assert stats["capture"]["kernel_packets"] == packets
    assert stats["capture"]["kernel_drops"] == 0
    assert stats["capture"]["pktipc"]["oversize"] == 2 == packets - ref["decoder"]["pkts"]
    assert f"{threads} member" in s.output()


# --- live ----------------------------------------------------------------------------------


def ip_checksum(h: bytes) -> int:
    s = sum(struct.unpack(f"!{len(h) // 2}H", h))
    s = (s & 0xFFFF) + (s >> 16)
    return ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF


def udp(sport: int, dport: int, payload: bytes, host: int = 1) -> bytes:
    """An IPv4 UDP datagram with a valid header checksum (no UDP checksum)."""
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), 0, 0, 64, 17, 0,
                    bytes([10, 1, 0, host]), bytes([10, 2, 0, 1]))
    h = h[:10] + struct.pack("!H", ip_checksum(h)) + h[12:]
    return h + struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


DST = b"\x02\x00\x00\x00\x00\x99"


def markers(word: bytes, n: int) -> list[bytes]:
    """n marker frames over many flows, a third each plain, 802.1Q and QinQ."""
    tags: list[list[tuple[int, int]]] = [[], [(0x8100, 100)], [(0x88A8, 200), (0x8100, 300)]]
    return [frame(DST, udp(4000 + i, 7000, word + b"%04d" % i, host=i % 200 + 1), *tags[i % 3])
            for i in range(n)]


def filler(n: int) -> list[bytes]:
    return [frame(DST, udp(5000 + i % 300, 9000, bytes(64), host=i % 100 + 1)) for i in range(n)]


@pytest.fixture
def ns(netns: Netns) -> Netns:
    netns.veth("va", "vb")
    return netns


def live_broker(broker: Any, ns: Netns, *args: str) -> BrokerProc:
    b: BrokerProc = broker("-i", "va", "--block-timeout", "2", *args, netns=ns)
    return b


def test_live_markers_with_vlan_and_qinq(ns: Netns, broker: Any, suricata: Any,
                                         tmp_path: Path) -> None:
    """Frames sent into a veth pair: Suricata's two members alert on every
    marker frame, tagged or not, and see the tags as they were on the wire;
    `pktipc dump` on the same broker records every frame."""
    b = live_broker(broker, ns)
    marks = markers(MARK, 90)
    frames = [f for pair in zip(marks, filler(90), strict=True) for f in pair] + filler(120)
    rec = tmp_path / "rec.pcap"
    dump = subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--client", "rec", "-w",
                                       str(rec), "-c", str(len(frames))),
                            stderr=subprocess.PIPE, text=True)
    s = suricata(f"server={b.name},threads=2", rules=LIVE_RULES)
    s.wait_running()
    members_attached(b.name, ["suricata-1", "suricata-2", "rec"])
    assert ns.send("vb", frames, tmp_path) == len(frames)
    s.wait_alerts(100, len(marks))
    _, err = dump.communicate(timeout=30)
    assert dump.returncode == 0, err
    assert [p.data for p in read_pcap(str(rec)).packets] == frames
    assert s.stop() == 0, s.output()
    alerts = [e for e in s.events("alert") if e["alert"]["signature_id"] == 100]
    assert len(alerts) == len(marks)
    assert Counter(tuple(e.get("vlan", [])) for e in alerts) == {
        (): 30, (100,): 30, (200, 300): 30}
    stats = s.stats()
    assert stats["capture"]["kernel_packets"] == len(frames)
    assert stats["capture"]["kernel_drops"] == 0
    got = {c.name: c.packets for c in pktipc.broker_stats(b.name).clients}
    assert got.get("suricata-1", 0) + got.get("suricata-2", 0) in (0, len(frames))


def test_broker_killed_and_started_again(ns: Netns, runtime_dir: Path, suricata: Any,
                                         tmp_path: Path) -> None:
    """kill -9 of the broker under Suricata, and a new broker of the same
    name: Suricata stays up, its member attaches by itself and alerts on what
    is sent afterwards; the reattachment is counted."""
    name = f"t{os.getpid()}-restart"
    args = ["-i", "va", "--block-timeout", "2", "--heartbeat", "0.2"]
    first = BrokerProc(name, args, runtime_dir, ns)
    second = None
    try:
        first.wait_ready()
        s = suricata(f"server={name},threads=1", rules=LIVE_RULES)
        s.wait_running()
        members_attached(name, ["suricata-1"])
        ns.send("vb", markers(MARK, 20), tmp_path)
        s.wait_alerts(100, 20)
        first.proc.kill()
        first.wait()
        first.stop()
        second = BrokerProc(name, args, runtime_dir, ns)
        second.wait_ready()
        members_attached(name, ["suricata-1"])
        ns.send("vb", markers(AFTER, 30), tmp_path)
        s.wait_alerts(101, 30)
        assert s.proc.poll() is None
        assert s.stop() == 0, s.output()
        assert s.stats()["capture"]["pktipc"]["reconnects"] == 1
        assert s.alerts() == {100: 20, 101: 30}
    finally:
        if second is not None:
            second.stop()
        first.stop()
        first.remove_leftovers()


def test_stalled_member_drops_are_suricatas_drops(ns: Netns, broker: Any, suricata: Any,
                                                 tmp_path: Path) -> None:
    """Suricata stopped (SIGSTOP) while traffic flows, as a `drop` member: the
    recorder beside it (lossless, `block`) loses nothing; once it runs again, Suricata's
    capture.kernel_drops are exactly the drops pktipc counted for it."""
    b = live_broker(broker, ns, "--block-size", "64k", "--slab-size", "64k", "--slabs", "8",
                    "--allow-block", "rec")
    first, stalled, after = filler(100), filler(5000), markers(MARK, 30)
    total = len(first) + len(stalled) + len(after)
    rec = tmp_path / "rec.pcap"
    dump = subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--client", "rec", "-w",
                                       str(rec), "-c", str(total), "--policy", "block"),
                            stderr=subprocess.PIPE, text=True)
    s = suricata(f"server={b.name},threads=1,policy=drop", rules=LIVE_RULES)
    s.wait_running()
    members_attached(b.name, ["suricata-1", "rec"])
    ns.send("vb", first, tmp_path)
    os.kill(s.pid, signal.SIGSTOP)
    try:
        ns.send("vb", stalled, tmp_path)
        time.sleep(0.3)
    finally:
        os.kill(s.pid, signal.SIGCONT)
    ns.send("vb", after, tmp_path)        # after the gap, which is told before them
    s.wait_alerts(100, len(after))
    _, err = dump.communicate(timeout=30)
    assert dump.returncode == 0, err
    assert len(read_pcap(str(rec)).packets) == total
    stats = pktipc.broker_stats(b.name)
    (member,) = [c for c in stats.clients if c.name == "suricata-1"]
    assert member.group == "suricata" and member.policy == "drop"
    assert member.drops > 1000
    assert stats.sources[0].kernel_drops == stats.counters.broker_drops == 0
    assert s.stop() == 0, s.output()
    cap = s.stats()["capture"]
    assert cap["kernel_drops"] == cap["pktipc"]["member_drops"] == member.drops
    assert cap["kernel_packets"] == total
    assert s.stats()["decoder"]["pkts"] == total - member.drops


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_no_slab_held_after_suricata_exits(ns: Netns, broker: Any, suricata: Any,
                                          tmp_path: Path, how: int) -> None:
    """Suricata in autofp (packets released by its detection threads) gone,
    normally or killed: every slab is back at the broker (but the one it
    fills) and no client of it holds one."""
    b = live_broker(broker, ns, "--slabs", "8", "--block-size", "64k", "--slab-size", "64k")
    idle = pktipc.broker_stats(b.name).slabs.free     # the broker fills one itself
    s = suricata(f"server={b.name},threads=2", rules=LIVE_RULES, runmode="autofp")
    s.wait_running()
    members_attached(b.name, ["suricata-1", "suricata-2"])
    ns.send("vb", filler(2000) + markers(MARK, 30), tmp_path)
    s.wait_alerts(100, 30)
    rc = s.stop(how)
    assert rc == (0 if how == signal.SIGTERM else -signal.SIGKILL), s.output()
    deadline = time.monotonic() + 10
    while True:
        stats = pktipc.broker_stats(b.name)
        if (stats.slabs.free == idle >= 7
                and not [c for c in stats.clients if c.attached or c.held]):
            break
        assert time.monotonic() < deadline, (stats.slabs, stats.clients)
        time.sleep(0.05)


# --- bad use ---------------------------------------------------------------------------------


def error_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("E: ")]


@pytest.mark.parametrize("args,message", [
    ("", "no broker given: --capture-plugin-args=server=NAME"),
    ("server=nosuch", "cannot attach to broker 'nosuch' as 'suricata-1'"),
    ("server=x,threads=0", "threads must be a number from 1 to 64, not '0'"),
    ("server=x,policy=maybe", "policy must be drop or block, not 'maybe'"),
    ("server=x,colour=blue", "unknown setting 'colour' in --capture-plugin-args"),
    ("server=x,blue", "'blue' in --capture-plugin-args is not key=value"),
])
def test_bad_arguments_and_absent_broker(suricata: Any, args: str, message: str) -> None:
    s = suricata(args)
    assert s.wait(timeout=30) != 0
    out = s.output()
    (line,) = error_lines(out)
    assert line.startswith("E: pktipc: ") and message in line, out
    assert "Engine started" not in out


def test_refused_name_and_balance(broker: Any, suricata: Any) -> None:
    """A broker that refuses the name (taken) or the group's balance mode:
    one line saying so and what to do."""
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "3", "--linger")
    with pktipc.connect(b.name, "suricata-1"):
        s = suricata(f"server={b.name}")
        assert s.wait(timeout=30) != 0
        (line,) = error_lines(s.output())
        assert "suricata-1" in line and "prefix=" in line, line
    with pktipc.connect(b.name, "rr-1", group="suricata", balance="round-robin"):
        s = suricata(f"server={b.name},threads=1,balance=flow")
        assert s.wait(timeout=30) != 0
        (line,) = error_lines(s.output())
        assert "balance" in line, line
