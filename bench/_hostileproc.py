"""The processes of bench.hostile, each run on its own.

    python bench/_hostileproc.py good SERVER NAME POLICY PCAP
    python bench/_hostileproc.py hostile ENDPOINT COUNT SEED GOOD_NAME,...
    python bench/_hostileproc.py stalled SERVER COUNT [INTERVAL]

`good` reads the whole stream and checks every packet against the capture
the broker replays (--loop, in order: packet `seq` is the file's packet
`seq % n`), byte for byte, with its timestamp and lengths (PCAP `-`: a live
source, only that no packet is missing or out of order); it prints one JSON
line at end-of-stream: packets, the first mismatch if any, gaps, and when
it got what.

`hostile` sends COUNT control messages the broker must refuse, ignore or
answer, from a seeded generator (tests/test_fuzz_live.py's frames: random,
truncated, over-long, mis-typed, of every message type), in chunks, each
chunk from a connection of its own in one role:

  stranger  a peer that never attached: garbage, multi-part messages, STATS,
            HELLOs that steal the good clients' names, RELEASE, HEARTBEAT
            and BYE while not attached
  attached  a client of its own (drop policy): RELEASE of batches it does
            not hold, held twice or beyond the maximum, HEARTBEAT, HELLO
            while attached, garbage; then BYE, or it vanishes holding what
            it holds
  stats     a STATS flood from a peer not attached
  beats     a HEARTBEAT flood from an attached client
  router    a ROUTER peer: multi-part messages and garbage
  req       REQ sockets: one request each, whose reply the REQ cannot read

It reads the replies as it goes (a peer that does not read is cut off,
which is bench.hostile's third part, not this one's), ends every chunk
with a STATS fence and waits for its reply, and prints one JSON line: what
it sent by kind, the replies by type and ERROR code, and fences that were
not answered.

`flood` sends one kind of message as fast as the broker takes it for
SECONDS, and prints how many it sent:

  none        nothing: it sleeps (what starting a process costs, for comparison)
  spin        nothing to the broker: it keeps a CPU busy (what an attacker's
              own CPU costs the others on a shared machine, for comparison)
  stats       STATS from a peer not attached, on one connection
  heartbeat   HEARTBEAT from an attached client ("flooder")
  reconnect   STATS; whenever the connection is refused or cut, a new one
              (waiting up to 0.1 s for it to be admitted)
  fork        STATS from a new process for every 300 of them (4 at a time),
              so that each burst has a process's budget of its own

`unread` sends STATS at RATE a second (after a burst of BURST) on a
connection whose replies it never reads (RCVHWM 1, a 4 KiB receive buffer),
for SECONDS (or until SIGTERM). It cannot see the broker cut it off (it
reads nothing); bench.hostile watches that in the broker's STATS.

`stalled` attaches COUNT `drop` clients, INTERVAL seconds apart, that ask
for all the credit they can, never read and never release, and holds them
until it is killed.

    python bench/_hostileproc.py flood ENDPOINT KIND SECONDS
    python bench/_hostileproc.py unread ENDPOINT RATE BURST SECONDS
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import signal
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

REPLY_WAIT = 10.0       # the longest wait for a fence's reply (s)


# --- good ----------------------------------------------------------------------------


def read_capture(path: str) -> list[tuple[int, int, int, bytes]]:
    """(ts_ns, caplen, wirelen, data) of every record of a classic nanosecond
    pcap file (what pktipc._tools.synth writes): an independent reading."""
    raw = Path(path).read_bytes()
    magic = struct.unpack_from("<I", raw)[0]
    assert magic == 0xA1B23C4D, f"{path}: not a little-endian nanosecond pcap file"
    out, off = [], 24
    while off < len(raw):
        sec, nsec, caplen, wirelen = struct.unpack_from("<IIII", raw, off)
        off += 16
        out.append((sec * 1_000_000_000 + nsec, caplen, wirelen, raw[off:off + caplen]))
        off += caplen
    return out


def good(server: str, name: str, policy: str, pcap: str) -> int:
    ref = read_capture(pcap) if pcap != "-" else []
    n = len(ref)
    got = mismatched = 0
    first_bad: int | None = None
    out_of_order = 0
    expect = 0
    digest = hashlib.blake2b(digest_size=16)
    import pktipc

    client = pktipc.connect(server, name, policy=policy, timeout=30)
    t_attached = time.monotonic()
    for batch in client:
        with batch:
            for p in batch:
                if p.seq != expect:
                    out_of_order += 1
                expect = p.seq + 1
                if not n:
                    got += 1
                    continue
                r = ref[p.seq % n]
                data = bytes(p.data)
                if (p.ts_ns, p.caplen, p.wirelen, data) != r:
                    mismatched += 1
                    if first_bad is None:
                        first_bad = p.seq
                digest.update(data)
                got += 1
    t_end = time.monotonic()
    print(json.dumps({
        "name": name, "policy": policy, "packets": got, "mismatched": mismatched,
        "first_mismatch": first_bad, "out_of_order": out_of_order,
        "gaps": len(client.gaps), "gap_packets": sum(e - s for s, e in client.gaps),
        "reconnects": client.reconnects, "end_error": client.end_error,
        "t_attached": t_attached, "t_end": t_end, "digest": digest.hexdigest(),
    }), flush=True)
    client.close()
    return 0


# --- hostile -------------------------------------------------------------------------


class Hostile:
    def __init__(self, endpoint: str, seed: int, good_names: list[str]) -> None:
        import test_fuzz_live as fz

        self.fz = fz
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.good_names = good_names
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.ctx.setsockopt(zmq.LINGER, 0)
        self.sent: Counter[str] = Counter()
        self.replies: Counter[str] = Counter()
        self.codes: Counter[str] = Counter()
        self.fences_unanswered = 0
        self.connections = 0
        self.welcomed = 0
        self.held: list[int] = []
        self.given: list[int] = []
        self.owed = 0               # STATS replies owed on the current socket
        self.n = 0

    # -- sockets --
    def socket(self, kind: int = zmq.DEALER) -> zmq.Socket[bytes]:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.SNDTIMEO, int(REPLY_WAIT * 1000))
        if kind == zmq.ROUTER:
            s.setsockopt(zmq.ROUTER_MANDATORY, 1)
            s.setsockopt(zmq.CONNECT_ROUTING_ID, b"broker")
        s.connect(self.endpoint)
        self.connections += 1
        self.owed = 0
        return s

    def send(self, s: zmq.Socket[bytes], parts: bytes | list[bytes], kind: str,
             router: bool = False) -> bool:
        parts = [parts] if isinstance(parts, bytes) else parts
        try:
            s.send_multipart([b"broker", *parts] if router else parts)
        except zmq.ZMQError:        # cut off, refused, or not yet connected
            self.sent["unsendable"] += 1
            return False
        self.sent[kind] += 1
        self.n += 1
        if kind.startswith("stats"):
            self.owed += 1
        if self.n % 64 == 0:
            self.drain(s, router)
        return True

    def take(self, frame: bytes) -> str:
        try:
            m = msgpack.unpackb(frame, raw=False)
            t = m.get("t", "?") if isinstance(m, dict) else "?"
        except Exception:
            t = "undecodable"
        self.replies[t] += 1
        if t == "error":
            self.codes[str(m.get("code"))] += 1
        elif t == "batch":
            self.held.append(int(m["seq"]))
        elif t == "stats_reply":
            self.owed -= 1
        return str(t)

    def drain(self, s: zmq.Socket[bytes], router: bool = False) -> None:
        while True:
            try:
                parts = s.recv_multipart(zmq.NOBLOCK)
            except zmq.ZMQError:
                return
            self.take(parts[-1])

    def fence(self, s: zmq.Socket[bytes], router: bool = False) -> None:
        """STATS, then every reply up to its answer (replies to one socket
        come in the order of its messages)."""
        if not self.send(s, self.fz.msg("stats", {}), "stats (fence)", router):
            return
        deadline = time.monotonic() + REPLY_WAIT
        while self.owed > 0 and time.monotonic() < deadline:
            if s.poll(100):
                self.take(s.recv_multipart()[-1])
        if self.owed > 0:
            self.fences_unanswered += 1

    def wait_for(self, s: zmq.Socket[bytes], types: set[str]) -> str | None:
        deadline = time.monotonic() + REPLY_WAIT
        while time.monotonic() < deadline:
            if s.poll(100):
                t = self.take(s.recv_multipart()[-1])
                if t in types:
                    return t
        return None

    # -- roles --
    def garbage(self, s: zmq.Socket[bytes], router: bool = False) -> None:
        r = self.rng.random()
        if r < 0.10:
            self.send(s, self.fz.multipart(self.rng), "multipart", router)
        else:
            frame, what = self.fz.garbage(self.rng)
            self.send(s, frame, what, router)

    def stranger(self, count: int) -> None:
        fz, rng = self.fz, self.rng
        s = self.socket()
        for _ in range(count):
            r = rng.random()
            if r < 0.05:
                self.send(s, fz.msg("stats", {}), "stats")
            elif r < 0.08:
                self.send(s, fz.hello_frame(rng.choice(self.good_names)), "hello stealing a name")
            elif r < 0.11:
                self.send(s, fz.release_frame([rng.randint(0, fz.U64)]), "release unattached")
            elif r < 0.13:
                self.send(s, fz.msg("heartbeat", {}), "heartbeat unattached")
            elif r < 0.14:
                self.send(s, fz.msg("bye", {}), "bye unattached")
            else:
                self.garbage(s)
        self.fence(s)
        s.close()

    def unheld(self) -> int:
        rng = self.rng
        if self.given and rng.random() < 0.6:
            return rng.choice(self.given)
        u64: int = self.fz.U64
        return rng.choice([u64, 1 << 40, rng.randint(1 << 40, u64)])

    def attach(self, s: zmq.Socket[bytes]) -> bool:
        fz, rng = self.fz, self.rng
        name = fz.rand_name(rng, "h")
        self.send(s, fz.hello_frame(name, credit=rng.randint(1, 4)), "hello")
        self.held.clear()
        self.given.clear()
        if self.wait_for(s, {"welcome", "error"}) == "welcome":
            self.welcomed += 1
            return True
        return False

    def release(self, s: zmq.Socket[bytes]) -> None:
        fz, rng = self.fz, self.rng
        r = rng.random()
        if self.held and r < 0.3:
            seq = self.held.pop(rng.randrange(len(self.held)))
            self.send(s, fz.release_frame([seq]), "release held")
            self.send(s, fz.release_frame([seq]), "release again")
            self.given.append(seq)
        elif r < 0.7:
            self.send(s, fz.release_frame([self.unheld()]), "release unheld")
        elif r < 0.9:
            base = rng.randint(1 << 40, 1 << 50)
            self.send(s, fz.release_frame(list(range(base, base + fz.proto.MAX_RELEASE))),
                      "release 4096 unheld")
        else:
            self.send(s, fz.release_frame([0] * (fz.proto.MAX_RELEASE + 1)), "release 4097")

    def attached(self, count: int) -> None:
        fz, rng = self.fz, self.rng
        s = self.socket()
        if not self.attach(s):
            s.close()
            return
        for _ in range(count):
            r = rng.random()
            if r < 0.35:
                self.release(s)
            elif r < 0.60:
                self.send(s, fz.msg("heartbeat", {}), "heartbeat")
            elif r < 0.65:
                self.send(s, fz.hello_frame(fz.rand_name(rng)), "hello while attached")
            elif r < 0.70:
                self.send(s, fz.msg("stats", {}), "stats")
            else:
                self.garbage(s)
        self.fence(s)
        if rng.random() < 0.5:
            self.send(s, fz.msg("bye", {}), "bye")
        s.close()                   # else it vanishes, holding what it holds

    def stats_flood(self, count: int) -> None:
        s = self.socket()
        frame = self.fz.msg("stats", {})
        for _ in range(count):
            self.send(s, frame, "stats flood")
        self.fence(s)
        s.close()

    def beats_flood(self, count: int) -> None:
        s = self.socket()
        if not self.attach(s):
            s.close()
            return
        frame = self.fz.msg("heartbeat", {})
        for _ in range(count):
            self.send(s, frame, "heartbeat flood")
        self.fence(s)
        self.send(s, self.fz.msg("bye", {}), "bye")
        s.close()

    def router(self, count: int) -> None:
        s = self.socket(zmq.ROUTER)
        deadline = time.monotonic() + REPLY_WAIT
        while True:                 # a ROUTER can send once the connection is up
            try:
                s.send_multipart([b"broker", self.fz.msg("stats", {})])
                self.sent["stats (router, first)"] += 1
                self.n += 1
                self.owed += 1
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    s.close()
                    return
                time.sleep(0.005)
        for _ in range(count):
            if self.rng.random() < 0.7:
                self.send(s, self.fz.multipart(self.rng), "multipart", router=True)
            else:
                self.send(s, self.fz.garbage(self.rng)[0], "garbage (router)", router=True)
        self.fence(s, router=True)
        s.close()

    def req(self, count: int) -> None:
        for _ in range(count):
            q = self.socket(zmq.REQ)
            self.send(q, self.rng.choice([[self.fz.garbage(self.rng)[0]],
                                          [self.fz.msg("stats", {})],
                                          self.fz.multipart(self.rng)]), "req")
            q.close(linger=1000)

    def run(self, total: int) -> None:
        roles = [(self.stranger, 45, (100, 400)), (self.attached, 30, (100, 400)),
                 (self.stats_flood, 6, (500, 2000)), (self.beats_flood, 6, (500, 2000)),
                 (self.router, 10, (100, 300)), (self.req, 3, (2, 8))]
        while self.n < total:
            fn, _, (lo, hi) = self.rng.choices(roles, [w for _, w, _ in roles])[0]
            fn(min(self.rng.randint(lo, hi), max(1, total - self.n)))
        self.ctx.term()


def hostile(endpoint: str, count: int, seed: int, good_names: list[str]) -> int:
    h = Hostile(endpoint, seed, good_names)
    t0 = time.monotonic()
    h.run(count)
    print(json.dumps({
        "messages": h.n, "seconds": time.monotonic() - t0, "sent": dict(h.sent),
        "replies": dict(h.replies), "error_codes": dict(h.codes),
        "fences_unanswered": h.fences_unanswered, "connections": h.connections,
        "welcomed": h.welcomed,
    }), flush=True)
    return 0


# --- floods --------------------------------------------------------------------------


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _burst(endpoint: str, frame: bytes, count: int) -> int:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = _dealer(ctx, endpoint)
    sent, deadline = 0, time.monotonic() + 1.0
    while sent < count and time.monotonic() < deadline:
        try:
            s.send(frame, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            time.sleep(0.0005)
    s.close()
    ctx.term()
    return sent


def flood(endpoint: str, kind: str, seconds: float) -> int:
    import os

    from pktipc import _protocol as proto

    stats, beat = proto.encode("stats"), proto.encode("heartbeat")
    end = time.monotonic() + seconds
    if kind in ("none", "spin"):
        n = 0
        while time.monotonic() < end:
            if kind == "none":
                time.sleep(0.1)
            n += 1
        print(json.dumps({"sent": 0, "connections": 0}), flush=True)
        return 0
    if kind == "fork":          # no ZeroMQ context in this process: it forks
        stop = []
        # SIGTERM: stop forking, and wait for the children (each ends within 1 s).
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        r, w = os.pipe()
        os.set_blocking(r, False)
        children: set[int] = set()
        counts = bytearray()
        while time.monotonic() < end and not stop:
            while len(children) >= 4:
                with contextlib.suppress(InterruptedError):
                    children.discard(os.wait()[0])
            pid = os.fork()
            if pid == 0:
                os.close(r)
                os.write(w, _burst(endpoint, stats, 300).to_bytes(4, "little"))
                os._exit(0)
            children.add(pid)
            with contextlib.suppress(BlockingIOError):
                counts += os.read(r, 1 << 16)
        for pid in children:
            os.waitpid(pid, 0)
        os.close(w)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                counts += chunk
        sent = sum(int.from_bytes(counts[i:i + 4], "little") for i in range(0, len(counts), 4))
        print(json.dumps({"sent": sent, "connections": len(counts) // 4}), flush=True)
        return 0
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = _dealer(ctx, endpoint)
    frame = stats
    if kind == "heartbeat":
        s.send(proto.encode("hello", name="flooder", group=None, policy=None, credit=None,
                            pid=0, balance=None))
        if not (s.poll(5000) and proto.decode(s.recv(), proto.MAX_BROKER_FRAME)[0] == "welcome"):
            print(json.dumps({"sent": 0, "error": "not welcomed"}), flush=True)
            return 1
        frame = beat
    sent, connections = 0, 1
    while time.monotonic() < end:
        try:
            s.send(frame, zmq.NOBLOCK)
            sent += 1
        except zmq.Again:
            if kind == "reconnect":
                s.close()
                s = _dealer(ctx, endpoint)
                s.poll(100, zmq.POLLOUT)    # until it is connected, if it is admitted
                connections += 1
            else:
                time.sleep(0.001)
        if kind == "heartbeat" and sent % 1000 == 0:
            while s.poll(0):
                s.recv()
    s.close()
    ctx.term()
    print(json.dumps({"sent": sent, "connections": connections}), flush=True)
    return 0


def unread(endpoint: str, rate: float, burst: int, seconds: float) -> int:
    """(Light: no pktipc, so that a hundred of these start quickly.)"""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)             # as little as it can take in
    s.setsockopt(zmq.RCVBUF, 4096)
    s.connect(endpoint)
    frame = msgpack.packb({"t": "stats", "v": 2})
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < seconds:
        due = burst + (time.monotonic() - t0) * rate
        while sent < due:
            try:
                s.send(frame, zmq.NOBLOCK)
                sent += 1
            except zmq.Again:       # its own queue is full: the broker stopped reading it
                break
        time.sleep(0.01)
    print(json.dumps({"sent": sent}), flush=True)
    s.close()
    ctx.term()
    return 0


# --- stalled -------------------------------------------------------------------------


def stalled(server: str, count: int, interval: float) -> int:
    import pktipc

    clients = []
    for i in range(count):
        clients.append(pktipc.connect(server, f"stalled{i}", policy="drop", credit=4096,
                                      timeout=30))
        time.sleep(interval)    # each stalls at another point of the stream
    print(json.dumps({"credit": [c.welcome.credit for c in clients]}), flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    return 0


def main() -> int:
    what, args = sys.argv[1], sys.argv[2:]
    if what == "good":
        return good(*args[:4])
    if what == "hostile":
        return hostile(args[0], int(args[1]), int(args[2]), args[3].split(","))
    if what == "flood":
        return flood(args[0], args[1], float(args[2]))
    if what == "unread":
        return unread(args[0], float(args[1]), int(args[2]), float(args[3]))
    if what == "stalled":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        return stalled(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 0.0)
    raise SystemExit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
