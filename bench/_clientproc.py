"""One benchmark client, run as its own process by bench.offline.

    python bench/_clientproc.py SERVER NAME {objects,numpy,flows,latency} [GROUP]

Reads the whole stream (as a member of GROUP, if given) and prints one JSON
line: packets, caplen sum, distinct flow hashes, and CLOCK_MONOTONIC times
(system-wide, so comparable across processes) of attach, first batch and end
of stream, and CPU time used while streaming. `latency` also reports
percentiles of capture time (the kernel's timestamp) to the moment the batch
is in the client's hands.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import pktipc


def objects(batch: pktipc.Batch) -> tuple[int, int]:
    """What a Python user writes: a Packet per packet, its fields read."""
    caplen = last_ts = 0
    for p in batch:
        caplen += p.caplen
        last_ts = p.ts_ns
    return caplen, last_ts


FLOWS: set[int] = set()


def numpy(batch: pktipc.Batch) -> tuple[int, int]:
    """Column-wise: descriptors as a NumPy structured array, no per-packet Python."""
    d = batch.descriptors
    if len(batch) != batch.n:       # a group member: its own packets
        d = d[batch.mine]
    return int(d["caplen"].sum()), int(d["ts_ns"][-1])


def flows(batch: pktipc.Batch) -> tuple[int, int]:
    """NumPy, and the distinct flow hashes seen (for the spread of flows)."""
    FLOWS.update(np.unique(batch.descriptors["hash"][batch.mine]).tolist())
    return numpy(batch)


LATENCIES: list[np.ndarray[Any, Any]] = []


def latency(batch: pktipc.Batch) -> tuple[int, int]:
    now = time.time_ns()
    d = batch.descriptors
    LATENCIES.append(now - d["ts_ns"])
    return int(d["caplen"].sum()), int(d["ts_ns"][-1])


def consume(client: pktipc.Client, per_batch: Callable[[pktipc.Batch], tuple[int, int]]
            ) -> tuple[int, int, int, float]:
    """Packets, caplen sum, last timestamp, and when the first batch came."""
    n = caplen = last_ts = 0
    first = 0.0
    for batch in client:            # until end-of-stream
        if not first:
            first = time.monotonic()
        with batch:
            c, last_ts = per_batch(batch)
            caplen += c
            n += len(batch)
    return n, caplen, last_ts, first


def _percentiles() -> dict[str, float]:
    if not LATENCIES:
        return {}
    lat = np.concatenate(LATENCIES) / 1e6
    p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
    return {"lat_ms_p50": float(p50), "lat_ms_p99": float(p99), "lat_ms_p999": float(p999),
            "lat_ms_max": float(lat.max())}


def main() -> int:
    server, name, mode = sys.argv[1:4]
    group = sys.argv[4] if len(sys.argv) > 4 else None
    per_batch = {"objects": objects, "numpy": numpy, "flows": flows, "latency": latency}[mode]
    profile = os.environ.get("PKTIPC_BENCH_PROFILE")
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    t_start = time.monotonic()
    client = pktipc.connect(server, name, group=group, timeout=30.0)
    t_attached = time.monotonic()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if prof is not None:
        prof.enable()
    n, caplen, last_ts, t_first = consume(client, per_batch)
    if prof is not None:
        prof.disable()
    t_end = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    client.close()
    if prof is not None and profile:
        prof.dump_stats(profile)
    print(json.dumps({
        "name": name, "mode": mode, "group": client.group, "flows": len(FLOWS),
        "packets": n, "caplen_sum": caplen, "last_ts": last_ts,
        "t_start": t_start, "t_attached": t_attached, "t_first": t_first, "t_end": t_end,
        "gaps": len(client.gaps), "gap_packets": sum(e - s for s, e in client.gaps),
        "end_error": client.end_error, **_percentiles(),
        "cpu_user": ru.ru_utime, "cpu_sys": ru.ru_stime,
        "cpu_stream_s": ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
