"""Thousands of hostile control messages against a live broker: it never
dies, answers each bad one with ERROR, and keeps serving a good client."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import zmq
from conftest import PCAPS
from pcapref import read_pcap

import pktipc
from pktipc import _protocol as proto

FILE = PCAPS / "DECnet_Phone.pcap"
REPLIES = {"error", "welcome", "stats_reply", "batch", "heartbeat", "eos", "evict", "gap"}


def junk_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 2 else 7)
    return [
        lambda: rng.randrange(-2**63, 2**64),
        lambda: rng.choice([True, False, None]),
        lambda: rng.random() * 1e9,
        lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(40))),
        lambda: rng.randbytes(rng.randrange(40)),
        lambda: rng.choice(["block", "drop", "x" * 2000, "", "ids\n"]),
        lambda: rng.randrange(0, 2**32),
        lambda: [junk_value(rng, depth + 1) for _ in range(rng.randrange(5))],
        lambda: {str(junk_value(rng, depth + 1)): junk_value(rng, depth + 1)
                 for _ in range(rng.randrange(4))},
    ][kind]()


def hostile_frame(rng: random.Random) -> bytes:
    """One frame the broker must refuse (or, rarely, a valid request)."""
    mtype = rng.choice(sorted(proto.SCHEMAS))
    fields: dict[str, Any] = {k: junk_value(rng) for k in proto.SCHEMAS[mtype]}
    if mtype == "hello":    # never a valid name: nothing attaches by chance
        fields["name"] = rng.choice(["", "a/b", 7, "x" * 100, None, "ids\n"])
    msg: dict[Any, Any] = {"t": mtype, "v": 1, **fields}
    choice = rng.randrange(10)
    if choice == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if choice == 1:
        return msgpack.packb(msg)[: rng.randrange(1, 20)]            # truncated
    if choice == 2:
        return b"\x92" + rng.randbytes(proto.MAX_FRAME + rng.randrange(10))   # oversized
    if choice == 3:
        msg["v"] = junk_value(rng)
    elif choice == 4:
        msg.pop(rng.choice(list(msg)))
    elif choice == 5:
        msg[rng.choice(["extra", "x", "seq"])] = junk_value(rng)
    elif choice == 6:
        msg = junk_value(rng, 1)
    elif choice == 7 and mtype == "release":
        msg["seqs"] = [rng.randrange(2**64) for _ in range(rng.choice([1, 4097, 5000]))]
    return msgpack.packb(msg, use_bin_type=rng.random() < 0.5)


def valid_type(frame: bytes) -> str | None:
    try:
        return proto.decode(frame)[0]
    except proto.RemoteProtocolError:
        return None


def test_broker_survives_hostile_control_traffic(broker) -> None:
    want = read_pcap(str(FILE)).packets
    b = broker("-r", str(FILE), "--wait-clients", "2", "--slab-size", "8k", "--slabs", "4")
    rng = random.Random(20261122)
    ctx = zmq.Context()
    socks = []
    sent = replies = silent = stats = 0
    try:
        with pktipc.connect(b.name, "good", credit=1) as good:
            def raw() -> zmq.Socket[bytes]:
                s = ctx.socket(zmq.DEALER)
                s.setsockopt(zmq.LINGER, 0)
                s.connect(f"ipc://{b.socket}")
                socks.append(s)
                return s

            def drain(s: zmq.Socket[bytes], expect: int) -> int:
                """Replies, until `expect` came or none comes for 5 s."""
                n = 0
                while n < expect and s.poll(5000):
                    reply = msgpack.unpackb(s.recv(), raw=False)
                    assert isinstance(reply, dict) and reply["t"] in REPLIES, reply
                    n += 1
                return n + (s.poll(100) and len(s.recv_multipart()))   # none too many

            errors_before = good.stats()["counters"]["protocol_errors"]
            for round_ in range(30):
                s = raw() if round_ % 10 == 0 or not socks else socks[-1]
                silent_before = silent
                for _ in range(100):
                    frame = hostile_frame(rng)
                    s.send(frame)
                    sent += 1
                    kind = valid_type(frame)
                    silent += kind == "bye"         # BYE of an unattached peer: no answer
                    stats += kind == "stats"        # answered, but not an error
                s.send_multipart([b"more", b"than", b"one"])
                sent += 1
                replies += drain(s, 101 - (silent - silent_before))
                assert b.proc.poll() is None, b.stderr()
            # A hostile but valid client: attaches, then misbehaves.
            bad = raw()
            bad.send(proto.encode("hello", name="bad", group=None, policy="drop", credit=1,
                                  pid=0))
            bad.send(proto.encode("release", seqs=[0, 0, 2**64 - 1]))
            bad.send(proto.encode("hello", name="good", group=None, policy=None, credit=None,
                                  pid=0))
            drain(bad, 3)
            errors = good.stats()["counters"]["protocol_errors"] - errors_before
            assert replies == sent - silent
            assert errors == sent - silent - stats + 2     # + the two of "bad"
            # The replay starts (two clients attached); the good client gets it all.
            got = [(p.ts_ns, p.caplen, p.wirelen, bytes(p.data))
                   for p in good.packets(timeout=20)]
        assert got == want
    finally:
        for s in socks:
            s.close()
        ctx.term()
    assert b.wait(timeout=60) == 0
    assert "Traceback" not in b.stderr()


def test_hostile_frames_are_refused_without_sockets() -> None:
    """The same generator against the bare state machine: every frame gives
    events or a RemoteProtocolError, never anything else."""
    rng = random.Random(7)
    conn = proto.BrokerConnection()
    for i in range(5000):
        try:
            conn.receive(b"peer%d" % (i % 7), hostile_frame(rng), float(i))
        except proto.RemoteProtocolError:
            pass
    assert conn.errors > 4000
    assert all(msgpack.unpackb(f)["t"] in REPLIES for _, f in conn.frames_to_send())
