"""`pktipc exporter` scraped by a real Prometheus server while a replay runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import pktipc_cmd
from opshelp import Procs, free_port, synth_file, wait_for
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pktipc
from pktipc._tools import exporter as _exporter

PACKETS = 6000


class Prometheus:
    """A Prometheus server of the test's own, on a loopback port, scraping
    `target` twice a second."""

    def __init__(self, procs: Procs, tmp: Path, target: str) -> None:
        exe = shutil.which("prometheus")
        assert exe, "the prometheus Debian package is missing (make deps installs it)"
        self.url = f"http://127.0.0.1:{free_port()}"
        cfg = tmp / "prometheus.yml"
        cfg.write_text("global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\n"
                       "scrape_configs:\n  - job_name: pktipc\n    static_configs:\n"
                       f"      - targets: ['{target}']\n")
        self.proc = procs.start([exe, f"--config.file={cfg}",
                                 f"--storage.tsdb.path={tmp / 'tsdb'}",
                                 f"--web.listen-address={self.url[len('http://'):]}",
                                 "--log.level=warn"])
        wait_for("prometheus to be ready", self.ready)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        return float(res[0]["value"][1]) if len(res) == 1 else None


def test_prometheus_sees_the_brokers_counts(broker, procs: Procs, tmp_path: Path) -> None:
    pcap = synth_file(tmp_path / "s.pcap", PACKETS, rate_pps=2500)   # 2.4 s at --speed 1
    b = broker("-r", str(pcap), "--speed", "1", "--wait-clients", "2", "--linger",
               "--slabs", "8", "--slab-size", "64k")
    port = free_port()
    procs.pktipc("exporter", "--listen", f"127.0.0.1:{port}")
    prom = Prometheus(procs, tmp_path, f"127.0.0.1:{port}")
    # Prometheus applies its targets a few seconds after it starts.
    wait_for("a first scrape", lambda: prom.value(f'pktipc_up{{broker="{b.name}"}}') == 1)
    stalled = procs.stalled(b.name, "stalled")
    rec = procs.pktipc("dump", "--server", b.name, "--client", "rec", "-w", "/dev/null")
    assert rec.wait(timeout=30) == 0

    sel = f'broker="{b.name}"'
    st = pktipc.broker_stats(b.name)
    assert st.state == "ended" and st.counters.packets == PACKETS
    [mine] = st.clients      # the other one read everything and left
    assert mine.name == "stalled" and stalled.poll() is None
    drops = mine.drops
    assert drops > 0

    assert wait_for("Prometheus to scrape the final counts",
                    lambda: prom.value(f"pktipc_packets_total{{{sel}}}") == PACKETS)
    assert prom.value(f'pktipc_client_dropped_packets_total{{{sel},client="stalled"}}') \
        == drops
    assert prom.value(f'pktipc_client_packets_total{{{sel},client="stalled"}}') \
        == mine.packets
    assert prom.value(f"pktipc_source_packets_total{{{sel}}}") == PACKETS
    assert prom.value(f"pktipc_source_bytes_total{{{sel}}}") == st.counters.bytes
    assert prom.value(f'pktipc_broker_state{{{sel},state="ended"}}') == 1
    assert prom.value(f"pktipc_up{{{sel}}}") == 1
    # Scraped while the replay ran: the counter was seen rising, never falling.
    assert prom.value(f"min_over_time(pktipc_packets_total{{{sel}}}[1m])") < PACKETS
    assert prom.value(f"resets(pktipc_packets_total{{{sel}}}[1m])") == 0


def _stats(**over: Any) -> dict[str, Any]:
    """A STATS reply of a live broker with one client (what Broker.stats() says)."""
    counters = dict(packets=10, bytes=1000, batches=2, broker_drops=0, client_drops=3,
                    protocol_errors=1, clients=1, clients_total=2, evictions=1)
    s = {"name": "tap", "pid": 1, "epoch": 1, "shm": "/x", "endpoint": "ipc://x",
         "state": "running", "uptime_s": 1.0, "start_time_s": 1.7e9, "counters": counters,
         "slabs": {"size": 4096, "count": 8, "free": 5},
         "sources": [{"name": "eth1", "linktype": 1, "snaplen": 262144, "packets": 10,
                      "bytes": 1000, "kind": "interface", "ifindex": 3,
                      "kernel_packets": 12, "kernel_drops": 2, "kernel_freezes": 0}],
         "clients": [{"name": "ids", "group": "ids", "slot": 0, "policy": "drop",
                      "credit": 4, "pid": 2, "batches": 2, "packets": 7, "drops": 3,
                      "held": 1, "queued": 0, "attached": True, "gaps": 1,
                      "reconnections": 1, "lag_packets": 5, "lag_s": 0.25}],
         "groups": [{"name": "ids", "balance": "flow", "shared": False, "members": ["ids"],
                     "changes": 1, "packets": 7}],
         "refused": {"backoff": 2, "group-private": 1}, "tx_refused": {},
         "control": {"connections": 3, "max_connections": 128, "connections_refused": 4,
                     "handshakes_failed": 0, "connections_cut": 1,
                     "messages_over_budget": 9, "connections_dropped": 0,
                     "accepts_deferred": 0}}
    s.update(over)
    return s


def test_names_follow_prometheus_conventions() -> None:
    class Fixed:
        def collect(self) -> Any:
            return _exporter.metrics([("tap", pktipc.BrokerStats.from_reply(_stats())),
                                      ("gone", None)])

    text = generate_latest(Fixed()).decode()     # type: ignore[arg-type]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for f in families.values():
        assert f.name.startswith("pktipc_")
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}
    b, ids = ("broker", "tap"), (("broker", "tap"), ("client", "ids"), ("group", "ids"))
    assert value[("pktipc_up", (("broker", "gone"),))] == 0
    assert value[("pktipc_up", (b,))] == 1
    assert value[("pktipc_kernel_dropped_packets_total", (b, ("iface", "eth1")))] == 2
    assert value[("pktipc_client_dropped_packets_total", ids)] == 3
    assert value[("pktipc_client_lag_seconds", ids)] == 0.25
    assert value[("pktipc_client_gaps_total", ids)] == 1
    assert value[("pktipc_client_reconnections_total", ids)] == 1
    assert value[("pktipc_evictions_total", (b,))] == 1
    assert value[("pktipc_refused_hellos_total", (b,))] == 3
    assert value[("pktipc_refused_connections_total", (b,))] == 4
    assert value[("pktipc_cut_connections_total", (b,))] == 1
    assert value[("pktipc_messages_over_budget_total", (b,))] == 9
    assert value[("pktipc_control_connections", (b,))] == 3
    assert value[("pktipc_slabs_free", (b,))] == 5
    assert value[("pktipc_clients_attached", (b,))] == 1
    # Nothing of a broker that did not answer but its `up`.
    assert not [k for k in value if ("broker", "gone") in k[1] and k[0] != "pktipc_up"]


def test_listen_address_is_checked() -> None:
    assert _exporter.parse_listen("127.0.0.1:9473") == ("127.0.0.1", 9473)
    assert _exporter.parse_listen("[::1]:80") == ("::1", 80)
    for bad in ("9473", "host:", "host:0", "host:http", "host:70000"):
        with pytest.raises(ValueError, match="ADDRESS:PORT"):
            _exporter.parse_listen(bad)


def test_exporter_refuses_a_port_in_use(procs: Procs) -> None:
    port = free_port()
    first = procs.pktipc("exporter", "--listen", f"127.0.0.1:{port}")
    assert first.stderr is not None and "serving" in first.stderr.readline()
    r = subprocess.run(pktipc_cmd("exporter", "--listen", f"127.0.0.1:{port}"),
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot listen on 127.0.0.1" in r.stderr

