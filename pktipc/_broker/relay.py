"""A remote broker as a packet source: the relay (`pktipc relay`).

The relay is a client of a broker on another host (through its gateway,
pktipc.connect("tcp://...")), and a broker of its own on this host: each
batch received is placed, in C, in the relay's slabs, every packet as it
came (time, lengths, link type, flags, flow hash, interface), and the
remote interface table is the relay's. So one network stream feeds any
number of local clients, in Python, C or Suricata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _protocol as proto
from .._client.client import Batch, Client, connect
from .._client.session import _CarriedBatch
from .._errors import EndOfStream, PktipcError, SourceError
from .._layout import Iface, Segment
from .._shm import ffi, lib
from .sources import Produced, Status


@dataclass
class RelayOptions:
    url: str                            # tcp://HOST:PORT/NAME
    client: str                         # the relay's name on the remote broker
    group: str | None = None
    balance: str | None = None
    policy: str | None = None           # the remote broker's default if None
    credit: int | None = None
    key: str | None = None
    server_key: str | None = None
    insecure: bool = False
    timeout: float = proto.DEFAULT_TIMEOUT
    reconnect: float = proto.DEFAULT_RECONNECT


class RemoteSource:
    """Batches of a remote broker, copied into this broker's slabs. Lossless
    (a `block` client of the remote broker) or not (`drop`) as the remote
    attachment is, and the relay's own clients get that policy by default."""

    frame_size = frame_count = 0       # frames are copied into slabs
    short = False

    def __init__(self, opts: RelayOptions) -> None:
        self.url = opts.url
        try:
            self.client: Client = connect(
                opts.url, opts.client, group=opts.group, balance=opts.balance,
                policy=opts.policy, credit=opts.credit, key=opts.key,
                server_key=opts.server_key, insecure=opts.insecure, timeout=opts.timeout,
                reconnect=opts.reconnect)
        except PktipcError as e:
            raise SourceError(f"{opts.url}: {e}") from None
        self.ifaces: list[Iface] = self.client.ifaces
        self.epoch = self.client.epoch
        lossless = self.client.welcome.policy == "block"
        self.default_policy = "block" if lossless else "drop"
        self.default_wait_clients = 1 if lossless else 0
        self.pauses_without_clients = lossless      # a remote block client holds it back
        self._batch: Batch | None = None
        self._desc: Any = None
        self._at = 0                    # packets of the batch already placed

    @property
    def fds(self) -> list[Any]:
        sock = self.client._sock
        return [] if sock is None else [sock]

    def produce(self, fill: Any, now: float) -> Produced:
        added = np.zeros((len(self.ifaces), 2), dtype=np.int64)
        while True:
            if self._batch is None:
                try:
                    batch = self.client.next_batch(timeout=0)
                except EndOfStream:
                    return self._produced(Status.END, added, self.client.end_error)
                except PktipcError as e:
                    return self._produced(Status.END, added, f"{self.url}: {e}")
                if batch is None:
                    return self._produced(Status.IDLE, added)
                if self.client.epoch != self.epoch:
                    if self.client.ifaces != self.ifaces:
                        batch.release()
                        return self._produced(Status.END, added, f"{self.url}: the broker "
                                              "restarted with other sources: relay it anew")
                    self.epoch = self.client.epoch
                self._batch, self._desc, self._at = batch, batch.descriptors, 0
            placed = self._place(fill)
            d = self._desc[self._at : self._at + placed]
            np.add.at(added, (d["iface"].astype(np.int64), 0), 1)
            np.add.at(added, (d["iface"].astype(np.int64), 1), d["caplen"].astype(np.int64))
            self._at += placed
            if self._at == len(self._desc):
                self._batch.release()
                self._batch = None
                continue
            if placed == 0 and fill.count == 0:
                caplen = int(self._desc["caplen"][self._at])
                return self._produced(Status.END, added, f"a packet of {caplen} bytes does "
                                      f"not fit a slab of {fill.slab_size} bytes (raise "
                                      "--slab-size)")
            return self._produced(Status.FULL, added)

    def _place(self, fill: Any) -> int:
        assert isinstance(self._batch, _CarriedBatch)
        data = self._batch._data           # the bytes its message carried
        rest = self._desc[self._at :]
        if any(rest["iface"] >= len(self.ifaces)):
            raise SourceError(f"{self.url}: a packet names a source the broker does not have")
        return int(lib.pkb_fill_copy(fill, ffi.from_buffer("struct pktipc_pkt[]", rest),
                                     len(rest), ffi.from_buffer(data), len(data)))

    def _produced(self, status: Status, added: np.ndarray[Any, Any],
                  error: str | None = None) -> Produced:
        counts = [(i, int(n), int(b)) for i, (n, b) in enumerate(added.tolist()) if n]
        if status is not Status.IDLE:
            return Produced(status, counts, error=error)
        return Produced(status, counts, wake=self.client._conn.get_timer())

    def bind(self, seg: Segment) -> None:
        pass

    def recycle(self, slab: int) -> None:
        pass

    def read_counters(self, entries: list[Any]) -> None:
        pass

    def error(self, i: int) -> str:
        return f"{self.url}: error"

    def stats(self, i: int, entry: Any) -> dict[str, Any]:
        c = self.client
        return {"kind": "remote", "from": self.url, "remote_gaps": len(c.gaps),
                "remote_skipped": sum(e - s for s, e in c.gaps),
                "remote_reconnects": c.reconnects}

    def describe(self) -> str:
        return f"relaying {self.url}"

    def close(self) -> None:
        if self._batch is not None:
            self._batch.release()
        self.client.close()
