"""Clients and a hostile or corrupt segment: a broker (a fake of the test's
own) that publishes descriptors outside their slab, more of them than the
slab holds, a batch record that disagrees with the BATCH message, a header
whose geometry cannot be, or that changes what it checked. The Python
client refuses with one clear error and never reads out of bounds; the C
client's side of this is in clients/c/tests/test-client.c (under ASan)."""

from __future__ import annotations

import itertools
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import posix_ipc
import pytest
import zmq

import pktipc
from pktipc import _protocol as proto
from pktipc._layout import LAYOUT_VERSION, Geometry, Iface, Segment

SLAB = 4096


class FakeBroker:
    """A segment of 4 slabs of 4 KiB and a ROUTER that welcomes one client
    and sends it what the test says."""

    def __init__(self, runtime_dir: Path, name: str) -> None:
        self.name = name
        self.shm = f"/pktipc.{name}.{os.getpid():016x}"
        g = Geometry(SLAB, 4, 1)
        shm = posix_ipc.SharedMemory(self.shm, posix_ipc.O_CREX, mode=0o600, size=g.total_size)
        self.mm = mmap.mmap(shm.fd, g.total_size)
        shm.close_fd()
        self.seg = Segment(self.mm, writable=True)
        self.seg.init(g, name=name, epoch=7, ifaces=[Iface("eth0", 1, 65535)])
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"ipc://{runtime_dir}/{name}.ctl")
        self.peer = b""

    def welcome(self, before: Callable[[], None] | None = None, *, policy: str = "block",
                after: Callable[[], None] | None = None) -> threading.Thread:
        """Answers the next HELLO (after `before`, if given; what comes
        before it is dropped) in a thread, then calls `after`."""
        def run() -> None:
            while True:
                assert self.router.poll(5000)
                peer, frame = self.router.recv_multipart()
                if proto.decode(frame)[0] == "hello":
                    break
            self.peer = peer
            if before is not None:
                before()
            self.send("welcome", shm=self.shm, epoch=7, layout=LAYOUT_VERSION, slot=0, credit=4,
                      policy=policy, heartbeat_ms=1000, liveness_ms=30000, group="c",
                      balance="flow")
            if after is not None:
                after()
        t = threading.Thread(target=run)
        t.start()
        return t

    def send(self, mtype: str, **fields: Any) -> None:
        self.router.send_multipart([self.peer, proto.encode(mtype, **fields)])

    def publish(self, slab: int, n: int, seq: int = 0, caplen: int = 60) -> np.ndarray[Any, Any]:
        """n packets in `slab`, its record written; the descriptors, writable."""
        d = np.frombuffer(self.mm, dtype=pktipc.PKT_DTYPE, count=n,
                          offset=self.seg.geometry.slab_off(slab))
        for i in range(n):
            d[i] = (1, SLAB - (i + 1) * 64, caplen, caplen, 0, 0, 1, 0, 0)
        rec = self.seg.batch_rec(slab)
        rec.slab, rec.gen, rec.count, rec.seq = slab, 1, n, seq
        return d

    def batch(self, slab: int, n: int, seq: int = 0) -> None:
        self.send("batch", seq=seq, slab=slab, gen=1, n=n, members=[], mask=None)

    def close(self) -> None:
        posix_ipc.unlink_shared_memory(self.shm)
        self.router.close(linger=0)
        self.ctx.term()


_names = itertools.count()


@pytest.fixture
def fake(runtime_dir: Path) -> Iterator[FakeBroker]:
    f = FakeBroker(runtime_dir, f"h{os.getpid()}-{next(_names)}")
    yield f
    f.close()


def attached(fake: FakeBroker) -> pktipc.Client:
    t = fake.welcome()
    c = pktipc.connect(fake.name, "c", reconnect=0, timeout=5)
    t.join()
    return c


@pytest.mark.parametrize("how", ["past the slab", "wraps around", "over the descriptors"])
def test_a_descriptor_outside_its_slab(fake: FakeBroker, how: str) -> None:
    d = fake.publish(1, 3)
    d[2]["data_off"], d[2]["caplen"] = {
        "past the slab": (SLAB - 8, 60),
        "wraps around": (2**32 - 8, 60),
        "over the descriptors": (32, 60),
    }[how]
    with attached(fake) as c:
        fake.batch(1, 3)
        with pytest.raises(pktipc.BrokerGone) as e:
            c.next_batch(timeout=5)
    assert str(e.value) == (f"broker '{fake.name}' broke the protocol: packet 2 of batch 0 lies "
                            "outside its slab")


@pytest.mark.parametrize("how", ["count", "seq", "more than the slab holds"])
def test_a_batch_record_that_disagrees(fake: FakeBroker, how: str) -> None:
    fake.publish(1, 3, seq=10)
    n, seq = {"count": (4, 10), "seq": (3, 11),
              "more than the slab holds": (SLAB // 32 + 1, 10)}[how]
    if how == "more than the slab holds":
        fake.seg.batch_rec(1).count = n
    with attached(fake) as c:
        fake.batch(1, n, seq=seq)
        with pytest.raises(pktipc.BrokerGone) as e:
            c.next_batch(timeout=5)
    assert str(e.value) == (f"broker '{fake.name}' broke the protocol: batch {seq} does not "
                            "match its record in the segment")


@pytest.mark.parametrize("field,value", [
    ("slabs_off", 2**64 - 4096), ("batch_table_off", 2**64 - 64), ("slab_count", 2**32 - 1),
    ("iface_count", 2**32 - 1), ("slab_size", SLAB + 1), ("total_size", 2**63)])
def test_a_header_whose_geometry_cannot_be(fake: FakeBroker, field: str, value: int) -> None:
    setattr(fake.seg.header, field, value)
    t = fake.welcome()
    with pytest.raises(pktipc.LayoutError, match="segment header is inconsistent"):
        pktipc.connect(fake.name, "c", reconnect=0, timeout=5)
    t.join()


def test_what_was_checked_is_what_is_read(fake: FakeBroker) -> None:
    """The broker changes the header's offsets and a descriptor after the
    client checked them: the client reads on with what it checked."""
    d = fake.publish(1, 3)
    with attached(fake) as c:
        h = fake.seg.header
        h.batch_table_off, h.slabs_off = 2**63, 2**64 - 4096
        fake.batch(1, 3)
        b = c.next_batch(timeout=5)
        assert b is not None
        d[1]["data_off"] = 2**32 - 1                # after the batch was made
        assert [len(v) for v in b.views()] == [60, 60, 60]
        assert int(b.descriptors["data_off"][1]) == SLAB - 128
        b.release()
