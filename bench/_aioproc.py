"""One client of bench.pyclient, run as its own process.

    python bench/_aioproc.py SERVER NAME {sync,aio} {batches,loop}

Reads the whole stream with the blocking client (sync) or pktipc.aio (aio):
`batches` takes each batch's caplen column (the NumPy path), `loop` hands
every packet to a pcap-style callback(data, ts, wirelen). Prints one JSON
line: packets, caplen sum, CLOCK_MONOTONIC times of the first batch and of
end-of-stream, and the CPU time used in between.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import pktipc
import pktipc.aio


class Count:
    def __init__(self) -> None:
        self.n = self.caplen = 0
        self.first = 0.0

    def batch(self, batch: pktipc.Batch) -> None:
        if not self.first:
            self.first = time.monotonic()
        with batch:
            self.caplen += int(batch.descriptors["caplen"].sum())
            self.n += len(batch)

    def packet(self, data: memoryview, ts: float, wirelen: int) -> None:
        if not self.first:
            self.first = time.monotonic()
        self.caplen += len(data)


def run_sync(server: str, name: str, style: str, c: Count) -> None:
    with pktipc.connect(server, name, timeout=30.0) as client:
        if style == "batches":
            for batch in client:
                c.batch(batch)
        else:
            c.n = client.loop(-1, c.packet)


async def run_aio(server: str, name: str, style: str, c: Count) -> None:
    async with pktipc.aio.connect(server, name, timeout=30.0) as client:
        if style == "batches":
            async for batch in client:
                c.batch(batch)
        else:
            c.n = await client.loop(-1, c.packet)


def main() -> int:
    server, name, edge, style = sys.argv[1:5]
    c = Count()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    if edge == "sync":
        run_sync(server, name, style, c)
    else:
        asyncio.run(run_aio(server, name, style, c))
    end = time.monotonic()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out: dict[str, Any] = {
        "edge": edge, "style": style, "packets": c.n, "caplen_sum": c.caplen,
        "t_first": c.first, "t_end": end,
        "cpu_s": ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
