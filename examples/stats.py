"""An operator's script on pktipc's typed statistics: for each broker (or
those named), what it placed and dropped, and each client's lag, worst
first; exit status 1 if a client lags by more than --max-lag seconds.

    python examples/stats.py [--max-lag S] [BROKER...]

`mypy --strict examples/stats.py` passes: every field read here is typed
(pktipc.BrokerStats and the frozen dataclasses it holds).
"""

from __future__ import annotations

import argparse
import sys

import pktipc


def lagging(stats: pktipc.BrokerStats, max_lag: float) -> list[pktipc.ClientStats]:
    """The clients of `stats` that hold a batch longer than `max_lag` seconds, worst first."""
    return sorted((c for c in stats.clients if c.lag_s > max_lag),
                  key=lambda c: c.lag_s, reverse=True)


def report(stats: pktipc.BrokerStats) -> str:
    c: pktipc.BrokerCounters = stats.counters
    lines = [f"{stats.name}: {stats.state}, {c.packets} packets, {c.broker_drops} dropped by "
             f"the broker, {c.client_drops} skipped for lagging clients, "
             f"{stats.slabs.free}/{stats.slabs.count} slabs free"]
    for s in stats.sources:
        kernel = "" if s.kernel_drops is None else f", kernel drops {s.kernel_drops}"
        lines.append(f"  source {s.name} ({s.kind}, link type {s.linktype}): "
                     f"{s.packets} packets{kernel}")
    for cl in sorted(stats.clients, key=lambda cl: cl.lag_s, reverse=True):
        lines.append(f"  client {cl.name} (group {cl.group}, {cl.policy}): {cl.packets} "
                     f"packets, {cl.drops} dropped, lag {cl.lag_packets} packets / "
                     f"{cl.lag_s:.3f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="pktipc brokers' statistics")
    ap.add_argument("--max-lag", type=float, default=5.0, metavar="S")
    ap.add_argument("brokers", nargs="*")
    a = ap.parse_args(argv)
    worst = 0
    for name in a.brokers or pktipc.brokers():
        try:
            stats = pktipc.broker_stats(name)
        except pktipc.PktipcError as e:
            print(f"{name}: {e}", file=sys.stderr)
            worst = 1
            continue
        print(report(stats))
        if lagging(stats, a.max_lag):
            worst = 1
    return worst


if __name__ == "__main__":
    sys.exit(main())
