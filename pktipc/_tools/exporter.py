"""Prometheus metrics of every broker on the host, read from their STATS replies.

A process of its own rather than a thread in the broker: the broker's loop
stays single-threaded (no HTTP server taking the GIL during a scrape), a
scrape costs it one STATS request answered between batches, and the
exporter keeps serving across broker restarts. The exposition format is
prometheus_client's; the mapping from STATS to metric names and labels is
below, and nowhere else.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from .._client.client import broker_stats, brokers
from .._errors import PktipcError
from .._stats import BrokerStats

DEFAULT_LISTEN = "127.0.0.1:9473"
STATES = ("starting", "running", "ended")

Stats = BrokerStats
Labels = tuple[str, ...]

# name (without the prefix), type, help, labels, how to read it from STATS.
# Counters are named without _total here: prometheus_client adds it.
# Per broker (label: broker), from the broker's counters and slabs.
BROKER: list[tuple[str, str, str, Callable[[Stats], float]]] = [
    ("packets", "counter", "Packets placed in slabs.", lambda s: s.counters.packets),
    ("bytes", "counter", "Captured bytes placed in slabs.", lambda s: s.counters.bytes),
    ("batches", "counter", "Batches published.", lambda s: s.counters.batches),
    ("broker_dropped_packets", "counter", "Packets the broker could not place.",
     lambda s: s.counters.broker_drops),
    ("skipped_deliveries", "counter",
     "Packet deliveries skipped for lagging drop clients, every client ever "
     "(per client: pktipc_client_dropped_packets_total).",
     lambda s: s.counters.client_drops),
    ("protocol_errors", "counter", "Malformed or refused control messages.",
     lambda s: s.counters.protocol_errors),
    ("evictions", "counter", "Clients the broker detached (lease broken, silent, "
     "process gone, unreachable, flooding), not counting those that said goodbye.",
     lambda s: s.counters.evictions),
    ("refused_hellos", "counter", "HELLOs refused (name taken, group not theirs, "
     "back-off, block not allowed, too many clients).",
     lambda s: sum(s.refused.values())),
    ("control_connections", "gauge", "Control connections open now.",
     lambda s: s.control.connections),
    ("refused_connections", "counter", "Control connections refused: too many, or a "
     "process cut off for flooding, still in its back-off.",
     lambda s: s.control.connections_refused),
    ("deferred_accepts", "counter", "Control connections that found the broker's file "
     "table full and waited for room.", lambda s: s.control.accepts_deferred),
    ("cut_connections", "counter", "Control connections cut: their peer flooded or did "
     "not read.", lambda s: s.control.connections_cut),
    ("messages_over_budget", "counter", "Control messages dropped unread: beyond their "
     "peer's budget (serve --control-rate).",
     lambda s: s.control.messages_over_budget),
    ("attachments", "counter", "Clients attached, resumed ones included.",
     lambda s: s.counters.clients_total),
    ("clients_attached", "gauge", "Clients attached now.",
     lambda s: sum(c.attached for c in s.clients)),
    ("slabs", "gauge", "Slabs in the ring.", lambda s: s.slabs.count),
    ("slabs_free", "gauge", "Slabs no client holds or is owed.", lambda s: s.slabs.free),
    ("slab_size_bytes", "gauge", "Bytes per slab.", lambda s: s.slabs.size),
    ("broker_start_time_seconds", "gauge", "When the broker started, seconds since the "
     "Unix epoch.", lambda s: s.start_time_s),
]

# Per source (labels: broker, iface); the kernel's only for interfaces.
SOURCE: list[tuple[str, str, str, str]] = [
    ("source_packets", "counter", "Packets from this source placed in slabs.", "packets"),
    ("source_bytes", "counter", "Captured bytes from this source placed in slabs.", "bytes"),
    ("kernel_packets", "counter", "Packets the kernel saw on this interface.",
     "kernel_packets"),
    ("kernel_dropped_packets", "counter", "Packets the kernel dropped (its ring was full).",
     "kernel_drops"),
    ("kernel_freezes", "counter", "Times the kernel's ring froze.", "kernel_freezes"),
]

# Per client (labels: broker, client, group).
CLIENT: list[tuple[str, str, str, str]] = [
    ("client_packets", "counter", "Packets handed to this client.", "packets"),
    ("client_batches", "counter", "Batches handed to this client.", "batches"),
    ("client_dropped_packets", "counter", "Packets skipped for this client while it lagged "
     "(drop policy).", "drops"),
    ("client_gaps", "counter", "GAP notices sent to this client.", "gaps"),
    ("client_reconnections", "counter", "Times this client came back to the place the "
     "broker kept for it (--grace).", "reconnections"),
    ("client_held_batches", "gauge", "Batches this client holds now.", "held"),
    ("client_credit_batches", "gauge", "Batches this client may hold at once.", "credit"),
    ("client_queued_batches", "gauge", "Batches owed to this client, waiting for its "
     "credit.", "queued"),
    ("client_lag_packets", "gauge", "Packets owed to this client and not given back yet.",
     "lag_packets"),
    ("client_lag_seconds", "gauge", "How long this client has held its oldest batch.",
     "lag_s"),
    ("client_attached", "gauge", "1 while attached, 0 while its place is kept (--grace).",
     "attached"),
]


def _family(kind: str, name: str, doc: str,
            labels: Sequence[str]) -> CounterMetricFamily | GaugeMetricFamily:
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    return cls(f"pktipc_{name}", doc, labels=labels)


def metrics(replies: Iterable[tuple[str, Stats | None]]) -> Iterator[Metric]:
    """Metric families for (broker name, its STATS reply or None if it did
    not answer)."""
    replies = list(replies)
    up = GaugeMetricFamily("pktipc_up", "1 if the broker answered STATS.", labels=["broker"])
    state = GaugeMetricFamily("pktipc_broker_state", "The broker's state (1 for the "
                              "current one).", labels=["broker", "state"])
    info = GaugeMetricFamily("pktipc_client_info", "A client's policy and slot (always 1).",
                             labels=["broker", "client", "group", "policy", "slot"])
    members = GaugeMetricFamily("pktipc_group_members", "Members of a group, by balance "
                                "mode.", labels=["broker", "group", "balance"])
    broker_f = [(_family(k, n, d, ["broker"]), get) for n, k, d, get in BROKER]
    source_f = [(_family(k, n, d, ["broker", "iface"]), key) for n, k, d, key in SOURCE]
    client_f = [(_family(k, n, d, ["broker", "client", "group"]), key)
                for n, k, d, key in CLIENT]
    for name, s in replies:
        up.add_metric([name], 0 if s is None else 1)
        if s is None:
            continue
        for st in STATES:
            state.add_metric([name, st], float(s.state == st))
        for fam, get in broker_f:
            fam.add_metric([name], get(s))
        for src in s.sources:
            for fam, key in source_f:
                if getattr(src, key) is not None:
                    fam.add_metric([name, src.name], getattr(src, key))
        for c in s.clients:
            info.add_metric([name, c.name, c.group, c.policy, str(c.slot)], 1)
            for fam, key in client_f:
                fam.add_metric([name, c.name, c.group], float(getattr(c, key)))
        for g in s.groups:
            members.add_metric([name, g.name, g.balance], len(g.members))
    yield up
    yield state
    for fam, _ in (*broker_f, *source_f, *client_f):
        yield fam
    yield info
    yield members


class BrokerCollector(Collector):
    """Asks each broker (those named, else every one in the runtime
    directory) for its STATS at every scrape."""

    def __init__(self, names: Sequence[str] = (), timeout: float = 1.0) -> None:
        self.names = list(names)
        self.timeout = timeout

    def _replies(self) -> Iterator[tuple[str, Stats | None]]:
        for name in self.names or brokers():
            try:
                yield name, broker_stats(name, timeout=self.timeout)
            except PktipcError:
                yield name, None

    def collect(self) -> Iterator[Metric]:
        return metrics(self._replies())

    def describe(self) -> Iterator[Metric]:
        return metrics([])


def registry(names: Sequence[str] = (), timeout: float = 1.0) -> CollectorRegistry:
    """The brokers' metrics and the exporter's own process metrics."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(BrokerCollector(names, timeout))
    ProcessCollector(registry=reg)
    return reg


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {text!r}: give ADDRESS:PORT, e.g. {DEFAULT_LISTEN}")
    return host.strip("[]") or "127.0.0.1", int(port)


def serve(listen: str, names: Sequence[str] = (), timeout: float = 1.0,
          log: Callable[[str], None] = print) -> int:
    """Serves /metrics on `listen` until SIGINT or SIGTERM."""
    host, port = parse_listen(listen)
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server, thread = start_http_server(port, host, registry=registry(names, timeout))
        except OSError as e:
            raise OSError(f"cannot listen on {listen}: {e.strerror}") from None
        log(f"pktipc: exporter serving http://{listen}/metrics for "
            + (", ".join(names) if names else "every broker"))
        stop.wait()
        server.shutdown()
        server.server_close()
        thread.join()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return 0
